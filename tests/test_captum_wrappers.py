"""captum's wrappers and utilities around fastattr's classes give what they give around captum's:
NoiseTunnel, LLMGradientAttribution, TCAV, the infidelity and sensitivity metrics,
visualization."""

from __future__ import annotations

import captum.attr as captum_attr
import numpy as np
import pytest
import torch
from captum.metrics import infidelity, sensitivity_max
from torch import Tensor, nn

import fastattr

F64 = {"rtol": 1e-10, "atol": 1e-12}


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)
    ).double()


def make(name: str, model: nn.Module, module=captum_attr):
    cls = getattr(module, name)
    if name in {"LayerIntegratedGradients", "NeuronIntegratedGradients"}:
        return cls(model, model[2])
    return cls(model)


def seeded_call(function, *args, **kwargs):
    torch.manual_seed(7)
    np.random.seed(7)  # captum draws baselines from the distribution with numpy
    return function(*args, **kwargs)


def assert_same(ours, theirs) -> None:
    if isinstance(theirs, (tuple, list)):
        assert type(ours) is type(theirs) and len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            assert_same(a, b)
    else:
        torch.testing.assert_close(ours, theirs, **F64)


# ----------------------------------------------------------------------------- NoiseTunnel

NT_CASES = [
    # (method, attribute arguments of the wrapped method)
    ("IntegratedGradients", {"target": 1, "n_steps": 7}),
    ("IntegratedGradients", {"target": [0, 2, 1, 1], "n_steps": 5, "method": "riemann_left"}),
    ("LayerIntegratedGradients", {"target": 2, "n_steps": 6}),
    ("NeuronIntegratedGradients", {"neuron_selector": 3, "n_steps": 6}),
    ("LRP", {"target": 1}),
]


@pytest.mark.parametrize("nt_type", ["smoothgrad", "smoothgrad_sq", "vargrad"])
@pytest.mark.parametrize(
    "name,kwargs", NT_CASES, ids=[c[0] + str(i) for i, c in enumerate(NT_CASES)]
)
def test_noise_tunnel_gives_captums_numbers(name, kwargs, nt_type):
    model = mlp()
    x = torch.randn(4, 5, dtype=torch.float64)
    options = {"nt_type": nt_type, "nt_samples": 5, "stdevs": 0.3, **kwargs}
    with_delta = name in {"IntegratedGradients", "LayerIntegratedGradients", "LRP"}
    runs = [options, {**options, "nt_samples_batch_size": 2}]
    if with_delta:
        runs.append({**options, "return_convergence_delta": True})
    for run in runs:
        ours = seeded_call(captum_attr.NoiseTunnel(make(name, model, fastattr)).attribute, x, **run)
        theirs = seeded_call(captum_attr.NoiseTunnel(make(name, model)).attribute, x, **run)
        assert_same(ours, theirs)


@pytest.mark.parametrize("name", ["IntegratedGradients", "LayerIntegratedGradients"])
def test_noise_tunnel_draws_baselines_from_a_distribution(name):
    model = mlp()
    x = torch.randn(3, 5, dtype=torch.float64)
    distribution = torch.randn(10, 5, dtype=torch.float64)
    run = {
        "nt_type": "smoothgrad",
        "nt_samples": 4,
        "nt_samples_batch_size": 3,
        "stdevs": 0.2,
        "draw_baseline_from_distrib": True,
        "baselines": distribution,
        "target": 0,
        "n_steps": 5,
    }
    ours = seeded_call(captum_attr.NoiseTunnel(make(name, model, fastattr)).attribute, x, **run)
    theirs = seeded_call(captum_attr.NoiseTunnel(make(name, model)).attribute, x, **run)
    assert_same(ours, theirs)


def test_noise_tunnel_sees_a_gradient_method():
    # captum's NoiseTunnel makes the noisy inputs require grad for gradient methods only.
    for name in (
        "IntegratedGradients",
        "LayerIntegratedGradients",
        "NeuronIntegratedGradients",
        "LRP",
    ):
        tunnel = captum_attr.NoiseTunnel(make(name, mlp(), fastattr))
        assert tunnel.is_gradient_method
        assert tunnel.multiplies_by_inputs is make(name, mlp()).multiplies_by_inputs
    assert captum_attr.NoiseTunnel(fastattr.IntegratedGradients(mlp())).has_convergence_delta()


@pytest.mark.parametrize("name", ["IntegratedGradients", "LRP"])
def test_inputs_that_require_grad_are_accepted(name):
    model = mlp()
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    ours = make(name, model, fastattr).attribute(x, target=2)
    theirs = make(name, model).attribute(x, target=2)
    assert_same(ours, theirs)
    assert x.grad is None


# ----------------------------------------------------------------------------- metrics


def test_infidelity_and_sensitivity_with_fastattr():
    model = mlp()
    x = torch.randn(4, 5, dtype=torch.float64)

    def perturb(inputs):
        noise = torch.randn_like(inputs) * 0.1
        return noise, inputs - noise

    for name in ("IntegratedGradients", "LRP"):
        ours, theirs = make(name, model, fastattr), make(name, model)
        attributions = ours.attribute(x, target=1)
        assert_same(attributions, theirs.attribute(x, target=1))
        results = [
            seeded_call(infidelity, model, perturb, x, attribution, target=1, n_perturb_samples=6)
            for attribution in (attributions, theirs.attribute(x, target=1))
        ]
        assert_same(*results)
        results = [
            seeded_call(sensitivity_max, method.attribute, x, target=1, n_perturb_samples=3)
            for method in (ours, theirs)
        ]
        assert_same(*results)


def test_visualization_takes_fastattr_attributions():
    import matplotlib

    matplotlib.use("Agg")
    from captum.attr import visualization

    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3)
    )
    model = model.double().eval()
    image = torch.rand(1, 3, 6, 6, dtype=torch.float64)
    ours = fastattr.IntegratedGradients(model).attribute(image, target=1, n_steps=5)
    theirs = captum_attr.IntegratedGradients(model).attribute(image, target=1, n_steps=5)
    assert_same(ours, theirs)
    arrays = [a.squeeze(0).permute(1, 2, 0).numpy() for a in (ours, theirs)]
    original = image.squeeze(0).permute(1, 2, 0).numpy()
    figures = []
    for array in arrays:
        figure, axis = visualization.visualize_image_attr(
            array, original, method="blended_heat_map", sign="all", use_pyplot=False
        )
        figures.append(figure)
        assert axis.images
    np.testing.assert_allclose(
        figures[0].axes[0].images[-1].get_array(),
        figures[1].axes[0].images[-1].get_array(),
        rtol=1e-10,
        atol=1e-12,
    )


# ----------------------------------------------------------------------------- LLM attribution


def tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    words = "the a cat dog sat on mat ran home fast slow big red".split()
    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", bos_token="<eos>"
    )
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=len(vocab), n_positions=32, n_embd=16, n_layer=2, n_head=2
    )
    model = transformers.GPT2LMHeadModel(config).double().eval()
    return model, tokenizer


@pytest.mark.parametrize("target", ["sat on the mat", "ran"])
def test_llm_gradient_attribution_with_fastattr_layer_ig(target):
    model, tokenizer = tiny_gpt2()
    prompt = captum_attr.TextTokenInput("the big red cat", tokenizer)
    results = []
    for module in (fastattr, captum_attr):
        method = module.LayerIntegratedGradients(model, model.transformer.wte)
        llm = captum_attr.LLMGradientAttribution(method, tokenizer)
        results.append(llm.attribute(prompt, target=target, n_steps=8))
    ours, theirs = results
    assert ours.token_attr.shape == theirs.token_attr.shape == (len(target.split()), 4)
    assert_same(ours.seq_attr, theirs.seq_attr)
    assert_same(ours.token_attr, theirs.token_attr)
    assert ours.output_tokens == theirs.output_tokens


def test_llm_forward_args_keep_their_length():
    # LLMGradientAttribution passes the target's tokens, (T,), with a batch of one: captum
    # repeats them once per step along dimension 0, and so does fastattr.
    seen = []

    def forward(x: Tensor, tokens: Tensor, index: int) -> Tensor:
        seen.append((x.shape[0], tokens.shape[0]))
        return (x * tokens[index].to(x.dtype)).sum(1)

    x = torch.randn(1, 3, dtype=torch.float64)
    tokens = torch.tensor([3, 5, 7])
    for cls in (fastattr.IntegratedGradients, captum_attr.IntegratedGradients):
        seen.clear()
        result = cls(forward).attribute(x, additional_forward_args=(tokens, 2), n_steps=4)
        torch.testing.assert_close(result, x * 7, **F64)
        assert all(length == 3 * rows for rows, length in seen), seen


# ----------------------------------------------------------------------------- TCAV


def test_tcav_with_fastattr_layer_ig(tmp_path):
    # captum's TCAV takes a layer method built without a layer (layer=None) and sets its
    # layer before each call; with captum's LayerIntegratedGradients the scores are the same.
    from captum.concept import TCAV, Classifier, Concept
    from torch.utils.data import DataLoader

    class MeanDifference(Classifier):
        """Each concept's vector: its mean activation (no sklearn needed)."""

        def __init__(self) -> None:
            self.means: Tensor | None = None
            self.labels: list[int] = []

        def train_and_eval(self, dataloader, **kwargs):
            batches = list(dataloader)
            activations = torch.cat([a for a, _ in batches])
            labels = torch.cat([y for _, y in batches])
            self.labels = sorted(set(labels.tolist()))
            self.means = torch.stack([activations[labels == c].mean(0) for c in self.labels])
            return {"accs": torch.tensor(1.0)}

        def weights(self) -> Tensor:
            return self.means

        def classes(self) -> list[int]:
            return self.labels

    model = mlp().eval()
    generator = torch.Generator().manual_seed(3)

    def concept(index: int, shift: float) -> Concept:
        rows = torch.randn(12, 5, generator=generator, dtype=torch.float64) + shift
        return Concept(index, f"concept{index}", DataLoader(rows, batch_size=4))

    concepts = [concept(0, 1.0), concept(1, -1.0)]
    x = torch.randn(4, 5, generator=generator, dtype=torch.float64)
    scores = []
    for library in (fastattr, captum_attr):
        method = library.LayerIntegratedGradients(model, None, multiply_by_inputs=False)
        tcav = TCAV(
            model,
            layers=["0", "2"],
            layer_attr_method=method,
            classifier=MeanDifference(),
            save_path=str(tmp_path / library.__name__),
        )
        result = tcav.interpret(x, experimental_sets=[concepts], target=1, n_steps=6)
        scores.append(
            {
                (c, layer, kind): value
                for c, per_layer in result.items()
                for layer, kinds in per_layer.items()
                for kind, value in kinds.items()
            }
        )
    assert scores[0].keys() == scores[1].keys() and scores[0]
    for key, value in scores[1].items():
        torch.testing.assert_close(scores[0][key], value, **F64)


def test_layer_ig_without_a_layer_says_so():
    model = mlp()
    method = fastattr.LayerIntegratedGradients(model, None)
    with pytest.raises(TypeError, match="layer is None"):
        method.attribute(torch.randn(2, 5, dtype=torch.float64), target=0)


# ----------------------------------------------------------------------------- ModelInputWrapper


class ImageQuestionNet(nn.Module):
    """The shape of captum's VQA tutorial model: an image, and a question of token ids whose
    lengths pack an LSTM."""

    def __init__(self) -> None:
        super().__init__()
        self.vision = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1)
        )
        self.embedding = nn.Embedding(12, 5, padding_idx=0)
        self.lstm = nn.LSTM(5, 4, batch_first=True)
        self.classifier = nn.Linear(8, 3)

    def forward(self, image: Tensor, question: Tensor, lengths: Tensor) -> Tensor:
        words = torch.tanh(self.embedding(question))
        packed = nn.utils.rnn.pack_padded_sequence(
            words, lengths, batch_first=True, enforce_sorted=False
        )
        _, (_, cell) = self.lstm(packed)
        return self.classifier(torch.cat([self.vision(image).flatten(1), cell[0]], 1))


def test_model_input_wrapper_layers_as_in_the_vqa_tutorial():
    # The tutorial attributes the image through the identity layer ModelInputWrapper puts on
    # each input, and the question through the embedding, with the model in DataParallel and
    # the question lengths as an additional argument.
    from captum.attr._utils.input_layer_wrapper import ModelInputWrapper

    torch.manual_seed(0)
    model = nn.DataParallel(ModelInputWrapper(ImageQuestionNet().double().eval()))
    layers = [model.module.input_maps["image"], model.module.module.embedding]
    image = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    question, lengths = torch.tensor([[4, 7, 9, 3], [5, 2, 0, 0]]), torch.tensor([4, 2])
    reference = captum_attr.TokenReferenceBase(reference_token_idx=1).generate_reference(
        4, device="cpu"
    )
    results = [
        library.LayerIntegratedGradients(model, layers).attribute(
            (image, question),
            (image * 0.0, reference.expand_as(question)),
            additional_forward_args=lengths,
            target=torch.tensor([1, 2]),
            n_steps=12,
            return_convergence_delta=True,
        )
        for library in (fastattr, captum_attr)
    ]
    assert_same(*results)
