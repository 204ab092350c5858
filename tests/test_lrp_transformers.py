"""LRP on transformers (AttnLRP): HuggingFace BERT, GPT-2, ViT, a LLaMA-style decoder, Qwen2 and
Qwen3 against lxt's AttnLRP (tests/lxt_oracle.py, in a process of its own), on their eager and
SDPA attention paths; LayerLRP at token embeddings, on blocks and per head; hand-written attention,
``F.scaled_dot_product_attention`` and ``nn.MultiheadAttention`` against lxt's rules written
out with autograd; conservation up to what biases and the softmax rule absorb; and errors for
what has no rule."""

from __future__ import annotations

import contextlib
import functools
import math
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from lxt.efficient.rules import divide_gradient, identity_rule_implicit
from torch import nn

from fastattr import LRP, LayerLRP, ops
from fastattr.canonizers import AttnLRP
from fastattr.lrp import EpsilonRule, OpRule, attention
from fastattr.lrp.attention import LayerNormRule, ParameterTableRule, SoftmaxOpRule

warnings.filterwarnings("ignore", module="transformers")

# lxt's efficient mode has no stabilizers (plain gradients through linear maps); fastattr's
# default is captum's epsilon of 1e-9 in every ratio. At this epsilon the two agree to rounding.
TINY = 1e-15
PARITY = 1e-6  # the target for the relative error against lxt

CONFIGS = {
    "bert": dict(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
    ),
    "gpt2": dict(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "llama": dict(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    ),
    "qwen2": dict(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    ),
    "qwen3": dict(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=64,
        max_position_embeddings=64,
    ),
    "vit": dict(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=3,
    ),
}
KINDS = {
    "bert": (transformers.BertConfig, transformers.BertForSequenceClassification),
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel),
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    "vit": (transformers.ViTConfig, transformers.ViTForImageClassification),
}
# Per family: the blocks whose output relevance is compared, the module whose input holds the
# heads' outputs side by side, and the token embedding.
BLOCKS = {
    "bert": ("bert.encoder.layer.{}", "bert.encoder.layer.{}.attention.output.dense"),
    "gpt2": ("transformer.h.{}", "transformer.h.{}.attn.c_proj"),
    "llama": ("model.layers.{}", "model.layers.{}.self_attn.o_proj"),
    "qwen2": ("model.layers.{}", "model.layers.{}.self_attn.o_proj"),
    "qwen3": ("model.layers.{}", "model.layers.{}.self_attn.o_proj"),
    "vit": ("vit.encoder.layer.{}", "vit.encoder.layer.{}.attention.output.dense"),
}
EMBEDDINGS = {
    "bert": "bert.embeddings.word_embeddings",
    "gpt2": "transformer.wte",
    "llama": "model.embed_tokens",
}
CASES = [(family, attn) for family in KINDS for attn in ("eager", "sdpa")]


class Logits(nn.Module):
    """What a user writes to explain a HuggingFace model with captum's API: a module returning
    the logits (of one position, for a language model) as a tensor."""

    def __init__(self, model: nn.Module, position: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.position = position

    def forward(self, inputs: torch.Tensor, attention_mask: torch.Tensor | None = None):
        if isinstance(self.model, transformers.ViTForImageClassification):
            return self.model(pixel_values=inputs).logits
        extra = (
            {} if isinstance(self.model, transformers.BertPreTrainedModel) else {"use_cache": False}
        )
        key = "inputs_embeds" if inputs.is_floating_point() else "input_ids"
        logits = self.model(**{key: inputs}, attention_mask=attention_mask, **extra).logits
        return logits if self.position is None else logits[:, self.position]


def _build(family: str, attn: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config, kind = KINDS[family]
    return kind(config(**CONFIGS[family], attn_implementation=attn)).to(torch.float64).eval()


def _inputs(family: str) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
    generator = torch.Generator().manual_seed(1)
    if family == "vit":
        return torch.randn(2, 3, 16, 16, generator=generator, dtype=torch.float64), None, [1, 2]
    embeds = torch.randn(2, 7, 32, generator=generator, dtype=torch.float64)
    mask = torch.ones(2, 7, dtype=torch.long)
    if family == "bert":
        mask[1, 5:] = 0  # padding, a bias of the attention scores
        return embeds, mask, [1, 2]
    return embeds, mask, [5, 17]


def _position(family: str) -> int | None:
    return None if family in ("bert", "vit") else -1


@contextlib.contextmanager
def _stabilizers(model: nn.Module, epsilon: float) -> Iterator[list[AttnLRP]]:
    """Every ratio of the rules stabilized by ``epsilon``: the linear layers' and layer norms'
    rules set on the model for the call, and the canonizers to pass (AttnLRP with ``epsilon``)."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) or type(module).__name__ == "Conv1D":
            module.rule = EpsilonRule(epsilon)
        elif isinstance(module, nn.LayerNorm):
            module.rule = LayerNormRule(epsilon)
    try:
        yield [AttnLRP(epsilon)]
    finally:
        for module in model.modules():
            module.__dict__.pop("rule", None)


# AttnLRP with its defaults, where the stabilizers do not matter.
ATTN = [AttnLRP()]


def _relative(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).abs().max() / reference.abs().max())


@pytest.fixture(scope="module")
def oracle(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """lxt's relevance for every case, from one run of tests/lxt_oracle.py."""
    cases = []
    for family, attn in CASES:
        inputs, mask, target = _inputs(family)
        layers = CONFIGS[family].get("num_hidden_layers", CONFIGS[family].get("n_layer"))
        block, heads = BLOCKS[family]
        cases.append(
            dict(
                family=family,
                attn=attn,
                config=CONFIGS[family],
                state=_build(family, attn).state_dict(),
                inputs=inputs,
                mask=mask,
                position=_position(family),
                target=target,
                outputs=[block.format(i) for i in range(layers)],
                inputs_of=[heads.format(i) for i in range(layers)],
            )
        )
    directory = tmp_path_factory.mktemp("lxt")
    torch.save(cases, directory / "cases.pt")
    script = Path(__file__).with_name("lxt_oracle.py")
    subprocess.run(
        [sys.executable, str(script), str(directory / "cases.pt"), str(directory / "out.pt")],
        check=True,
    )
    return dict(zip(CASES, torch.load(directory / "out.pt")))


@pytest.mark.parametrize(("family", "attn"), CASES)
def test_relevance_at_the_inputs_equals_lxt(family: str, attn: str, oracle: dict) -> None:
    model = _build(family, attn)
    inputs, mask, target = _inputs(family)
    args = None if mask is None else (mask,)
    expected = oracle[family, attn]
    with _stabilizers(model, TINY) as canonizers:
        relevance, delta = LRP(Logits(model, _position(family)), canonizers).attribute(
            inputs, target=target, additional_forward_args=args, return_convergence_delta=True
        )
    assert _relative(relevance, expected["inputs"]) < PARITY
    # The same target output, and lxt's relevance misses it by the same amount.
    lxt_delta = expected["target"] - expected["inputs"].flatten(1).sum(1)
    absolute = PARITY * float(expected["inputs"].abs().flatten(1).sum(1).max())
    torch.testing.assert_close(delta, lxt_delta, rtol=0, atol=absolute)


@pytest.mark.parametrize(("family", "attn"), CASES)
def test_blocks_and_heads_equal_lxt(family: str, attn: str, oracle: dict) -> None:
    """LayerLRP on every block (a module without a rule of its own) and per head, at the input
    of the attention's output projection."""
    model = _build(family, attn)
    embeds, mask, target = _inputs(family)
    block, heads = BLOCKS[family]
    layers = len(oracle[family, attn]["taps"]) // 2
    blocks = [model.get_submodule(block.format(i)) for i in range(layers)]
    projections = [model.get_submodule(heads.format(i)) for i in range(layers)]
    wrapper = Logits(model, _position(family))
    with _stabilizers(model, TINY) as canonizers:
        at_blocks = LayerLRP(wrapper, blocks, canonizers).attribute(
            embeds, target=target, additional_forward_args=(mask,)
        )
        at_heads = LayerLRP(wrapper, projections, canonizers).attribute(
            embeds, target=target, additional_forward_args=(mask,), attribute_to_layer_input=True
        )
    for ours, expected in zip([*at_blocks, *at_heads], oracle[family, attn]["taps"]):
        ours = ours[0] if isinstance(ours, tuple) else ours
        assert _relative(ours, expected) < PARITY
    per_head = at_heads[0].unflatten(-1, (4, -1)).sum(-1)  # (batch, tokens, heads)
    assert per_head.shape == (*at_heads[0].shape[:2], 4)


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_token_ids_through_the_embedding(family: str, frozen: bool) -> None:
    """LayerLRP on the word embedding with token ids gives LRP's relevance at inputs_embeds,
    also for a frozen model (whose embedding's output is outside autograd's graph)."""
    model = _build(family, "sdpa").requires_grad_(not frozen)
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(3))
    _, mask, target = _inputs(family)
    wrapper = Logits(model, _position(family))
    embedding = model.get_submodule(EMBEDDINGS[family])
    at_embedding = LayerLRP(wrapper, embedding, ATTN).attribute(
        ids, target=target, additional_forward_args=(mask,)
    )
    embeds = embedding(ids).detach()
    at_inputs = LRP(wrapper, ATTN).attribute(embeds, target=target, additional_forward_args=(mask,))
    torch.testing.assert_close(at_embedding, at_inputs, rtol=1e-12, atol=1e-15)
    with pytest.raises(TypeError, match="LayerLRP on the embedding"):
        LRP(wrapper, ATTN).attribute(ids, target=target, additional_forward_args=(mask,))


def test_a_language_model_with_a_tuple_target() -> None:
    """A causal LM explained as captum does: logits (batch, tokens, vocabulary) and a target
    (position, token). A model returning a ModelOutput is refused: wrap it, as Logits does."""
    model = _build("llama", "eager")
    embeds, mask, _ = _inputs("llama")
    relevance = LRP(Logits(model), ATTN).attribute(
        embeds, target=(6, 17), additional_forward_args=(mask,)
    )
    expected = LRP(Logits(model, 6), ATTN).attribute(
        embeds, target=17, additional_forward_args=(mask,)
    )
    torch.testing.assert_close(relevance, expected, rtol=0, atol=0)

    class Unwrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, embeds: torch.Tensor) -> object:
            return self.model(inputs_embeds=embeds)

    with pytest.raises(
        TypeError, match=r"must return a tensor, got CausalLMOutputWithPast: it holds \.logits"
    ):
        LRP(Unwrapped(), ATTN).attribute(embeds, target=(6, 17))


def _model_state(model: nn.Module) -> list:
    return [
        (
            id(m),
            dict(m.__dict__.get("_forward_hooks", {})),
            dict(m.__dict__.get("_forward_pre_hooks", {})),
            "forward" in m.__dict__,
            "rule" in m.__dict__,
        )
        for m in model.modules()
    ] + [(k, v.clone()) for k, v in model.state_dict().items()]


def _same_state(first: list, second: list) -> bool:
    if len(first) != len(second):
        return False
    for a, b in zip(first, second):
        if isinstance(a[1], torch.Tensor):
            if a[0] != b[0] or not torch.equal(a[1], b[1]):
                return False
        elif a != b:
            return False
    return True


def test_the_model_is_left_as_found() -> None:
    model = _build("gpt2", "eager")
    wrapper = Logits(model, -1)
    embeds, mask, target = _inputs("gpt2")
    before = _model_state(wrapper)
    LRP(wrapper, ATTN).attribute(embeds, target=target, additional_forward_args=(mask,))
    LayerLRP(wrapper, model.transformer.h[0], ATTN).attribute(
        embeds, target=target, additional_forward_args=(mask,)
    )
    assert _same_state(before, _model_state(wrapper))

    def fail(module: nn.Module, args: tuple) -> None:
        raise RuntimeError("the second block fails")

    handle = model.transformer.h[1].register_forward_pre_hook(fail)
    before = _model_state(wrapper)
    with pytest.raises(RuntimeError, match="second block"):
        LayerLRP(wrapper, model.transformer.h[0], ATTN).attribute(
            embeds, target=target, additional_forward_args=(mask,)
        )
    assert _same_state(before, _model_state(wrapper))
    handle.remove()


# ---------------------------------------------------------------------------------------------
# Attention written in plain torch, F.scaled_dot_product_attention, nn.MultiheadAttention: lxt's
# rules written out with autograd (its efficient mode's divide_gradient: the query's and key's
# gradients divided by 4, the value's by 2, plain gradients elsewhere) are the oracle.


class Attention(nn.Module):
    """A pre-norm attention block and a classifier, with its attention written in one of three
    ways; ``lxt`` applies lxt's gradient rules (for the oracle)."""

    def __init__(self, spelling: str, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.spelling, self.heads = spelling, heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.up, self.act, self.down = nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, 3)
        self.lxt = False

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.lxt:
            q, k, v = divide_gradient(q, 4), divide_gradient(k, 4), divide_gradient(v, 2)
        if self.spelling == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        return torch.softmax(scores, dim=-1) @ v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lxt:  # lxt's layer norm: the standard deviation detached
            mean = x.mean(-1, keepdim=True)
            std = ((x - mean) ** 2).mean(-1, keepdim=True).add(self.norm.eps).sqrt().detach()
            normed = (x - mean) / std * self.norm.weight + self.norm.bias
        else:
            normed = self.norm(x)
        q, k, v = self.qkv(normed).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        x = x + self.out(self.attend(q, k, v).transpose(1, 2).flatten(2))
        hidden = self.up(x)
        if self.lxt:  # the identity rule as lxt writes it: gradient times output / input
            hidden = hidden * (self.act(hidden) / hidden).detach()
        else:
            hidden = self.act(hidden)
        x = x + self.down(hidden)
        return self.head(x.mean(1))


def _lxt_relevance(model: nn.Module, x: torch.Tensor, target: list[int]) -> torch.Tensor:
    model.lxt = True
    try:
        leaf = x.clone().requires_grad_()
        output = model(leaf).gather(1, torch.tensor(target).view(-1, 1)).sum()
        (gradient,) = torch.autograd.grad(output, leaf)
    finally:
        model.lxt = False
    return x * gradient


def _seeded(module: nn.Module) -> nn.Module:
    torch.manual_seed(4)
    for parameter in module.parameters():
        nn.init.normal_(parameter, std=0.4)
    return module.double().eval()


@pytest.mark.parametrize("spelling", ["plain", "sdpa"])
def test_attention_in_plain_torch_and_sdpa_equal_lxt(spelling: str) -> None:
    model = _seeded(Attention(spelling))
    x = torch.randn(3, 6, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    target = [0, 2, 1]
    with _stabilizers(model, TINY) as canonizers:
        relevance = LRP(model, canonizers).attribute(x, target=target)
    assert _relative(relevance, _lxt_relevance(model, x, target)) < PARITY


def test_sdpa_rule_is_the_rules_one_by_one() -> None:
    """One pass of the attention's own backward (shares 1/4, 1/4, 1/2) gives what the uniform,
    softmax and bias rules give applied to the attention written out."""
    plain, fused = _seeded(Attention("plain")), _seeded(Attention("sdpa"))
    x = torch.randn(3, 6, 16, dtype=torch.float64)
    with _stabilizers(plain, TINY) as canonizers, _stabilizers(fused, TINY):
        written_out = LRP(plain, canonizers).attribute(x, target=1)
        in_one = LRP(fused, canonizers).attribute(x, target=1)
    torch.testing.assert_close(written_out, in_one, rtol=1e-9, atol=1e-14)


class ScaledScores(nn.Module):
    """Attention as transformers' eager paths write it: ``q @ k^T`` scaled by a number, masked
    (``-inf`` and the dtype's lowest), the softmax, ``@ v``. ``spelling``: how the scores are
    scaled (a Python number three ways, a 0-d tensor, in place); ``masking``: how they are
    masked (a mask of zeros added, to a view as Swin does, ``masked_fill``, ``torch.where`` as
    GPT-2 does)."""

    def __init__(self, spelling: str, masking: str = "add", dim: int = 8) -> None:
        super().__init__()
        self.spelling, self.masking = spelling, masking
        self.q, self.k, self.v = (nn.Linear(dim, dim) for _ in range(3))
        self.head = nn.Linear(dim, 3)

    def scaled(self, scores: torch.Tensor) -> torch.Tensor:
        if self.spelling == "times":
            return scores * 0.125
        if self.spelling == "times_left":
            return 0.125 * scores
        if self.spelling == "divided":
            return scores / 8
        if self.spelling == "tensor":
            return scores * torch.tensor(0.125, dtype=scores.dtype)
        scores /= 8  # in place
        return scores

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = self.scaled(self.q(x) @ self.k(x).transpose(-1, -2))
        if self.masking == "add":
            scores = scores + mask
        elif self.masking == "viewed":  # as Swin's windows: viewed, masked, viewed back
            scores = (scores.unflatten(0, (-1, 1)) + mask.unsqueeze(1)).flatten(0, 1)
        elif self.masking == "masked_fill":
            scores = scores.masked_fill(mask != 0, torch.finfo(scores.dtype).min)
        else:
            lowest = torch.full([], torch.finfo(scores.dtype).min, dtype=scores.dtype)
            scores = torch.where(mask == 0, scores, lowest)
        return self.head((torch.softmax(scores, dim=-1) @ self.v(x)).mean(1))


def _scaled_scores_case(
    spelling: str, epsilon: float, masking: str = "add"
) -> tuple[torch.Tensor, int]:
    """LRP's relevance on ScaledScores, and how many tensors of the scores' shape the
    backward read from what the graph kept (distinct storages)."""
    model = _seeded(ScaledScores(spelling, masking))
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(3, 5, 8, dtype=torch.float64, generator=generator)
    mask = torch.zeros(3, 1, 5, dtype=torch.float64)
    mask[0, :, 4], mask[1, :, 3:] = float("-inf"), torch.finfo(torch.float64).min
    kept: set[int] = set()

    def unpack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.shape == (3, 5, 5):
            kept.add(tensor.untyped_storage().data_ptr())
        return tensor

    with _stabilizers(model, epsilon) as canonizers:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, unpack):
            relevance = LRP(model, canonizers).attribute(
                x, target=[0, 2, 1], additional_forward_args=(mask,)
            )
    return relevance, len(kept)


@pytest.mark.parametrize(
    ("spelling", "masking"),
    [
        ("times", "add"),
        ("times_left", "add"),
        ("divided", "add"),
        ("times", "masked_fill"),
        ("divided", "where"),
        ("times_left", "viewed"),
    ],
)
def test_softmax_of_scaled_scores_hands_its_contribution_to_the_scores(
    spelling: str, masking: str
) -> None:
    """Scores scaled by a number and masked: the softmax's node sends ``scale * (R - s *
    sum(R))`` straight to ``q @ k^T`` and keeps the softmax alone for the backward, where the
    rule's relevance divided by the scores at their ratio would keep the scores, the scaled
    scores and the softmax. The relevance is the ratio's, to what its stabilizer changes."""
    relevance, kept = _scaled_scores_case(spelling, TINY, masking)
    as_written, kept_as_written = _scaled_scores_case("tensor", TINY, masking)
    assert (kept, kept_as_written) == (1, 3)
    torch.testing.assert_close(relevance, as_written, rtol=1e-10, atol=1e-14)
    # At the default stabilizer, 1e-9, the ratio at the scores moves the relevance by about
    # that much of its size.
    default, _ = _scaled_scores_case(spelling, 1e-9, masking)
    default_as_written, _ = _scaled_scores_case("tensor", 1e-9, masking)
    assert _relative(default, default_as_written) < 1e-7


def test_layer_lrp_reads_the_scores_a_softmax_would_pass_by() -> None:
    """LayerLRP at the layer whose output a softmax reads: its relevance is the softmax rule's
    at its input, though the softmax could hand its contribution past it."""
    model = _seeded(nn.Sequential(nn.Linear(4, 6), nn.Softmax(dim=-1), nn.Linear(6, 3)))
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    at_scores, at_softmax = LayerLRP(model, [model[0], model[1]], ATTN).attribute(x, target=1)
    scores = model[0](x).detach()
    expected = ops.softmax_relevance(scores, torch.softmax(scores, -1), at_softmax, -1)
    torch.testing.assert_close(at_scores, expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "vit"])
def test_hf_eager_attention_keeps_the_softmax_alone(family: str) -> None:
    """transformers' eager attention (BERT's scores divided by a number and a padding mask
    added, GPT-2's divided by a 0-d tensor and masked by torch.where (the ratio kept),
    LLaMA's multiplied and a causal mask added, ViT's unmasked; the softmax in float32 for the
    last two): of the tensors of the scores' shape, the backward reads the softmax's
    output (and its copy in the model's dtype) alone, not the scores."""
    model = Logits(_build(family, "eager"), _position(family))
    inputs, mask, target = _inputs(family)
    kept: dict[int, torch.Tensor] = {}
    heads = model.model.config.num_attention_heads

    def unpack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dim() == 4 and tensor.shape[1] == heads and tensor.shape[-1] == tensor.shape[-2]:
            kept[tensor.untyped_storage().data_ptr()] = tensor.detach().double()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, unpack):
        LRP(model, ATTN).attribute(
            inputs, target=target, additional_forward_args=None if mask is None else (mask,)
        )
    assert len(kept) >= model.model.config.num_hidden_layers
    # probabilities, each row summing to one
    rows = [bool(torch.allclose(t.sum(-1), torch.ones_like(t[..., 0]))) for t in kept.values()]
    assert all(rows) == (family != "gpt2")


@pytest.mark.parametrize("spelling", ["times", "in_place"])
def test_scaled_scores_keep_their_ratio_where_it_stabilizes(spelling: str) -> None:
    """With a stabilizer larger than the default, which damps scores near zero on purpose, and
    where the forward scales the scores in place, the ratio at the scores runs as written."""
    damped, kept = _scaled_scores_case(spelling, 0.25)
    as_written, _ = _scaled_scores_case("tensor", 0.25)
    assert kept == 3
    torch.testing.assert_close(damped, as_written, rtol=1e-12, atol=1e-14)
    undamped, _ = _scaled_scores_case("tensor", TINY)
    assert _relative(damped, undamped) > 1e-3


class CosineAttention(nn.Module):
    """Swin V2's cosine attention: queries and keys normalized (``F.normalize``), their
    products scaled by a learned logit scale; ``lxt`` applies lxt's gradient rules, the
    identity rule on ``F.normalize`` included (for the oracle)."""

    def __init__(self, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones(heads, 1, 1)))
        self.head = nn.Linear(dim, 3)
        self.lxt = False

    def normalize(self, t: torch.Tensor) -> torch.Tensor:
        if self.lxt:
            return identity_rule_implicit(lambda u: F.normalize(u, dim=-1), t)
        return F.normalize(t, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        if self.lxt:
            q, k, v = divide_gradient(q, 4), divide_gradient(k, 4), divide_gradient(v, 2)
        scores = self.normalize(q) @ self.normalize(k).transpose(-2, -1)
        scores = scores * torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
        attended = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).flatten(2)
        return self.head(attended.mean(1))


def test_cosine_attention_s_normalize_passes_relevance_as_lxt_s_identity_rule() -> None:
    model = _seeded(CosineAttention())
    x = torch.randn(3, 5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    target = [0, 2, 1]
    with _stabilizers(model, TINY) as canonizers:
        relevance = LRP(model, canonizers).attribute(x, target=target)
    assert _relative(relevance, _lxt_relevance(model, x, target)) < PARITY


class MixtureOfExperts(nn.Module):
    """Mixtral's sparse MoE block between a linear layer and a head; ``lxt`` runs the block as
    written out below, with lxt's gradient rules (for the oracle)."""

    def __init__(self) -> None:
        super().__init__()
        config = transformers.MixtralConfig(
            hidden_size=8, intermediate_size=12, num_local_experts=4, num_experts_per_tok=2
        )
        self.embed = nn.Linear(8, 8)
        self.moe = transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock(config)
        self.head = nn.Linear(8, 3)
        self.lxt = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        y = _lxt_mixture(self.moe, h) if self.lxt else self.moe(h)[0]
        return self.head((h + y).mean(1))


def _lxt_mixture(moe: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The block with lxt's rules: the uniform rule on each gated product and on an expert's
    output times its routing weight, the identity rule on the activation, and the routing
    weights' renormalizing sum held fixed (plain gradients through softmax and top-k)."""
    flat = h.flatten(0, 1)
    weights, chosen = F.softmax(moe.gate(flat), dim=-1).topk(moe.top_k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True).detach()
    out = torch.zeros_like(flat)
    for slot in range(moe.top_k):
        for index, expert in enumerate(moe.experts):
            rows = (chosen[:, slot] == index).nonzero()[:, 0]
            gate = expert.w1(flat[rows])
            gate = gate * (expert.act_fn(gate) / gate).detach()
            hidden = expert.w2(divide_gradient(gate * expert.w3(flat[rows]), 2))
            out = out.index_add(0, rows, divide_gradient(hidden * weights[rows, slot, None], 2))
    return out.view_as(h)


def test_a_mixture_of_experts_equals_lxt_s_rules() -> None:
    """Mixtral's routing: softmax by its rule, top-k a selection, the routing weights divided by
    their own sum a normalization (the sum held fixed), each expert's output times its weight
    the uniform rule, index_add_ a sum."""
    model = _seeded(MixtureOfExperts())
    x = torch.randn(3, 5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    target = [0, 2, 1]
    with _stabilizers(model, TINY) as canonizers:
        relevance = LRP(model, canonizers).attribute(x, target=target)
    assert _relative(relevance, _lxt_relevance(model, x, target)) < PARITY


def test_a_divisor_that_carries_relevance_and_is_not_the_dividend_s_sum_is_refused() -> None:
    model = Calls(lambda h: h / (h.sum(-1, keepdim=True) + 1.0)).double()
    with pytest.raises(TypeError, match=r"no rule for \S*div by a divisor other than the"):
        LRP(model, ATTN).attribute(torch.randn(2, 4, dtype=torch.float64), target=0)


@contextlib.contextmanager
def _lxt_t5(model: nn.Module) -> Iterator[None]:
    """T5 under lxt's rules, written out with autograd: the RMS of its norms detached, the
    gradients at the query, key and value divided by 4, 4 and 2 (plain gradients elsewhere)."""
    from transformers.models.t5.modeling_t5 import T5Attention, T5LayerNorm

    def rms_norm(norm: nn.Module, h: torch.Tensor) -> torch.Tensor:
        rms = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        return norm.weight * (h * rms.detach())

    def divided(factor: int):
        return lambda module, args, output: divide_gradient(output, factor)

    handles, norms = [], [m for m in model.modules() if isinstance(m, T5LayerNorm)]
    for heads in (m for m in model.modules() if isinstance(m, T5Attention)):
        for projection, factor in ((heads.q, 4), (heads.k, 4), (heads.v, 2)):
            handles.append(projection.register_forward_hook(divided(factor)))
    for norm in norms:
        norm.forward = functools.partial(rms_norm, norm)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for norm in norms:
            del norm.forward


class Seq2SeqLogits(nn.Module):
    """An encoder-decoder's logits at the last decoder position, explained at the encoder's
    inputs; the decoder's tokens are fixed."""

    def __init__(self, model: nn.Module, decoder_ids: torch.Tensor) -> None:
        super().__init__()
        self.model, self.decoder_ids = model, decoder_ids

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        outputs = self.model(inputs_embeds=embeds, decoder_input_ids=self.decoder_ids)
        return outputs.logits[:, -1]


def test_an_encoder_decoder_s_cross_attention_shares_between_both_sides() -> None:
    """T5's decoder tokens, embedded from ids, are an activation though only the encoder's
    inputs are attributed: cross-attention's q @ k^T gets the uniform rule (half of it to the
    encoder's keys), as lxt's rules give it, and LayerLRP reading the decoder's embedding as
    well leaves the encoder's relevance as it is."""
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=100, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8,
    )  # fmt: skip
    t5 = transformers.T5ForConditionalGeneration(config).double().eval()
    model = Seq2SeqLogits(t5, torch.tensor([[0, 5, 9], [0, 7, 3]]))
    x = torch.randn(2, 6, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    target = [5, 17]
    with _stabilizers(model, TINY) as canonizers:
        relevance = LRP(model, canonizers).attribute(x, target=target)
        block = t5.encoder.block[1]
        alone = LayerLRP(model, block, canonizers).attribute(x, target=target)[0]
        with_decoder = LayerLRP(model, [block, t5.shared], canonizers).attribute(x, target=target)
    torch.testing.assert_close(with_decoder[0][0], alone, rtol=0, atol=0)
    leaf = x.clone().requires_grad_()
    with _lxt_t5(t5):
        output = model(leaf).gather(1, torch.tensor(target).view(-1, 1)).sum()
        (gradient,) = torch.autograd.grad(output, leaf)
    assert _relative(relevance, x * gradient) < PARITY


def test_an_encoder_decoder_s_eager_and_sdpa_attention_agree() -> None:
    """BART explained at the encoder's inputs: the SDPA rule's shares and the eager path's
    uniform rule at each matrix product agree in cross-attention too, where the queries come
    from the decoder's tokens."""
    relevance = []
    for attn in ("eager", "sdpa"):
        torch.manual_seed(0)
        config = transformers.BartConfig(
            vocab_size=100, d_model=16, encoder_layers=1, decoder_layers=1,
            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=32,
            decoder_ffn_dim=32, max_position_embeddings=16, attn_implementation=attn,
        )  # fmt: skip
        bart = transformers.BartForConditionalGeneration(config).double().eval()
        model = Seq2SeqLogits(bart, torch.tensor([[0, 5, 9], [0, 7, 3]]))
        x = torch.randn(2, 6, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
        with _stabilizers(model, TINY) as canonizers:
            relevance.append(LRP(model, canonizers).attribute(x, target=[5, 17]))
    assert _relative(relevance[0], relevance[1]) < 1e-9


class GatedMLP(nn.Module):
    """A SwiGLU block over tokens: down(silu(gate(x)) * up(x)), summed over the tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(16, 24), nn.Linear(16, 24), nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x)).sum(1)


@pytest.mark.parametrize(
    ("make_model", "name", "functions", "count"),
    [
        (lambda: Attention("plain"), "lrp_uniform_matmul_node", "_MATMULS", 2),
        (GatedMLP, "lrp_uniform_product_node", "_PRODUCTS", 1),
    ],
    ids=["matmul", "product"],
)
def test_a_product_of_two_activations_is_one_node_that_gives_the_rules_result(
    monkeypatch: pytest.MonkeyPatch, make_model, name: str, functions: str, count: int
) -> None:
    """q @ k^T and probs @ v run as lrp_uniform_matmul_node, silu(gate) * up as
    lrp_uniform_product_node: the same relevance as the share nodes around torch.matmul and
    torch.mul, which run instead under autocast (whose casts the nodes would skip)."""
    model = _seeded(make_model())
    x = torch.randn(3, 6, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    nodes: list[str] = []
    node = getattr(ops, name)

    def counted(*args: torch.Tensor) -> torch.Tensor:
        nodes.append(name)
        return node(*args)

    monkeypatch.setattr(ops, name, counted)
    relevance = LRP(model, [AttnLRP()]).attribute(x, target=1)
    assert nodes == [name] * count
    with monkeypatch.context() as general:
        general.setattr(attention, functions, frozenset())
        expected = LRP(model, [AttnLRP()]).attribute(x, target=1)
    torch.testing.assert_close(relevance, expected, rtol=1e-12, atol=1e-15)
    model.float()
    nodes.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = LRP(model, [AttnLRP()]).attribute(x.float(), target=1)
        with monkeypatch.context() as general:
            general.setattr(attention, functions, frozenset())
            expected = LRP(model, [AttnLRP()]).attribute(x.float(), target=1)
    assert nodes == []
    torch.testing.assert_close(under_autocast, expected, rtol=0, atol=0)


class Multihead(nn.Module):
    def __init__(self, need_weights: bool) -> None:
        super().__init__()
        self.need_weights = need_weights
        self.attention = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 3)
        self.lxt = False

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        if self.lxt:  # the same attention written out, with lxt's gradient rules
            attention = self.attention
            q, k, v = F.linear(x, attention.in_proj_weight, attention.in_proj_bias).chunk(3, -1)
            q, k, v = (t.unflatten(-1, (2, -1)).transpose(1, 2) for t in (q, k, v))
            q, k, v = divide_gradient(q, 4), divide_gradient(k, 4), divide_gradient(v, 2)
            bias = torch.zeros(padding.shape, dtype=x.dtype).masked_fill(padding, float("-inf"))
            mixed = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[:, None, None, :])
            mixed = attention.out_proj(mixed.transpose(1, 2).flatten(2))
        else:
            mixed, _ = self.attention(
                x, x, x, key_padding_mask=padding, need_weights=self.need_weights
            )
        return self.head(mixed.mean(1))


@pytest.mark.parametrize("need_weights", [True, False])
def test_multihead_attention_equals_lxt(need_weights: bool) -> None:
    model = _seeded(Multihead(need_weights))
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    with _stabilizers(model, TINY) as canonizers:
        relevance = LRP(model, canonizers).attribute(
            x, target=[2, 0], additional_forward_args=(padding,)
        )
    model.lxt = True
    leaf = x.clone().requires_grad_()
    output = model(leaf, padding).gather(1, torch.tensor([[2], [0]])).sum()
    (gradient,) = torch.autograd.grad(output, leaf)
    assert _relative(relevance, x * gradient) < PARITY


# ---------------------------------------------------------------------------------------------
# Conservation


class Conserving(nn.Module):
    """A transformer block without biases, its attention's softmax an nn.Softmax (so that
    LayerLRP can measure what the softmax rule leaves out)."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, bias=False)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.softmax = nn.Softmax(dim=-1)
        self.gate, self.up = nn.Linear(dim, 32, bias=False), nn.Linear(dim, 32, bias=False)
        self.act, self.down = nn.SiLU(), nn.Linear(32, dim, bias=False)
        self.head = nn.Linear(dim, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        weights = self.softmax(self.q(h) @ self.k(h).transpose(-1, -2) / 4)
        x = x + self.o(weights @ self.v(h))
        x = x + self.down(self.act(self.gate(x)) * self.up(x))  # a gated MLP (SwiGLU)
        return self.head(x.sum(1))


def test_relevance_is_conserved_but_for_the_softmax_rule() -> None:
    """Without biases and stabilizers, the target output misses the relevance at the inputs by
    exactly what the softmax rule leaves out (AttnLRP's Proposition 3.1 drops the bias term of
    its Taylor expansion): every other rule conserves."""
    model = _seeded(Conserving())
    x = torch.randn(3, 5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    with _stabilizers(model, TINY) as canonizers:
        relevance, delta = LRP(model, canonizers).attribute(
            x, target=2, return_convergence_delta=True
        )
        into, out_of = (
            LayerLRP(model, model.softmax, canonizers).attribute(
                x, target=2, attribute_to_layer_input=flag
            )
            for flag in (True, False)
        )
    leak = out_of.flatten(1).sum(1) - into.flatten(1).sum(1)
    torch.testing.assert_close(delta, leak, rtol=1e-9, atol=1e-12)
    assert leak.abs().min() > 1e-6  # a real leak, not a vacuous comparison
    output = model(x)[:, 2]
    torch.testing.assert_close(relevance.flatten(1).sum(1) + leak, output, rtol=1e-9, atol=1e-12)


class _SoftmaxLeak(OpRule):
    """The softmax rule, measuring per example what it leaves out: the relevance at its output
    less the relevance at its input."""

    def __init__(self, rule: OpRule, leaks: list[torch.Tensor]) -> None:
        self.rule, self.leaks, self.functions = rule, leaks, rule.functions

    def apply(self, relevance, func, args, kwargs):
        scores = args[0].view_as(args[0])  # private: its gradient is the softmax's alone
        probs = self.rule.apply(relevance, func, (scores, *args[1:]), kwargs)
        probs.register_hook(lambda r: self.leaks.append(r.flatten(1).sum(1)))
        scores.register_hook(lambda r: self.leaks.append(-r.flatten(1).sum(1)))
        return probs


class _LeakyAttnLRP(AttnLRP):
    """AttnLRP with its softmax op rules measuring their leaks (a user's canonizer)."""

    def __init__(self, epsilon: float, leaks: list[torch.Tensor]) -> None:
        super().__init__(epsilon)
        self.leaks = leaks

    def op_rules(self):
        return tuple(
            _SoftmaxLeak(rule, self.leaks) if isinstance(rule, SoftmaxOpRule) else rule
            for rule in super().op_rules()
        )


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_hf_relevance_conserved_but_for_the_softmax_rule(family: str) -> None:
    """With biases (the embeddings of positions and token types included) and stabilizers gone,
    the logit misses the relevance at the input embeddings by what the softmax rules leave
    out, to rounding."""
    model = _build(family, "eager")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or any(e in name for e in ("position", "token_type", "wpe")):
                parameter.zero_()
    embeds, mask, target = _inputs(family)
    leaks: list[torch.Tensor] = []
    with _stabilizers(model, TINY):
        lrp = LRP(Logits(model, _position(family)), [_LeakyAttnLRP(TINY, leaks)])
        _, delta = lrp.attribute(
            embeds, target=target, additional_forward_args=(mask,), return_convergence_delta=True
        )
    assert len(leaks) == 2 * 2  # two layers, into and out of each softmax
    # The backward runs on relevance divided by the target output (as captum's, starting from
    # 1), so the hooks measured the leaks in those units.
    logits = Logits(model, _position(family))(embeds, mask)
    output = logits.gather(1, torch.tensor(target).view(-1, 1)).flatten().detach()
    torch.testing.assert_close(delta, sum(leaks) * output, rtol=1e-8, atol=1e-13)
    assert delta.abs().min() > 1e-6  # a real leak, not a vacuous comparison


class Embeddings(nn.Module):
    """BERT's embeddings' pattern: a sum of activations written into in place, in a module of
    its own, then a residual sum that nothing writes into."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)
        self.in_place = True
        self.forwards = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.forwards += 1
        h = self.fc(x) + x
        if self.in_place:
            h += torch.tanh(x)
        else:
            h = h + torch.tanh(x)
        return self.head(self.fc(h) + h)


def test_a_sum_written_into_is_copied_there_from_the_second_call_on() -> None:
    """Sums are handed on uncopied; the first write into one runs the forward again with a copy
    at that site alone, and the LRP object remembers the site."""
    model = Embeddings().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    lrp = LRP(model, ATTN)
    first = lrp.attribute(x, target=1)
    assert model.forwards == 2 and len(lrp._copied_sites) == 1
    second = lrp.attribute(x, target=1)
    assert model.forwards == 3  # no retry once the site is known
    model.in_place = False
    expected = LRP(model, ATTN).attribute(x, target=1)
    torch.testing.assert_close(first, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(second, expected, rtol=1e-12, atol=0)


class ResidualBranch(nn.Module):
    """A residual sum whose branch ends in a linear layer, then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(x) + x)


def _epsilon_ratio(relevance: torch.Tensor, z: torch.Tensor, epsilon: float) -> torch.Tensor:
    return relevance / (z + epsilon * (2 * (z >= 0).to(z.dtype) - 1))


@pytest.mark.parametrize("epsilon", [0.0, 0.3])
def test_a_sum_hands_its_contribution_straight_to_the_linear_layer_of_its_branch(
    epsilon: float,
) -> None:
    """The branch's output times the sum's contribution, divided by that output (stabilized),
    is the contribution again but for epsilon: the layer receives it unchanged, written out
    here; taking the ratio instead parts from it once epsilon is large."""
    torch.manual_seed(0)
    model = ResidualBranch().double()
    for module in model.children():
        module.rule = EpsilonRule(epsilon)
    x = torch.randn(6, 4, dtype=torch.float64)
    target = 2
    relevance = LRP(model, [AttnLRP(epsilon)]).attribute(x, target=target)

    z = model.fc(x)
    total = z + x
    y = model.head(total)
    start = torch.zeros_like(y)
    start[:, target] = 1.0
    at_total = total * (_epsilon_ratio(start, y, epsilon) @ model.head.weight)
    contribution = _epsilon_ratio(at_total, total, epsilon)
    at_x_residual = x * contribution
    scale = y[:, target : target + 1]  # LRP's relevance, as captum's, is that of the target
    expected = (at_x_residual + x * (contribution @ model.fc.weight)) * scale
    torch.testing.assert_close(relevance, expected.detach(), rtol=1e-12, atol=1e-14)
    through_ratio = _epsilon_ratio(z * contribution, z, epsilon)
    taken = (at_x_residual + x * (through_ratio @ model.fc.weight)) * scale
    if epsilon:
        assert not torch.allclose(relevance, taken.detach(), rtol=1e-6, atol=0)
    # LayerLRP still reads the relevance at the branch's output: the output times the
    # contribution.
    at_branch = LayerLRP(model, model.fc, [AttnLRP(epsilon)]).attribute(x, target=target)
    torch.testing.assert_close(at_branch, (z * contribution * scale).detach(), rtol=1e-12, atol=0)


def test_the_branch_s_output_is_not_used_by_the_backward() -> None:
    model = ResidualBranch()
    outputs: list[int] = []
    model.fc.register_forward_hook(lambda module, args, output: outputs.append(output.data_ptr()))
    used: list[int] = []

    def unpack(tensor: torch.Tensor) -> torch.Tensor:
        used.append(tensor.data_ptr())  # a saved tensor the backward reads
        return tensor

    x = torch.randn(5, 4)
    with torch.autograd.graph.saved_tensors_hooks(lambda tensor: tensor, unpack):
        LRP(model, ATTN).attribute(x, target=0)
        (branch,) = outputs
        assert used and branch not in used
        # Read by a layer (not a sum), the same output is: that product does not cancel.
        outputs.clear()
        used.clear()
        LRP(nn.Sequential(model.fc, model.head), ATTN).attribute(x, target=0)
        assert outputs[0] in used


def test_a_tensor_property_is_computed_once_per_call_while_unchanged() -> None:
    from fastattr.lrp import Relevance
    from fastattr.lrp.propagation import plan_rules

    calls = []

    def largest(t: torch.Tensor) -> float:
        calls.append(t)
        return float(t.max())

    relevance = Relevance(plan_rules(nn.Linear(2, 2)))
    mask = torch.zeros(3)
    assert relevance.memoized(largest, mask) == relevance.memoized(largest, mask) == 0.0
    assert len(calls) == 1
    mask.add_(1.0)  # changed: computed again
    assert relevance.memoized(largest, mask) == 1.0 and len(calls) == 2
    assert relevance.memoized(largest, mask.clone()) == 1.0 and len(calls) == 3


# ---------------------------------------------------------------------------------------------
# What has no rule


class Calls(nn.Module):
    def __init__(self, call) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.call = call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.call(self.fc(x)).sum(1, keepdim=True)


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda h: torch.cumprod(h, -1), "cumprod"),
        (lambda h: h.exp(), "exp"),
        (lambda h: h / (h + 1.0), "div"),
        (lambda h: torch.log_softmax(h, -1), "log_softmax"),
    ],
)
def test_a_call_without_a_rule_is_refused(call, name: str) -> None:
    model = Calls(call).double()
    before = _model_state(model)
    with pytest.raises(TypeError, match=rf"no rule for \S*{name}.*module\.rule"):
        LRP(model, ATTN).attribute(torch.randn(2, 4, dtype=torch.float64), target=0)
    assert _same_state(before, _model_state(model))


def test_point_wise_calls_and_reshapes_pass() -> None:
    model = Calls(lambda h: torch.tanh(h).flatten(1).unsqueeze(-1).squeeze(-1) * 2.0).double()
    x = torch.randn(2, 4, dtype=torch.float64)
    with _stabilizers(model, TINY) as canonizers:
        relevance = LRP(model, canonizers).attribute(x, target=0)
        # The identity rule for tanh and for a constant factor: relevance passes to fc's output.
        at_fc = LayerLRP(model, model.fc, canonizers).attribute(x, target=0)
    output = model(x)[:, 0]
    torch.testing.assert_close(at_fc.sum(1), output, rtol=1e-9, atol=0)
    assert relevance.shape == x.shape


@pytest.mark.parametrize(
    "clamp",
    [
        lambda h: h.clamp(-0.3, 0.3),
        lambda h: torch.clip(h, -0.3, 0.3),
        lambda h: h.clone().clamp_(min=-0.3, max=0.3),
    ],
    ids=["clamp", "clip", "clamp_"],
)
def test_a_clamp_passes_relevance_as_hardtanh_does(clamp) -> None:
    """OLMo clips its queries, keys and values in place (clip_qkv): a clamp is point-wise, and
    gets the identity rule of nn.Hardtanh, which is the same map."""
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    torch.manual_seed(0)
    clamped = Calls(clamp).double()
    torch.manual_seed(0)
    expected = LRP(Calls(nn.Hardtanh(-0.3, 0.3)).double(), ATTN).attribute(x, target=0)
    relevance = LRP(clamped, ATTN).attribute(x, target=0)
    torch.testing.assert_close(relevance, expected, rtol=0, atol=0)
    assert (clamped.fc(x).abs() > 0.3).any()


def test_broadcast_to_moves_relevance_as_expand_does() -> None:
    x = torch.randn(2, 4, dtype=torch.float64)
    results = []
    for spread in (lambda h: h.expand(3, -1, -1), lambda h: torch.broadcast_to(h, (3, 2, 4))):
        torch.manual_seed(0)
        model = Calls(lambda h, spread=spread: spread(h).sum(0)).double()
        results.append(LRP(model, ATTN).attribute(x, target=0))
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)


def test_without_the_canonizer_captum_s_refusal_names_it() -> None:
    """AttnLRP's rules are a canonizer passed by name: without it, LRP reads a transformer as
    captum does (no rule for layer norm or embeddings), and the error says what to pass."""
    model = _build("bert", "eager")
    embeds, mask, target = _inputs("bert")
    with pytest.raises(TypeError, match=r"LayerNorm \(.*canonizers=\[AttnLRP\(\)\]"):
        LRP(Logits(model)).attribute(embeds, target=target, additional_forward_args=(mask,))


class ChannelsFirstNorm(nn.LayerNorm):
    """A layer norm over the channels of (batch, channels, height, width), as ConvNeXt's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Normed(nn.Module):
    def __init__(self, norm: nn.Module, channels_last: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 1)
        self.norm = norm
        self.channels_last = channels_last
        self.head = nn.Linear(4 * 3 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        if self.channels_last:
            h = self.norm(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        else:
            h = self.norm(h)
        return self.head(h.flatten(1))


def test_a_layer_norm_that_replaces_its_forward_runs_its_own_forward() -> None:
    """A subclass of nn.LayerNorm with a forward of its own (here the width equals the channels,
    so recomputing nn.LayerNorm's forward on its input would run, wrongly) gets the op rules
    inside its forward: the relevance of the same model with the permutes outside."""
    torch.manual_seed(0)
    subclassed = Normed(ChannelsFirstNorm(4), channels_last=False).double().eval()
    plain = Normed(nn.LayerNorm(4), channels_last=True).double().eval()
    plain.load_state_dict(subclassed.state_dict())
    x = torch.randn(2, 2, 3, 4, dtype=torch.float64)
    expected = LRP(plain, ATTN).attribute(x, target=0)
    relevance, delta = LRP(subclassed, ATTN).attribute(x, target=0, return_convergence_delta=True)
    torch.testing.assert_close(relevance, expected, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(relevance.flatten(1).sum(1) + delta, subclassed(x)[:, 0])
    with pytest.raises(TypeError, match=r"model.norm: LayerNormRule .*ChannelsFirstNorm replaces"):
        subclassed.norm.rule = LayerNormRule()
        LRP(subclassed).attribute(x, target=0)


def test_t5_s_rms_norm_named_layer_norm_passes_relevance_unchanged() -> None:
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), T5LayerNorm(4), nn.Flatten(), nn.Linear(12, 2)).double()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    at_output = LayerLRP(model, model[1], ATTN).attribute(x, target=1)
    at_input = LayerLRP(model, model[1], ATTN).attribute(x, target=1, attribute_to_layer_input=True)
    torch.testing.assert_close(at_input, at_output, rtol=0, atol=0)
    assert at_output.abs().max() > 1e-3


def test_bloom_s_gelu_written_in_its_own_code_passes_relevance_unchanged() -> None:
    """BLOOM's BloomGelu computes a tanh GELU from products of its input: it is point-wise, and
    gets the identity rule as GELU does, not the uniform rule on those products."""
    torch.manual_seed(0)
    config = transformers.BloomConfig(vocab_size=100, hidden_size=16, n_layer=1, n_head=2)
    model = transformers.BloomForCausalLM(config).double().eval()
    wrapper = Logits(model, -1)
    embeds, mask, _ = _inputs("gpt2")
    embeds, gelu = embeds[..., :16], model.transformer.h[0].mlp.gelu_impl
    args = dict(target=[5, 17], additional_forward_args=(mask,))
    at_output = LayerLRP(wrapper, gelu, ATTN).attribute(embeds, **args)
    at_input = LayerLRP(wrapper, gelu, ATTN).attribute(
        embeds, **args, attribute_to_layer_input=True
    )
    torch.testing.assert_close(at_input, at_output, rtol=0, atol=0)
    assert at_output.abs().sum() > 0


class PixelLogits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels).logits


def test_beit_s_relative_position_bias_tables_take_no_relevance() -> None:
    # The tables are read from parameters alone: the rule leaves them out of the relevance, as
    # any rule set by hand would (none reaches them), and the scores take them as a bias.
    def beit() -> nn.Module:
        torch.manual_seed(0)
        config = transformers.BeitConfig(
            hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            image_size=16, patch_size=8, num_labels=3, use_relative_position_bias=True,
        )  # fmt: skip
        return PixelLogits(transformers.BeitForImageClassification(config)).double().eval()

    model, by_hand = beit(), beit()
    tables = [m for m in by_hand.modules() if type(m).__name__ == "BeitRelativePositionBias"]
    assert len(tables) == 2
    for table in tables:
        table.rule = EpsilonRule()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    relevance = LRP(model, ATTN).attribute(x, target=1)
    torch.testing.assert_close(relevance, LRP(by_hand, ATTN).attribute(x, target=1), rtol=0, atol=0)
    assert relevance.isfinite().all() and relevance.abs().sum() > 0


def test_a_parameter_table_rule_refuses_an_input_that_carries_relevance() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)).double()
    model[1].rule = ParameterTableRule()
    with pytest.raises(TypeError, match=r"ParameterTableRule\(\) on Linear: an input carries"):
        LRP(model).attribute(torch.randn(3, 4, dtype=torch.float64), target=0)


def test_torchvision_convnext_runs_with_its_channels_first_layer_norms() -> None:
    from torchvision.models import convnext_tiny

    torch.manual_seed(0)
    model = convnext_tiny(num_classes=3).double().eval()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    relevance, delta = LRP(model, ATTN).attribute(x, target=1, return_convergence_delta=True)
    torch.testing.assert_close(relevance.flatten(1).sum(1) + delta, model(x)[:, 1])
    assert relevance.isfinite().all() and relevance.abs().sum() > 0


def test_a_module_without_a_rule_is_refused() -> None:
    class Recurrent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(4, 4, batch_first=True)
            self.norm = nn.LayerNorm(4)
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.norm(self.rnn(x)[0].mean(1)))

    with pytest.raises(TypeError, match=r"GRU \(model.rnn\).*module.rule") as refusal:
        LRP(Recurrent(), ATTN).attribute(torch.randn(2, 3, 4), target=0)
    # AttnLRP is passed: the error does not tell to pass it.
    assert "AttnLRP" not in str(refusal.value)


def test_captum_llm_attribution_accepts_no_lrp_method() -> None:
    """captum's LLMAttribution takes perturbation methods and LLMGradientAttribution
    LayerIntegratedGradients, LayerGradientXActivation and LayerGradientShap only: LayerLRP is
    used directly (see docs/lrp/transformers.md)."""
    from captum.attr import LLMAttribution, LLMGradientAttribution

    model = _build("llama", "eager")
    layer_lrp = LayerLRP(model, model.model.embed_tokens, ATTN)
    for wrapper in (LLMAttribution, LLMGradientAttribution):
        with pytest.raises(AssertionError, match="does not support"):
            wrapper(layer_lrp, tokenizer=None)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_the_benchmark_s_lxt_contender_agrees_and_undoes_its_patches(family: str) -> None:
    """fastattr bench's lxt contender (lxt's patches applied around each call only) gives lxt's
    relevance and leaves torch and transformers as they were."""
    from transformers.models.bert import modeling_bert
    from transformers.models.llama import modeling_llama

    from fastattr.bench.contenders import lxt_attnlrp
    from fastattr.bench.models import HuggingFaceLogits

    watched = (nn.LayerNorm, nn.Dropout, modeling_bert, modeling_llama, modeling_llama.LlamaMLP)
    before = [dict(vars(target)) for target in watched]
    model = HuggingFaceLogits(_build(family, "eager"), _position(family))
    embeds, mask, target = _inputs(family)
    arguments = {"inputs": embeds, "target": target[0], "additional_forward_args": (mask,)}
    relevance = lxt_attnlrp(model, arguments)()
    assert [dict(vars(target)) for target in watched] == before
    with _stabilizers(model, TINY) as canonizers:
        ours = LRP(model, canonizers).attribute(
            embeds, target=target[0], additional_forward_args=(mask,)
        )
    assert _relative(ours, relevance) < PARITY


@pytest.mark.cuda
@pytest.mark.parametrize(("family", "attn"), CASES)
def test_cuda_matches_cpu(family: str, attn: str) -> None:
    """AttnLRP's nodes on a GPU (the uniform matrix and element-wise products, the linear
    layers' rows, the softmax and layer-norm kernels) give the CPU's relevance, also per
    block."""
    model = Logits(_build(family, attn), _position(family))
    inputs, mask, target = _inputs(family)
    blocks = [model.model.get_submodule(BLOCKS[family][0].format(i)) for i in range(2)]

    def relevance(device: str) -> list[torch.Tensor]:
        model.to(device)
        args = None if mask is None else (mask.to(device),)
        x = inputs.to(device)
        found = LayerLRP(model, blocks, ATTN).attribute(
            x, target=target, additional_forward_args=args
        )
        found.append(LRP(model, ATTN).attribute(x, target=target, additional_forward_args=args))
        return [t.cpu() for r in found for t in (r if isinstance(r, tuple) else (r,))]

    on_cpu = relevance("cpu")
    for on_cuda, expected in zip(relevance("cuda"), on_cpu):
        torch.testing.assert_close(on_cuda, expected, rtol=1e-9, atol=1e-12)
