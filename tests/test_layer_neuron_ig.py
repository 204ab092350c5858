"""LayerIntegratedGradients and NeuronIntegratedGradients against captum, the identities that
tie them to IntegratedGradients, the model left as found, and bad input."""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
from torch import nn

import fastattr

captum_attr = pytest.importorskip("captum.attr")

METHODS = ["gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid"]
TOL = {torch.float64: {"rtol": 1e-10, "atol": 1e-12}, torch.float32: {"rtol": 1e-4, "atol": 1e-5}}


def assert_same(ours, theirs, dtype=torch.float64):
    """Same structure (list / tuple / tensor), same shapes and dtypes, close values."""
    assert type(ours) is type(theirs), (type(ours), type(theirs))
    if isinstance(theirs, (list, tuple)):
        assert len(ours) == len(theirs)
        for o, t in zip(ours, theirs):
            assert_same(o, t, dtype)
        return
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    torch.testing.assert_close(ours, theirs, **TOL[dtype])


def seeded(build, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return build().to(dtype).eval()


# ---------------------------------------------------------------------------------------------
# Models


def mlp():
    return nn.Sequential(
        nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Softplus(), nn.Linear(8, 3)
    )


def convnet():
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(3, 4, 3),
        nn.Softplus(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 3),
    )


class TextNet(nn.Module):
    """Token ids and an attention mask in, class scores out: embedding, masked mean, linear."""

    def __init__(self, vocab=20, dim=8, classes=3):
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim, padding_idx=0)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids, mask):
        hidden = torch.tanh(self.mix(self.embedding(ids)))
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
        return self.head(pooled)


class Split(nn.Module):
    """Returns a tuple of two tensors."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(5, 8)

    def forward(self, x):
        h = self.linear(x)
        return h[:, :4], torch.tanh(h[:, 4:])


class Combine(nn.Module):
    """Takes two tensors."""

    def forward(self, u, v):
        return torch.cat([u * v, u - v], 1)


class TwoInputNet(nn.Module):
    """Two inputs; ``split`` returns a tuple, ``combine`` takes two tensors, ``side`` is a
    branch of its own (independent of ``split`` and ``combine``)."""

    def __init__(self):
        super().__init__()
        self.split = Split()
        self.combine = Combine()
        self.side = nn.Linear(2, 3)
        self.head = nn.Linear(11, 3)

    def forward(self, x, y, scale=1.0):
        u, v = self.split(x)
        return self.head(torch.cat([self.combine(u, v), torch.tanh(self.side(y))], 1)) * scale


class Branches(nn.Module):
    """Two layers reading the same input."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 4)
        self.b = nn.Linear(5, 3)
        self.head = nn.Linear(7, 3)

    def forward(self, x):
        return self.head(torch.cat([torch.tanh(self.a(x)), torch.sigmoid(self.b(x))], 1))


def two_inputs(batch=4, dtype=torch.float64):
    torch.manual_seed(1)
    return torch.randn(batch, 5, dtype=dtype), torch.randn(batch, 2, dtype=dtype)


def text_batch(batch=4, seq=6, vocab=20):
    torch.manual_seed(2)
    ids = torch.randint(1, vocab, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, 4:] = 0
    mask[2, 3:] = 0
    ids = ids * mask
    return ids, mask


def both(cls_name, *args, **kwargs):
    return getattr(fastattr, cls_name)(*args, **kwargs), getattr(captum_attr, cls_name)(
        *args, **kwargs
    )


def lig_both(model, layer, *args, init=None, **kwargs):
    ours, theirs = both("LayerIntegratedGradients", model, layer, **(init or {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        expected = theirs.attribute(*args, **kwargs)
    return ours.attribute(*args, **kwargs), expected


def nig_both(model, layer, *args, **kwargs):
    ours, theirs = both("NeuronIntegratedGradients", model, layer)
    return ours.attribute(*args, **kwargs), theirs.attribute(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# LayerIntegratedGradients vs captum


def _linear_case(dtype):
    model = seeded(mlp, dtype)
    torch.manual_seed(3)
    return model, model[2], torch.randn(4, 6, dtype=dtype), 0.5


def _conv_case(dtype):
    model = seeded(convnet, dtype)
    torch.manual_seed(3)
    return model, model[2], torch.randn(3, 2, 6, 6, dtype=dtype), None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("on_input", [False, True])
@pytest.mark.parametrize("case", [_linear_case, _conv_case], ids=["linear", "conv"])
def test_layer_ig_matches_captum(case, on_input, dtype):
    model, layer, x, baseline = case(dtype)
    ours, theirs = lig_both(
        model,
        layer,
        x,
        baselines=baseline,
        target=1,
        n_steps=20,
        attribute_to_layer_input=on_input,
        return_convergence_delta=True,
    )
    assert_same(ours, theirs, dtype)


@pytest.mark.parametrize("method", METHODS)
def test_layer_ig_every_method_with_delta(method):
    model, layer, x, _ = _linear_case(torch.float64)
    baselines = torch.randn(1, 6, dtype=torch.float64)
    ours, theirs = lig_both(
        model,
        layer,
        x,
        baselines=baselines,
        target=2,
        n_steps=6,
        method=method,
        return_convergence_delta=True,
    )
    assert_same(ours, theirs)
    # A coarse Riemann rule leaves a real delta: the comparison is not between zeros.
    if method != "gausslegendre":
        assert ours[1].abs().max() > 1e-6


def test_layer_ig_embedding_with_token_ids_and_mask():
    model = seeded(TextNet)
    ids, mask = text_batch()
    baselines = torch.zeros_like(ids)  # the padding token everywhere
    ours, theirs = lig_both(
        model,
        model.embedding,
        ids,
        baselines=baselines,
        target=torch.tensor([0, 1, 2, 1]),
        additional_forward_args=(mask,),
        n_steps=16,
        return_convergence_delta=True,
    )
    assert ours[0].shape == (*ids.shape, 8)
    assert_same(ours, theirs)


def test_layer_ig_embedding_float32():
    model = seeded(TextNet, torch.float32)
    ids, mask = text_batch()
    ours, theirs = lig_both(
        model, model.embedding, ids, target=2, additional_forward_args=mask, n_steps=10
    )
    assert_same(ours, theirs, torch.float32)


@pytest.mark.parametrize("on_input", [False, True])
def test_layer_ig_layer_with_tuple_values(on_input):
    # split returns a tuple of two tensors; combine takes two tensors.
    model = seeded(TwoInputNet)
    x, y = two_inputs()
    layer = model.combine if on_input else model.split
    ours, theirs = lig_both(
        model,
        layer,
        (x, y),
        target=0,
        n_steps=8,
        attribute_to_layer_input=on_input,
        return_convergence_delta=True,
    )
    assert isinstance(ours[0], tuple) and len(ours[0]) == 2
    assert_same(ours, theirs)


@pytest.mark.parametrize("on_input", [False, True])
@pytest.mark.parametrize("names", [["combine", "side"], ["side", "split"], ["side"]])
def test_layer_ig_list_of_layers(names, on_input):
    model = seeded(TwoInputNet)
    x, y = two_inputs()
    layers = [getattr(model, name) for name in names]
    ours, theirs = lig_both(
        model,
        layers,
        (x, y),
        baselines=(0.1, torch.ones(1, 2, dtype=torch.float64)),
        target=2,
        n_steps=8,
        attribute_to_layer_input=on_input,
        return_convergence_delta=True,
    )
    assert isinstance(ours[0], list) and len(ours[0]) == len(names)
    assert_same(ours, theirs)


def test_layer_ig_list_of_layers_reading_the_input_adds_up_to_ig():
    # Both layers read x and nothing else does: their input attributions are the two parts of
    # x's integrated gradients, so they add up to IntegratedGradients, node by node.
    model = seeded(Branches)
    torch.manual_seed(4)
    x = torch.randn(4, 5, dtype=torch.float64)
    kwargs = {"target": 1, "n_steps": 5, "baselines": 0.3}
    parts = fastattr.LayerIntegratedGradients(model, [model.a, model.b]).attribute(
        x, attribute_to_layer_input=True, **kwargs
    )
    whole = fastattr.IntegratedGradients(model).attribute(x, **kwargs)
    torch.testing.assert_close(parts[0] + parts[1], whole, rtol=1e-10, atol=1e-12)
    assert parts[0].abs().max() > 1e-3 and parts[1].abs().max() > 1e-3


@pytest.mark.parametrize("on_input", [False, True])
def test_layer_ig_list_with_a_layer_feeding_another_is_refused(on_input):
    # Replacing both at once, the first layer's path reaches the output only through the
    # second's values, replaced in turn: its attribution would be zero, not its own. captum
    # fails there too ("not been used in the graph"); fastattr says why.
    model = seeded(mlp)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(5)
    x = torch.randn(4, 6, dtype=torch.float64)
    kwargs = {"target": 0, "n_steps": 7, "attribute_to_layer_input": on_input}
    where = "input" if on_input else "output"
    with pytest.raises(ValueError, match=rf"Linear \(#1\) depends on the {where} of Linear \(#0\)"):
        fastattr.LayerIntegratedGradients(model, [model[0], model[2]]).attribute(x, **kwargs)
    with pytest.raises(ValueError, match="depends on"):
        fastattr.NoiseTunnel(
            fastattr.LayerIntegratedGradients(model, [model[0], model[2]])
        ).attribute(x, nt_samples=2, **kwargs)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x)
        return self.head(self.b(h) + h)


@pytest.mark.parametrize("on_input", [False, True])
def test_layer_ig_list_with_a_layer_feeding_another_and_the_output_matches_captum(on_input):
    # The first layer also reaches the output around the second (a residual): captum runs,
    # and so does fastattr, with captum's numbers.
    model = seeded(Residual)
    torch.manual_seed(6)
    x = torch.randn(3, 4, dtype=torch.float64)
    ours, theirs = lig_both(
        model, [model.a, model.b], x, target=1, n_steps=6, attribute_to_layer_input=on_input
    )
    assert_same(ours, theirs)
    assert ours[0].abs().max() > 1e-3


class Checkpointed(nn.Module):
    def __init__(self, reentrant):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8))
        self.head = nn.Linear(8, 3)
        self.reentrant = reentrant

    def forward(self, x):
        if self.reentrant is None:
            return self.head(self.block(x))
        checkpoint = torch.utils.checkpoint.checkpoint
        return self.head(checkpoint(self.block, x, use_reentrant=self.reentrant))


@pytest.mark.parametrize("name", ["LayerIntegratedGradients", "NeuronIntegratedGradients"])
def test_a_layer_inside_reentrant_checkpointing_is_refused(name):
    # Reentrant checkpointing runs the block with gradients off: its values carry no gradient,
    # which would read as zero attributions. Non-reentrant checkpointing gives the numbers of
    # the model without it.
    torch.manual_seed(7)
    x = torch.randn(4, 6, dtype=torch.float64)
    kwargs = {"neuron_selector": 2} if name == "NeuronIntegratedGradients" else {"target": 1}
    results = []
    for reentrant in (None, False, True):
        model = seeded(lambda reentrant=reentrant: Checkpointed(reentrant))
        method = getattr(fastattr, name)(model, model.block[2])
        if reentrant:
            with pytest.raises(ValueError, match=r"gradients off .*use_reentrant"):
                method.attribute(x, n_steps=5, **kwargs)
        else:
            results.append(method.attribute(x, n_steps=5, **kwargs))
    assert_same(results[1], results[0])
    assert results[0].abs().max() > 1e-3


@pytest.mark.parametrize("on_input", [False, True])
def test_layer_ig_internal_batch_size(on_input):
    model, layer, x, _ = _linear_case(torch.float64)
    ours, theirs = lig_both(
        model,
        layer,
        x,
        target=1,
        n_steps=11,
        internal_batch_size=3 * x.shape[0],
        attribute_to_layer_input=on_input,
        return_convergence_delta=True,
    )
    assert_same(ours, theirs)
    unchunked = fastattr.LayerIntegratedGradients(model, layer).attribute(
        x, target=1, n_steps=11, attribute_to_layer_input=on_input
    )
    torch.testing.assert_close(ours[0], unchunked, rtol=1e-10, atol=1e-12)


def test_layer_ig_internal_batch_size_below_batch_warns_and_still_matches():
    model, layer, x, _ = _linear_case(torch.float64)
    with pytest.warns(UserWarning, match="internal_batch_size"):
        ours = fastattr.LayerIntegratedGradients(model, layer).attribute(
            x, target=1, n_steps=5, internal_batch_size=2
        )
    expected = captum_attr.LayerIntegratedGradients(model, layer).attribute(x, target=1, n_steps=5)
    assert_same(ours, expected)


@pytest.mark.parametrize("on_input", [False, True])
def test_layer_ig_without_multiplying_by_inputs(on_input):
    model, layer, x, _ = _conv_case(torch.float64)
    ours, theirs = lig_both(
        model,
        layer,
        x,
        baselines=0.2,
        target=0,
        n_steps=9,
        attribute_to_layer_input=on_input,
        init={"multiply_by_inputs": False},
        return_convergence_delta=True,
    )
    assert_same(ours, theirs)
    assert not fastattr.LayerIntegratedGradients(
        model, layer, multiply_by_inputs=False
    ).multiplies_by_inputs


def _reshaped_mlp():
    model = seeded(mlp)
    model[4] = nn.Linear(8, 6).double()
    return model, (lambda x: model(x).reshape(-1, 2, 3))


@pytest.mark.parametrize(
    "target",
    [
        (1, 2),
        [(0, 1), (1, 2), (1, 0), (0, 0)],
        torch.tensor(4),
        5,
    ],
    ids=["tuple", "list-of-tuples", "scalar-tensor", "int"],
)
def test_layer_ig_targets_on_a_3d_output(target):
    model, forward = _reshaped_mlp()
    torch.manual_seed(6)
    x = torch.randn(4, 6, dtype=torch.float64)
    if isinstance(target, (int, torch.Tensor)):
        forward = model  # flat (4, 6) output
    ours, theirs = lig_both(
        forward, model[2], x, target=target, n_steps=6, return_convergence_delta=True
    )
    assert_same(ours, theirs)


@pytest.mark.parametrize(
    "target",
    [torch.tensor([0, 2, 1, 1]), [2, 0, 0, 1], None],
    ids=["tensor-per-example", "list", "none"],
)
def test_layer_ig_per_example_targets(target):
    model, layer, x, _ = _linear_case(torch.float64)
    forward = model if target is not None else (lambda inp: model(inp)[:, 1])
    ours, theirs = lig_both(forward, layer, x, target=target, n_steps=6)
    assert_same(ours, theirs)


def test_layer_ig_additional_forward_args():
    model = seeded(TwoInputNet)
    x, y = two_inputs()
    scale = torch.linspace(0.5, 2.0, 4, dtype=torch.float64).unsqueeze(1)
    ours, theirs = lig_both(
        lambda inp, other, s: model(inp, other, s),
        model.side,
        x,
        target=1,
        additional_forward_args=(y, scale),
        n_steps=8,
        return_convergence_delta=True,
    )
    assert_same(ours, theirs)
    # A non-tensor additional argument is passed as it is.
    ours, theirs = lig_both(
        model, model.split, (x, y), target=1, additional_forward_args=2.5, n_steps=8
    )
    assert_same(ours, theirs)


def squad_case():
    """Captum's BERT question-answering tutorial on a tiny random BERT: the forward returns the
    best start (or end) logit; the reference keeps [CLS] (2) and [SEP] (3) and pads (0) the rest."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    model = transformers.BertForQuestionAnswering(config).double().eval()

    def best_logit(ids, token_type_ids=None, position_ids=None, attention_mask=None, position=0):
        output = model(
            ids,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
        )
        return (output.start_logits, output.end_logits)[position].max(1).values

    ids = torch.tensor([[2, 5, 7, 9, 3, 11, 12, 13, 14, 3], [2, 6, 8, 3, 15, 16, 17, 3, 0, 0]])
    reference = torch.where((ids == 2) | (ids == 3), ids, 0)
    first_separator = (ids == 3).int().argmax(1, keepdim=True)
    token_types = (torch.arange(ids.shape[1]) > first_separator).long()
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    return model, best_logit, ids, reference, token_types, positions, (ids != 0).long()


@pytest.mark.parametrize("layers", ["embeddings", "three embeddings"])
def test_layer_ig_bert_question_answering_tutorial(layers):
    model, best_logit, ids, reference, token_types, positions, mask = squad_case()
    snapshot = _snapshot(model)
    embeddings = model.bert.embeddings
    if layers == "embeddings":  # the token ids alone, the rest passed through with the answer end
        layer, inputs, baselines = embeddings, ids, reference
        extra = dict(additional_forward_args=(token_types, positions, mask, 1))
    else:  # each embedding of its own ids, against zeros for the token types and positions
        layer = [
            embeddings.word_embeddings,
            embeddings.token_type_embeddings,
            embeddings.position_embeddings,
        ]
        inputs = (ids, token_types, positions)
        baselines = (reference, torch.zeros_like(token_types), torch.zeros_like(positions))
        extra = dict(additional_forward_args=(mask, 0), internal_batch_size=14)
    ours, theirs = lig_both(
        best_logit, layer, inputs, baselines, n_steps=20, return_convergence_delta=True, **extra
    )
    assert_same(ours, theirs)
    _assert_as_found(model, snapshot)


class BatchStatsNet(nn.Module):
    """A BatchNorm before the attributed layer (and optionally one after)."""

    def __init__(self, norm_after=False):
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.norm = nn.BatchNorm1d(6)
        self.layer = nn.Linear(6, 6)
        self.after = nn.BatchNorm1d(6) if norm_after else nn.Identity()
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.layer(torch.tanh(self.norm(self.inp(x))))
        return self.head(torch.tanh(self.after(h)))


@pytest.mark.parametrize("wrapped", [False, True], ids=["module", "function"])
def test_layer_ig_training_mode_batch_statistics(wrapped):
    # The layer's values at the inputs and at the baselines each come from their own batch
    # statistics, as captum computes them; also behind a plain function, whose model's mode
    # can't be seen.
    torch.manual_seed(7)
    x = torch.randn(6, 5, dtype=torch.float64)
    baselines = torch.randn(6, 5, dtype=torch.float64) * 0.1
    results = []
    for cls in (fastattr.LayerIntegratedGradients, captum_attr.LayerIntegratedGradients):
        model = seeded(BatchStatsNet).train()
        forward = (lambda inp, model=model: model(inp)) if wrapped else model
        results.append(
            cls(forward, model.layer).attribute(
                x, baselines=baselines, target=0, n_steps=8, return_convergence_delta=True
            )
        )
        assert all(m.training for m in model.modules())
    assert_same(*results)
    # Concatenating inputs and baselines would have mixed their statistics: not the same.
    model = seeded(BatchStatsNet).eval()
    eval_result = fastattr.LayerIntegratedGradients(model, model.layer).attribute(
        x, baselines=baselines, target=0, n_steps=8
    )
    assert not torch.allclose(eval_result, results[0][0])


def test_layer_ig_training_mode_batch_statistics_after_the_layer():
    # With a BatchNorm after the layer, the statistics are those of the chunk of path points:
    # one chunk of every step, as captum's single pass.
    torch.manual_seed(8)
    x = torch.randn(4, 5, dtype=torch.float64)
    results = []
    for cls in (fastattr.LayerIntegratedGradients, captum_attr.LayerIntegratedGradients):
        model = seeded(lambda: BatchStatsNet(norm_after=True)).train()
        results.append(
            cls(model, model.layer).attribute(
                x, target=2, n_steps=6, internal_batch_size=6 * 4, return_convergence_delta=True
            )
        )
    assert_same(*results)


def test_layer_ig_grad_kwargs_passed_through():
    model, layer, x, _ = _linear_case(torch.float64)
    ours, theirs = lig_both(
        model, layer, x, target=1, n_steps=5, grad_kwargs={"retain_graph": True}
    )
    assert_same(ours, theirs)
    with pytest.raises(TypeError, match="not_an_argument"):
        fastattr.LayerIntegratedGradients(model, layer).attribute(
            x, target=1, n_steps=5, grad_kwargs={"not_an_argument": 1}
        )


@pytest.mark.parametrize("key", ["create_graph", "is_grads_batched"])
def test_layer_ig_grad_kwargs_the_path_cannot_honour_are_refused(key):
    model, layer, x, _ = _linear_case(torch.float64)
    if key == "create_graph":
        # captum's attributions then carry a graph back to the model's parameters; fastattr's
        # would silently carry none.
        theirs = captum_attr.LayerIntegratedGradients(model, layer).attribute(
            x, target=1, n_steps=5, grad_kwargs={key: True}
        )
        assert theirs.requires_grad
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=rf"grad_kwargs\['{key}'\]"):
        fastattr.LayerIntegratedGradients(model, layer).attribute(
            x, target=1, n_steps=5, grad_kwargs={key: True}
        )
    _assert_as_found(model, snapshot)
    # False is the default, and runs.
    ours, theirs = lig_both(model, layer, x, target=1, n_steps=5, grad_kwargs={key: False})
    assert_same(ours, theirs)


def test_layer_ig_grad_kwargs_must_be_a_dict():
    model, layer, x, _ = _linear_case(torch.float64)
    with pytest.raises(TypeError, match="grad_kwargs must be a dict"):
        fastattr.LayerIntegratedGradients(model, layer).attribute(x, target=1, grad_kwargs=3)


def test_layer_ig_reference_backend():
    model, layer, x, _ = _linear_case(torch.float64)
    with fastattr.use_backend("reference"):
        ours = fastattr.LayerIntegratedGradients(model, layer).attribute(
            x, target=1, n_steps=7, method="riemann_trapezoid", return_convergence_delta=True
        )
    theirs = captum_attr.LayerIntegratedGradients(model, layer).attribute(
        x, target=1, n_steps=7, method="riemann_trapezoid", return_convergence_delta=True
    )
    assert_same(ours, theirs)
    model = seeded(TextNet)
    ids, mask = text_batch()
    with fastattr.use_backend("reference"):
        ours = fastattr.LayerIntegratedGradients(model, model.embedding).attribute(
            ids, target=1, additional_forward_args=mask, n_steps=6
        )
    theirs = captum_attr.LayerIntegratedGradients(model, model.embedding).attribute(
        ids, target=1, additional_forward_args=mask, n_steps=6
    )
    assert_same(ours, theirs)


def test_layer_ig_delta_is_attribution_sum_minus_output_change():
    model, layer, x, _ = _linear_case(torch.float64)
    explainer = fastattr.LayerIntegratedGradients(model, layer)
    assert explainer.has_convergence_delta()
    attributions, delta = explainer.attribute(x, target=1, n_steps=4, return_convergence_delta=True)
    # The delta compares the layer's attributions with the model's output change.
    change = model(x)[:, 1] - model(torch.zeros_like(x))[:, 1]
    torch.testing.assert_close(delta, attributions.sum(1) - change, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# The completeness relation


def test_layer_ig_on_the_first_layers_input_is_ig():
    # The first layer's input is the model's input: the same path, the same gradients.
    model, _, x, _ = _linear_case(torch.float64)
    kwargs = {"baselines": 0.4, "target": 2, "n_steps": 9}
    layer_ig = fastattr.LayerIntegratedGradients(model, model[0]).attribute(
        x, attribute_to_layer_input=True, **kwargs
    )
    ig = fastattr.IntegratedGradients(model).attribute(x, **kwargs)
    torch.testing.assert_close(layer_ig, ig, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_layer_ig_sum_over_an_affine_first_layer_is_ig_sum(method):
    # An affine first layer maps the input path onto the layer's path: at every node the
    # gradient with respect to the layer times the layer's change equals the gradient with
    # respect to the input times the input's change. The sums agree to rounding, whatever
    # the quadrature error, which a coarse rule makes large here.
    model, _, x, _ = _linear_case(torch.float64)
    kwargs = {"target": 0, "n_steps": 3, "method": method}
    layer_ig, layer_delta = fastattr.LayerIntegratedGradients(model, model[0]).attribute(
        x, return_convergence_delta=True, **kwargs
    )
    ig, ig_delta = fastattr.IntegratedGradients(model).attribute(
        x, return_convergence_delta=True, **kwargs
    )
    torch.testing.assert_close(layer_ig.sum(1), ig.sum(1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer_delta, ig_delta, rtol=1e-10, atol=1e-12)
    if method != "gausslegendre":
        assert layer_delta.abs().max() > 1e-4


class TanhFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.rest = nn.Sequential(nn.Linear(8, 8), nn.Softplus(), nn.Linear(8, 3))

    def forward(self, x):
        return self.rest(self.first(x))


def test_layer_ig_sum_over_a_nonlinear_first_layer_is_ig_sum_up_to_quadrature():
    # A nonlinear first layer bends the path: the sums differ by the quadrature errors only,
    # both converging to the model's output change.
    model = seeded(TanhFirst)
    torch.manual_seed(9)
    x = torch.randn(4, 6, dtype=torch.float64) * 2
    change = model(x)[:, 1] - model(torch.zeros_like(x))[:, 1]
    gaps = []
    for n_steps in (2, 64):
        layer_ig = fastattr.LayerIntegratedGradients(model, model.first).attribute(
            x, target=1, n_steps=n_steps
        )
        ig = fastattr.IntegratedGradients(model).attribute(x, target=1, n_steps=n_steps)
        gaps.append((layer_ig.sum(1) - ig.sum(1)).abs().max().item())
        if n_steps == 64:
            torch.testing.assert_close(layer_ig.sum(1), change, rtol=0, atol=1e-9)
            torch.testing.assert_close(ig.sum(1), change, rtol=0, atol=1e-9)
    assert gaps[0] > 1e-4 and gaps[1] < 1e-9


# ---------------------------------------------------------------------------------------------
# NeuronIntegratedGradients vs captum


@pytest.mark.parametrize("on_input", [False, True])
@pytest.mark.parametrize(
    "selector",
    [3, (5,), lambda out: out[:, 1] * out[:, 2]],
    ids=["int", "tuple", "callable"],
)
def test_neuron_ig_mlp(selector, on_input):
    model, _, x, _ = _linear_case(torch.float64)
    ours, theirs = nig_both(
        model, model[2], x, selector, baselines=0.1, n_steps=12, attribute_to_neuron_input=on_input
    )
    assert_same(ours, theirs)


@pytest.mark.parametrize("on_input", [False, True])
@pytest.mark.parametrize(
    "selector",
    [
        (1, 2, 3),
        (-1, 0, -2),
        (1, slice(0, 2), slice(1, 3)),
        (slice(None), 1, 1),
        lambda out: out[:, 1, 2:4, 0].sum(1),
    ],
    ids=["chw", "negative", "slices", "all-channels", "callable"],
)
def test_neuron_ig_conv(selector, on_input):
    model, layer, x, _ = _conv_case(torch.float64)
    ours, theirs = nig_both(
        model, layer, x, selector, n_steps=6, attribute_to_neuron_input=on_input
    )
    assert_same(ours, theirs)


@pytest.mark.parametrize("on_input", [False, True])
def test_neuron_ig_list_selector_is_captums_tuple(on_input):
    # captum indexes the layer's values with a list selector as with a tuple.
    model, layer, x, _ = _conv_case(torch.float64)
    ours, theirs = nig_both(
        model, layer, x, [1, 2, 3], n_steps=6, attribute_to_neuron_input=on_input
    )
    assert_same(ours, theirs)
    expected = fastattr.NeuronIntegratedGradients(model, layer).attribute(
        x, (1, 2, 3), n_steps=6, attribute_to_neuron_input=on_input
    )
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_neuron_ig_every_method_float32(method):
    model, layer, x, _ = _linear_case(torch.float32)
    ours, theirs = nig_both(model, layer, x, 4, n_steps=7, method=method)
    assert_same(ours, theirs, torch.float32)


def test_neuron_ig_tuple_inputs_baselines_and_additional_args():
    model = seeded(TwoInputNet)
    x, y = two_inputs()
    scale = torch.full((4, 1), 3.0, dtype=torch.float64)
    baselines = (torch.ones(1, 5, dtype=torch.float64), 0.5)
    # The head's input gathers both branches: the neuron's value depends on x and y.
    for selector in [(9,), lambda values: values[:, 1] * values[:, 9]]:
        ours, theirs = nig_both(
            model,
            model.head,
            (x, y),
            selector,
            baselines=baselines,
            additional_forward_args=scale,
            n_steps=8,
            attribute_to_neuron_input=True,
        )
        assert isinstance(ours, tuple) and len(ours) == 2
        assert_same(ours, theirs)


def test_neuron_ig_input_that_never_reaches_the_neuron():
    # split (a tuple of values: a callable picks the neuron) reads x only. captum fails on
    # the unused y; its attribution is zero, and x's is captum's with y held fixed.
    model = seeded(TwoInputNet)
    x, y = two_inputs()
    selector = lambda values: values[0][:, 1] + values[1][:, 2]  # noqa: E731
    ours = fastattr.NeuronIntegratedGradients(model, model.split).attribute(
        (x, y), selector, baselines=(0.2, 0.5), n_steps=8
    )
    theirs = captum_attr.NeuronIntegratedGradients(model, model.split).attribute(
        x, selector, baselines=0.2, additional_forward_args=y, n_steps=8
    )
    assert_same(ours[0], theirs)
    assert torch.equal(ours[1], torch.zeros_like(y))


class ClampInPlace(nn.Module):
    """Writes into its input, outside autograd (a preprocessing step)."""

    def forward(self, x):
        with torch.no_grad():
            x.clamp_(-0.5, 0.5)
        return x


def test_neuron_ig_leaves_inputs_a_forward_writes_into_as_given():
    # The pass that counts the layer's calls ran on the caller's tensors: the forward clamped
    # them, and the path then ran from the clamped inputs (other numbers than captum's).
    model = seeded(lambda: nn.Sequential(ClampInPlace(), nn.Linear(6, 8), nn.Tanh()))
    torch.manual_seed(3)
    x = torch.randn(4, 6, dtype=torch.float64) * 2
    given = x.clone()
    ours = fastattr.NeuronIntegratedGradients(model, model[2]).attribute(x, 1, n_steps=5)
    assert torch.equal(x, given)
    theirs = captum_attr.NeuronIntegratedGradients(model, model[2]).attribute(x, 1, n_steps=5)
    assert_same(ours, theirs)


@pytest.mark.parametrize("on_input", [False, True])
def test_neuron_ig_internal_batching(on_input):
    model, layer, x, _ = _conv_case(torch.float64)
    ours, theirs = nig_both(
        model,
        layer,
        x,
        (2, 1, 0),
        n_steps=10,
        internal_batch_size=4 * x.shape[0],
        attribute_to_neuron_input=on_input,
    )
    assert_same(ours, theirs)


def test_neuron_ig_without_multiplying_by_inputs():
    model, layer, x, _ = _linear_case(torch.float64)
    ours = fastattr.NeuronIntegratedGradients(model, layer, multiply_by_inputs=False).attribute(
        x, 2, n_steps=6
    )
    theirs = captum_attr.NeuronIntegratedGradients(
        model, layer, multiply_by_inputs=False
    ).attribute(x, 2, n_steps=6)
    assert_same(ours, theirs)


def test_neuron_ig_reference_backend():
    model, layer, x, _ = _conv_case(torch.float64)
    with fastattr.use_backend("reference"):
        ours = fastattr.NeuronIntegratedGradients(model, layer).attribute(
            x, (3, 2, 1), n_steps=5, method="riemann_middle"
        )
    theirs = captum_attr.NeuronIntegratedGradients(model, layer).attribute(
        x, (3, 2, 1), n_steps=5, method="riemann_middle"
    )
    assert_same(ours, theirs)


class Tripwire(nn.Module):
    """Records the rows of each forward call; raises if a backward pass reaches it."""

    def __init__(self):
        super().__init__()
        self.rows = []

    def forward(self, x):
        self.rows.append(x.shape[0])
        out = x.clone()
        if out.requires_grad:
            out.register_hook(self._backward)
        return out

    @staticmethod
    def _backward(grad):
        raise AssertionError("a backward pass ran past the neuron's layer")


def test_neuron_ig_stops_at_the_layer():
    # Past the layer, the model runs once, over the inputs without a graph (to count the
    # layer's calls); never over the path, never backward.
    model = seeded(mlp)
    torch.manual_seed(10)
    x = torch.randn(4, 6, dtype=torch.float64)
    expected = captum_attr.NeuronIntegratedGradients(model, model[2]).attribute(x, 1, n_steps=6)
    model.insert(3, Tripwire())
    ours = fastattr.NeuronIntegratedGradients(model, model[2]).attribute(x, 1, n_steps=6)
    assert_same(ours, expected)
    assert model[3].rows == [4]
    # Also when one chunk holds every step.
    ours = fastattr.NeuronIntegratedGradients(model, model[2]).attribute(
        x, 1, n_steps=6, internal_batch_size=24
    )
    assert_same(ours, expected)
    assert model[3].rows == [4, 4]


class SharedActivation(nn.Module):
    """One activation module called twice, as torchvision's ResNet blocks call theirs."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 2, 3, padding=1)
        self.conv2 = nn.Conv2d(2, 2, 3, padding=1)
        self.act = nn.Softplus()
        self.head = nn.Linear(2 * 5 * 5, 3)

    def forward(self, x):
        h = self.act(self.conv1(x))
        h = self.act(self.conv2(h) + x)
        return self.head(h.flatten(1))


@pytest.mark.parametrize("on_input", [False, True])
def test_layer_called_twice_is_taken_at_its_last_call(on_input):
    model = seeded(SharedActivation)
    torch.manual_seed(12)
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    ours, theirs = lig_both(
        model,
        model.act,
        x,
        target=1,
        n_steps=6,
        attribute_to_layer_input=on_input,
        return_convergence_delta=True,
    )
    assert_same(ours, theirs)
    for internal_batch_size in (None, 6):
        ours, theirs = nig_both(
            model,
            model.act,
            x,
            (1, 2, 3),
            n_steps=6,
            internal_batch_size=internal_batch_size,
            attribute_to_neuron_input=on_input,
        )
        assert_same(ours, theirs)


def _inplace_convnet(inplace):
    model = seeded(convnet)
    model[1] = nn.ReLU(inplace=inplace)
    model[3] = nn.ReLU(inplace=inplace)
    return model


@pytest.mark.parametrize("on_input", [False, True])
def test_layer_ig_with_in_place_activations(on_input):
    # captum fails when the model changes the layer's output in place (ReLU(inplace=True), as
    # in torchvision's models); fastattr gives captum's numbers for the same model without
    # in-place activations.
    x = _conv_case(torch.float64)[2]
    kwargs = {"target": 2, "n_steps": 6, "attribute_to_layer_input": on_input}
    model = _inplace_convnet(True)
    layer = model[3] if on_input else model[2]
    ours = fastattr.LayerIntegratedGradients(model, layer).attribute(
        x, return_convergence_delta=True, **kwargs
    )
    plain = _inplace_convnet(False)
    layer = plain[3] if on_input else plain[2]
    theirs = captum_attr.LayerIntegratedGradients(plain, layer).attribute(
        x, return_convergence_delta=True, **kwargs
    )
    assert_same(ours, theirs)
    assert ours[0].abs().max() > 1e-3


class PerToken(nn.Module):
    """A layer run on every token: its values hold several rows per example."""

    def __init__(self):
        super().__init__()
        self.token = nn.Linear(4, 4)
        self.head = nn.Linear(12, 2)

    def forward(self, x):
        h = torch.tanh(self.token(x.reshape(x.shape[0] * 3, 4)))
        return self.head(h.reshape(x.shape[0], 12))


@pytest.mark.parametrize("on_input", [False, True])
def test_layer_ig_values_with_several_rows_per_example(on_input):
    model = seeded(PerToken)
    torch.manual_seed(13)
    x = torch.randn(5, 12, dtype=torch.float64)
    ours, theirs = lig_both(
        model, model.token, x, target=1, n_steps=6, attribute_to_layer_input=on_input
    )
    assert ours.shape == (15, 4)
    assert_same(ours, theirs)
    # No per-example delta for such a layer: a clear error (captum fails on an assertion).
    with pytest.raises(ValueError, match="return_convergence_delta"):
        fastattr.LayerIntegratedGradients(model, model.token).attribute(
            x, target=1, n_steps=6, return_convergence_delta=True
        )


class SwallowsErrors(nn.Module):
    """A forward that catches every Exception around its layers."""

    def __init__(self):
        super().__init__()
        self.body = mlp()

    def forward(self, x):
        try:
            return self.body(x)
        except Exception:
            return torch.zeros(x.shape[0], 3, dtype=x.dtype)


def test_neuron_ig_stops_at_the_layer_inside_a_catch_all():
    model = seeded(SwallowsErrors)
    torch.manual_seed(11)
    x = torch.randn(4, 6, dtype=torch.float64)
    ours, theirs = nig_both(model, model.body[2], x, 5, n_steps=6)
    assert_same(ours, theirs)
    assert ours.abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# The model left as found


def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict(keep_vars=False).items()},
        {name: m.training for name, m in model.named_modules()},
        [p.requires_grad for p in model.parameters()],
    )


def _assert_as_found(model, snapshot):
    state, modes, requires_grad = snapshot
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
        assert not module._backward_hooks and not module._forward_hooks_with_kwargs
    now = model.state_dict()
    assert now.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(now[key], value), key
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert [p.requires_grad for p in model.parameters()] == requires_grad
    assert all(p.grad is None for p in model.parameters())


class RaisesOnLargeBatches(nn.Module):
    """Raises when its input has more than ``limit`` rows (the expanded pass)."""

    def __init__(self, limit):
        super().__init__()
        self.limit = limit

    def forward(self, x):
        if x.shape[0] > self.limit:
            raise RuntimeError("boom in the scaled pass")
        return x


def _raising_model(position, limit):
    model = seeded(mlp)
    model.insert(position, RaisesOnLargeBatches(limit))
    return model


@pytest.mark.parametrize("on_input", [False, True])
@pytest.mark.parametrize("as_list", [False, True])
def test_layer_ig_leaves_the_model_as_found(on_input, as_list):
    model, layer, x, _ = _linear_case(torch.float64)
    model[3].train()  # a mix of modes
    snapshot = _snapshot(model)
    fastattr.LayerIntegratedGradients(model, [layer] if as_list else layer).attribute(
        x, target=1, n_steps=5, attribute_to_layer_input=on_input, return_convergence_delta=True
    )
    _assert_as_found(model, snapshot)


@pytest.mark.parametrize("on_input", [False, True])
def test_layer_ig_forward_raising_in_the_scaled_pass(on_input):
    # The layer values come from one pass over inputs and baselines (8 rows); the scaled pass
    # has more rows and raises after the layer.
    model = _raising_model(4, limit=8)
    x = torch.randn(4, 6, dtype=torch.float64)
    snapshot = _snapshot(model)
    with pytest.raises(RuntimeError, match="boom in the scaled pass"):
        fastattr.LayerIntegratedGradients(model, [model[2]]).attribute(
            x, target=1, n_steps=5, attribute_to_layer_input=on_input
        )
    _assert_as_found(model, snapshot)
    # and the next call still works
    model[4].limit = 10**6
    fastattr.LayerIntegratedGradients(model, model[2]).attribute(x, target=1, n_steps=5)
    _assert_as_found(model, snapshot)


def test_layer_ig_forward_raising_before_the_layer():
    model = _raising_model(1, limit=1)
    x = torch.randn(4, 6, dtype=torch.float64)
    snapshot = _snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        fastattr.LayerIntegratedGradients(model, model[3]).attribute(x, target=1, n_steps=5)
    _assert_as_found(model, snapshot)


@pytest.mark.parametrize("on_input", [False, True])
def test_neuron_ig_forward_raising_leaves_the_model_as_found(on_input):
    model = _raising_model(1, limit=4)
    model.train()
    x = torch.randn(4, 6, dtype=torch.float64)
    snapshot = _snapshot(model)
    with pytest.raises(RuntimeError, match="boom in the scaled pass"):
        fastattr.NeuronIntegratedGradients(model, model[3]).attribute(
            x, 2, n_steps=5, attribute_to_neuron_input=on_input
        )
    _assert_as_found(model, snapshot)
    model[1].limit = 10**6
    model.eval()
    snapshot = _snapshot(model)
    fastattr.NeuronIntegratedGradients(model, model[3]).attribute(x, 2, n_steps=5)
    _assert_as_found(model, snapshot)


@pytest.mark.parametrize("form", ["compiled", "compiled_in_place", "lambda_around_compiled"])
def test_a_compiled_model_s_layer_gives_captums_numbers_on_the_model(form):
    # Compiled code runs no hook added to a submodule after it was compiled (captum: "Forward
    # hook did not obtain any outputs"); the passes that read or replace the layer run it
    # eagerly, and the compiled model is compiled again afterwards.
    model = seeded(mlp)
    x = torch.randn(4, 6, dtype=torch.float64)
    theirs = captum_attr.LayerIntegratedGradients(model, model[2]).attribute(x, target=1, n_steps=8)
    their_neuron = captum_attr.NeuronIntegratedGradients(model, model[2]).attribute(
        x, neuron_selector=3, n_steps=8
    )
    if form == "compiled":
        forward = torch.compile(model, backend="eager")
    elif form == "compiled_in_place":
        forward = copy.deepcopy(model)
        forward.compile(backend="eager")
    else:
        compiled = torch.compile(model, backend="eager")
        forward = lambda v: compiled(v)  # noqa: E731
    owner = forward if form == "compiled_in_place" else model
    layer = owner[2]
    forward(x)  # compiled before the hooks are added
    snapshot = _snapshot(owner)
    ours = fastattr.LayerIntegratedGradients(forward, layer).attribute(x, target=1, n_steps=8)
    neuron = fastattr.NeuronIntegratedGradients(forward, layer).attribute(
        x, neuron_selector=3, n_steps=8
    )
    assert_same(ours, theirs)
    assert_same(neuron, their_neuron)
    _assert_as_found(owner, snapshot)
    assert torch._dynamo.eval_frame._stance.stance == "default"


# ---------------------------------------------------------------------------------------------
# Bad input


class SkipsALayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(4, 3)
        self.unused = nn.Linear(4, 4)

    def forward(self, x):
        return self.used(x)


@pytest.mark.parametrize("cls", ["LayerIntegratedGradients", "NeuronIntegratedGradients"])
def test_layer_never_called(cls):
    model = seeded(SkipsALayer)
    x = torch.randn(2, 4, dtype=torch.float64)
    snapshot = _snapshot(model)
    explainer = getattr(fastattr, cls)(model, model.unused)
    extra = (0,) if cls == "NeuronIntegratedGradients" else ()
    with pytest.raises(ValueError, match="layer"):
        explainer.attribute(x, *extra, n_steps=3)
    _assert_as_found(model, snapshot)
    # Also when the forward function is not a module (no membership check up front).
    explainer = getattr(fastattr, cls)(lambda inp: model(inp), model.unused)
    with pytest.raises(ValueError, match="layer"):
        explainer.attribute(x, *extra, n_steps=3)
    _assert_as_found(model, snapshot)


@pytest.mark.parametrize("cls", ["LayerIntegratedGradients", "NeuronIntegratedGradients"])
@pytest.mark.parametrize("how", ["trace", "script"])
def test_a_torchscript_layer_is_a_clear_error(cls, how):
    # TorchScript runs no Python hooks: captum's hook "did not obtain any outputs" (trace) or
    # torch refuses to register it (script).
    model = seeded(mlp)
    x = torch.randn(2, 6, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated
        scripted = torch.jit.trace(model, (x,)) if how == "trace" else torch.jit.script(model)
    extra = (0,) if cls == "NeuronIntegratedGradients" else ()
    with pytest.raises(TypeError, match=r"TorchScript module .* before tracing or scripting"):
        getattr(fastattr, cls)(scripted, getattr(scripted, "2")).attribute(x, *extra, n_steps=3)


@pytest.mark.parametrize("cls", ["LayerIntegratedGradients", "NeuronIntegratedGradients"])
def test_a_container_layer_is_a_clear_error(cls):
    class Blocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    model = seeded(Blocks)
    x = torch.randn(2, 4, dtype=torch.float64)
    extra = (0,) if cls == "NeuronIntegratedGradients" else ()
    with pytest.raises(ValueError, match=r"ModuleList has no forward .* one of the modules"):
        getattr(fastattr, cls)(model, model.blocks).attribute(x, *extra, n_steps=3)


def test_layer_list_with_one_layer_never_called():
    model = seeded(SkipsALayer)
    x = torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="layer"):
        fastattr.LayerIntegratedGradients(model, [model.used, model.unused]).attribute(
            x, target=0, n_steps=3
        )
    _assert_as_found(model, _snapshot(model))


@pytest.mark.parametrize("cls", ["LayerIntegratedGradients", "NeuronIntegratedGradients"])
def test_layer_not_in_the_model(cls):
    model = seeded(mlp)
    stranger = nn.Linear(8, 8).double()
    x = torch.randn(2, 6, dtype=torch.float64)
    extra = (0,) if cls == "NeuronIntegratedGradients" else ()
    with pytest.raises(ValueError, match=r"layer.*not a submodule"):
        getattr(fastattr, cls)(model, stranger).attribute(x, *extra, n_steps=3)
    if cls == "LayerIntegratedGradients":
        with pytest.raises(ValueError, match=r"layer\[1\].*not a submodule"):
            fastattr.LayerIntegratedGradients(model, [model[0], stranger]).attribute(
                x, target=0, n_steps=3
            )


@pytest.mark.parametrize("layer", ["not a module", 3, [], [nn.Linear(2, 2), "x"], None])
def test_layer_not_a_module(layer):
    model = seeded(mlp)
    if layer is not None:  # (None is set later, as captum's TCAV does: test_captum_wrappers)
        with pytest.raises(TypeError, match="layer"):
            fastattr.LayerIntegratedGradients(model, layer)
    with pytest.raises(TypeError, match="layer"):
        fastattr.NeuronIntegratedGradients(model, layer)


class SharedEmbedding(nn.Module):
    """One embedding read twice, over sequences of two lengths (T5's shared embedding for its
    encoder and decoder)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, long_ids, short_ids):
        return self.head(self.embed(long_ids).mean(1) + self.embed(short_ids).mean(1))


def test_a_layer_run_twice_with_other_shapes_is_refused():
    model = seeded(SharedEmbedding)
    long_ids, short_ids = torch.randint(0, 10, (2, 5)), torch.randint(0, 10, (2, 3))
    with pytest.raises(ValueError, match=r"runs more than once, with values of other shapes"):
        fastattr.LayerIntegratedGradients(model, model.embed).attribute(
            long_ids, target=0, additional_forward_args=(short_ids,), n_steps=4
        )
    assert not model.embed._forward_hooks
    # Captum hands the short call's path to both calls and runs: attributions shaped as the
    # short sequence, which don't add up to the output's change.
    theirs, delta = captum_attr.LayerIntegratedGradients(model, model.embed).attribute(
        long_ids,
        target=0,
        additional_forward_args=(short_ids,),
        n_steps=4,
        return_convergence_delta=True,
    )
    assert theirs.shape == (2, 3, 4)
    assert delta.abs().max() > 0.05


class SharedPositions(nn.Module):
    """Position embeddings of ids held in a buffer (HuggingFace BERT's default): one row of
    values for the whole batch."""

    def __init__(self):
        super().__init__()
        self.words, self.positions = nn.Embedding(10, 4), nn.Embedding(6, 4)
        self.register_buffer("position_ids", torch.arange(6)[None])
        self.head = nn.Linear(4, 2)

    def forward(self, ids):
        positions = self.positions(self.position_ids[:, : ids.shape[1]])
        return self.head((self.words(ids) + positions).mean(1))


def test_layer_with_one_row_for_the_batch_is_refused_with_a_hint():
    model = seeded(SharedPositions)
    ids = torch.randint(0, 10, (3, 5))
    lig = fastattr.LayerIntegratedGradients(model, [model.words, model.positions])
    with pytest.raises(ValueError, match=r"\[1, 5, 4\]\].*one row for the whole batch"):
        lig.attribute(ids, target=0, n_steps=4)
    with pytest.raises(RuntimeError), warnings.catch_warnings():  # captum fails in the model
        warnings.simplefilter("ignore")  # its warning about lists of layers
        captum_attr.LayerIntegratedGradients(model, [model.words, model.positions]).attribute(
            ids, target=0, n_steps=4
        )
    assert not model.positions._forward_hooks


def test_layer_list_with_a_module_twice():
    model = seeded(mlp)
    with pytest.raises(ValueError, match=r"layer\[2\] is layer\[0\]"):
        fastattr.LayerIntegratedGradients(model, [model[2], model[0], model[2]])


@pytest.mark.parametrize(
    ("selector", "error"),
    [
        ((1, 2, 3, 4), ValueError),  # more indices than dimensions
        ((4, 0, 0), IndexError),  # channel out of range
        ((0, 0, -5), IndexError),
        (7, IndexError),
        ((1, 2), ValueError),  # a row of values per example
        (lambda out: out[:, 0], ValueError),  # a callable returning several values
        (1.5, TypeError),
        ((1, "a", 0), TypeError),
        (lambda out: 3.0, TypeError),
    ],
)
def test_neuron_selector_that_does_not_fit(selector, error):
    model, layer, x, _ = _conv_case(torch.float64)
    snapshot = _snapshot(model)
    with pytest.raises(error, match="neuron_selector"):
        fastattr.NeuronIntegratedGradients(model, layer).attribute(x, selector, n_steps=3)
    _assert_as_found(model, snapshot)


def test_neuron_selector_int_on_a_tuple_valued_layer():
    model = seeded(TwoInputNet)
    with pytest.raises(ValueError, match="neuron_selector"):
        fastattr.NeuronIntegratedGradients(model, model.split).attribute(two_inputs(), 1, n_steps=3)


def test_layer_ig_baselines_of_integer_inputs_are_never_truncated():
    model = seeded(TextNet)
    ids, mask = text_batch()
    kwargs = dict(target=1, additional_forward_args=mask, n_steps=4)
    # Whole numbers and integer tensors: captum's numbers.
    for baselines in (2, 2.0, torch.full((1, ids.shape[1]), 2, dtype=torch.int32)):
        ours, theirs = lig_both(model, model.embedding, ids, baselines=baselines, **kwargs)
        assert_same(ours, theirs)
    # A float tensor: captum's embedding refuses it; fastattr would have truncated it.
    floats = torch.full(ids.shape, 2.7)
    with pytest.raises(RuntimeError, match="indices"):
        captum_attr.LayerIntegratedGradients(model, model.embedding).attribute(
            ids, baselines=floats, **kwargs
        )
    ours = fastattr.LayerIntegratedGradients(model, model.embedding)
    with pytest.raises(TypeError, match=r"baselines\[0\] must be an integer tensor"):
        ours.attribute(ids, baselines=floats, **kwargs)
    # A fractional number: captum truncates it (token 0), silently; fastattr refuses it.
    truncated = captum_attr.LayerIntegratedGradients(model, model.embedding).attribute(
        ids, baselines=0.5, **kwargs
    )
    assert_same(ours.attribute(ids, baselines=0, **kwargs), truncated)
    with pytest.raises(ValueError, match=r"baselines\[0\] must be a whole number"):
        ours.attribute(ids, baselines=0.5, **kwargs)


def test_layer_input_of_integer_values():
    model = seeded(TextNet)
    ids, mask = text_batch()
    with pytest.raises(TypeError, match="layer"):
        fastattr.LayerIntegratedGradients(model, model.embedding).attribute(
            ids, target=0, additional_forward_args=mask, attribute_to_layer_input=True
        )
    _assert_as_found(model, _snapshot(model))


class AttentionWithoutWeights(nn.Module):
    """torch's attention asked for no weights returns (output, None), as HuggingFace's
    attention layers do under SDPA; with ``alone``, a wrapper of the same attention returns the
    output by itself (captum's oracle: captum fails on the None)."""

    def __init__(self, alone: bool = False):
        super().__init__()
        self.attention = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 2)
        self.alone = OutputAlone(self.attention) if alone else None

    def forward(self, x):
        if self.alone is not None:
            out = self.alone(x)
        else:
            out, _ = self.attention(x, x, x, need_weights=False)
        return self.head(out.mean(1))


class OutputAlone(nn.Module):
    def __init__(self, attention: nn.MultiheadAttention):
        super().__init__()
        self.attention = attention

    def forward(self, x):
        return self.attention(x, x, x, need_weights=False)[0]


@pytest.mark.parametrize(
    "cls, kwargs",
    [
        ("LayerIntegratedGradients", {"target": 1}),
        ("NeuronIntegratedGradients", {"neuron_selector": (0, 1)}),
        ("NeuronIntegratedGradients", {"neuron_selector": lambda out: out[:, 1].sum(-1)}),
    ],
)
def test_a_layer_returning_none_beside_its_tensor_is_attributed_at_the_tensor(cls, kwargs):
    # Captum fails inside itself ("'NoneType' object has no attribute 'clone'"); fastattr
    # leaves the None out, as if the layer returned its tensor alone.
    model = seeded(AttentionWithoutWeights)
    oracle = seeded(functools.partial(AttentionWithoutWeights, alone=True))
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    snapshot = _snapshot(model)
    ours = getattr(fastattr, cls)(model, model.attention).attribute(x, n_steps=7, **kwargs)
    theirs = getattr(captum_attr, cls)(oracle, oracle.alone).attribute(x, n_steps=7, **kwargs)
    assert_same(ours, theirs)
    _assert_as_found(model, snapshot)


class OptionalArgument(nn.Module):
    """A block with an optional mask, called with None for it positionally (as HuggingFace's
    layers are) or, with ``omit``, without it."""

    def __init__(self, omit: bool = False):
        super().__init__()
        self.block = MaskableBlock()
        self.head = nn.Linear(4, 2)
        self.omit = omit

    def forward(self, x):
        return self.head(self.block(x) if self.omit else self.block(x, None))


class MaskableBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x, mask=None):
        h = torch.tanh(self.linear(x))
        return h if mask is None else h * mask


def test_a_none_among_a_layers_inputs_is_left_out():
    model = seeded(OptionalArgument)
    oracle = seeded(functools.partial(OptionalArgument, omit=True))
    x = torch.randn(3, 4, dtype=torch.float64)
    kwargs = {"target": 0, "n_steps": 9, "attribute_to_layer_input": True}
    ours = fastattr.LayerIntegratedGradients(model, model.block).attribute(x, **kwargs)
    theirs = captum_attr.LayerIntegratedGradients(oracle, oracle.block).attribute(x, **kwargs)
    assert_same(ours, theirs)


class CacheBeside(nn.Module):
    """A layer returning its output beside an object that is neither a tensor nor None (a
    key-value cache)."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 3)
        self.cache = {}

    def forward(self, x):
        return self.layer(x), self.cache


class CacheUser(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = CacheBeside()

    def forward(self, x):
        return self.block(x)[0].sum(-1, keepdim=True)


@pytest.mark.parametrize("cls", ["LayerIntegratedGradients", "NeuronIntegratedGradients"])
def test_a_layer_returning_other_objects_is_a_clear_error(cls):
    model = seeded(CacheUser)
    x = torch.randn(2, 3, dtype=torch.float64)
    method = getattr(fastattr, cls)(model, model.block)
    selector = {"neuron_selector": lambda values: values[0][:, 0]}
    with pytest.raises(TypeError, match=r"tensors \(None allowed beside them\).*'dict'"):
        method.attribute(x, n_steps=3, **({"target": 0} if cls[0] == "L" else selector))


class KeywordCall(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.layer(input=x)))


def test_layer_input_passed_by_keyword():
    model = seeded(KeywordCall)
    x = torch.randn(4, 3, dtype=torch.float64)
    snapshot = _snapshot(model)
    with pytest.raises(TypeError, match=r"layer.*keyword"):
        fastattr.LayerIntegratedGradients(model, model.layer).attribute(
            x, target=1, attribute_to_layer_input=True
        )
    with pytest.raises(TypeError, match=r"layer.*keyword"):
        fastattr.NeuronIntegratedGradients(model, model.layer).attribute(
            x, 1, attribute_to_neuron_input=True
        )
    _assert_as_found(model, snapshot)
    # Its output is attributed as usual.
    ours, theirs = lig_both(model, model.layer, x, target=1, n_steps=4)
    assert_same(ours, theirs)


def test_neuron_ig_token_ids_fail_in_the_embedding_as_in_captum():
    # Integer inputs run along the path in the default floating dtype, as captum runs them:
    # token ids then fail in the embedding (with a note naming LayerIntegratedGradients).
    model = seeded(TextNet)
    ids, mask = text_batch()
    for library in (fastattr, captum_attr):
        with pytest.raises(RuntimeError, match=r"Embedding|indices"):
            library.NeuronIntegratedGradients(model, model.mix).attribute(
                ids, 0, additional_forward_args=mask
            )


@pytest.mark.parametrize("cls", ["LayerIntegratedGradients", "NeuronIntegratedGradients"])
@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"n_steps": 0}, ValueError, "n_steps"),
        ({"n_steps": 1, "method": "riemann_left"}, ValueError, "n_steps"),
        ({"n_steps": 2.0}, TypeError, "n_steps"),
        ({"method": "simpson"}, ValueError, "method"),
        ({"internal_batch_size": 0}, ValueError, "internal_batch_size"),
        ({"internal_batch_size": 2.5}, TypeError, "internal_batch_size"),
        ({"baselines": torch.zeros(3, 6)}, ValueError, "baselines"),
        ({"baselines": (0, 0)}, ValueError, "baselines"),
    ],
)
def test_argument_errors(cls, kwargs, error, name):
    model, layer, x, _ = _linear_case(torch.float64)
    extra = (0,) if cls == "NeuronIntegratedGradients" else ()
    with pytest.raises(error, match=name):
        getattr(fastattr, cls)(model, layer).attribute(x, *extra, **kwargs)


@pytest.mark.parametrize(
    ("target", "error"),
    [(3, IndexError), ([0, 1], ValueError), (torch.tensor([0.5]), TypeError), ("a", TypeError)],
)
def test_layer_ig_target_errors(target, error):
    model, layer, x, _ = _linear_case(torch.float64)
    with pytest.raises(error, match="target"):
        fastattr.LayerIntegratedGradients(model, layer).attribute(x, target=target, n_steps=3)
    _assert_as_found(model, _snapshot(model))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_huggingface_transformer_layer_is_attributed_at_its_hidden_states(attention):
    # BertLayer returns (hidden states, attention weights), the weights None under SDPA (the
    # default), where captum fails. Its hidden states are what its BertOutput returns.
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=30,
        hidden_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
        attn_implementation=attention,
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).double().eval()
    ids = torch.randint(1, 30, (2, 6))
    block = model.bert.encoder.layer[1]

    def logits(ids):
        return model(input_ids=ids).logits

    ours = fastattr.LayerIntegratedGradients(logits, block).attribute(ids, target=1, n_steps=9)
    hidden = ours if attention == "sdpa" else ours[0]
    theirs = captum_attr.LayerIntegratedGradients(logits, block.output).attribute(
        ids, target=1, n_steps=9
    )
    assert_same(hidden, theirs)
