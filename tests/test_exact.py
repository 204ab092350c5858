"""method="exact": integrated gradients of piecewise-linear models as a finite sum over the
affine pieces of each path.

Oracles: an independent ExactLine for sequential Linear/ReLU nets (pieces and attributions
to float64 rounding), the 20000-node Gauss-Legendre rule (to its proven error bound), captum
at 20000 Riemann steps for the layer and neuron methods, and completeness (the attributions
sum to the change of the output) for every example. Bad models must fail naming the module
or op; the model must be left as found.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from fastattr import IntegratedGradients, LayerIntegratedGradients, NeuronIntegratedGradients

captum_attr = pytest.importorskip("captum.attr")

REFERENCE_STEPS = 20000


def seeded(module: nn.Module, seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """``module`` with parameters (and batch-norm statistics) drawn from ``seed``, in eval
    mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.6)
        for sub in module.modules():
            if isinstance(sub, nn.BatchNorm2d):
                sub.running_mean.copy_(torch.rand(sub.num_features, generator=generator) - 0.5)
                sub.running_var.copy_(torch.rand(sub.num_features, generator=generator) + 0.5)
    return module.to(dtype).eval()


def data(*shape: int, seed: int = 1, dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def relu_mlp(seed: int = 0) -> nn.Module:
    return seeded(
        nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)),
        seed,
    )


def leaky_mlp() -> nn.Module:
    return seeded(
        nn.Sequential(
            nn.Linear(6, 12), nn.LeakyReLU(0.1), nn.Linear(12, 12), nn.ReLU6(),
            nn.Linear(12, 12), nn.Hardtanh(-0.5, 0.8), nn.Linear(12, 3),
        )
    )  # fmt: skip


def cnn() -> nn.Module:
    """Conv, eval batch norm, ReLU, max and average pooling, Flatten (modules)."""
    return seeded(
        nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(inplace=True), nn.AvgPool2d(2),
            nn.Flatten(), nn.Linear(6 * 2 * 2, 3),
        )
    )  # fmt: skip


class FunctionalResidual(nn.Module):
    """Functional forms: F.relu, Tensor.relu, in-place relu_ and +=, torch.max_pool2d, a
    residual `+`, cat, clamp, maximum, view, a global max (amax) and adaptive max pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4 * 2 * 2 + 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.max_pool2d(F.relu(self.bn(self.conv1(x))), 2)
        r = self.conv2(h).relu()
        h = h + r
        h = torch.cat([h.clamp(min=0.1), torch.maximum(h, -r)], 1)
        h = self.conv3(h)
        h += 0.5 * r
        h.relu_()
        pooled = F.adaptive_max_pool2d(h, 2).view(h.shape[0], -1)
        return self.fc(torch.cat([pooled, h.amax((2, 3))], 1))


class TwoInputs(nn.Module):
    """Two input tensors and a per-example mask as an additional argument."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 10)
        self.b = nn.Linear(4, 10)
        self.out = nn.Linear(10, 3)

    def forward(self, x: Tensor, y: Tensor, mask: Tensor, scale: float) -> Tensor:
        return self.out(F.relu(self.a(x * mask)) + F.leaky_relu(self.b(y.flatten(1))) * scale)


# ------------------------------------------------------------------------------- oracles


def gauss_legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The n-point Gauss-Legendre rule on [0, 1]: Newton's method on the Legendre recurrence
    from Tricomi's estimates (numpy's leggauss costs O(n^3): hours for 20000 nodes)."""
    k = np.arange(1, (n + 1) // 2 + 1)
    x = (1 - 1 / (8 * n**2) + 1 / (8 * n**3)) * np.cos(np.pi * (4 * k - 1) / (4 * n + 2))
    for _ in range(20):
        p0, p1 = np.ones_like(x), x.copy()
        for j in range(2, n + 1):
            p0, p1 = p1, ((2 * j - 1) * x * p1 - (j - 1) * p0) / j
        derivative = n * (x * p1 - p0) / (x * x - 1)
        step = p1 / derivative
        if np.abs(step).max() < 1e-15:  # the weights need the derivative at the last nodes
            break
        x = x - step
    weights = 2 / ((1 - x * x) * derivative**2)
    nodes = np.concatenate([-x, x[::-1][n % 2 :]])
    weights = np.concatenate([weights, weights[::-1][n % 2 :]])
    return (1 + nodes) / 2, weights / 2


@pytest.fixture(scope="module")
def reference_rule() -> tuple[Tensor, Tensor]:
    alphas, weights = gauss_legendre(REFERENCE_STEPS)
    return torch.from_numpy(alphas), torch.from_numpy(weights)


def test_gauss_legendre_nodes_match_numpy() -> None:
    for n in (7, 64):
        alphas, weights = gauss_legendre(n)
        nodes, expected = np.polynomial.legendre.leggauss(n)
        order = np.argsort(alphas)
        np.testing.assert_allclose(alphas[order], (1 + nodes) / 2, rtol=0, atol=1e-15)
        # Both rules are rounded (numpy's polishes its nodes once): 1e-11 is far below what
        # the reference needs.
        np.testing.assert_allclose(weights[order], expected / 2, rtol=1e-11, atol=0)
        assert abs(weights.sum() - 1) < 1e-14


def quadrature(forward, inputs, baselines, target_rows, alphas, weights, args_rows=None):
    """Integrated gradients by a rule (alphas, weights), with plain autograd in chunks, and
    per example and feature the gradient's variation between neighbouring nodes."""
    totals = [torch.zeros_like(x) for x in inputs]
    variation = [torch.zeros_like(x) for x in inputs]
    previous = None
    batch = inputs[0].shape[0]
    order = torch.argsort(alphas)
    for chunk in order.split(2000):
        a = alphas[chunk]
        points = tuple(
            (s + a.view(-1, *[1] * x.dim()) * (x - s)).reshape(-1, *x.shape[1:]).requires_grad_()
            for x, s in zip(inputs, baselines)
        )
        extra = args_rows(len(chunk)) if args_rows else ()
        output = forward(*points, *extra)
        selected = output.gather(1, target_rows.repeat(len(chunk)).view(-1, 1))
        grads = torch.autograd.grad(selected.sum(), points)
        for k, grad in enumerate(grads):
            grad = grad.view(len(chunk), batch, *inputs[k].shape[1:])
            totals[k] += (weights[chunk].view(-1, *[1] * inputs[k].dim()) * grad).sum(0)
            start = previous[k] if previous is not None else grad[:1]
            steps = torch.cat([start, grad]).diff(dim=0).abs().sum(0)
            variation[k] += steps
        previous = [g.view(len(chunk), batch, *x.shape[1:])[-1:] for g, x in zip(grads, inputs)]
    return (
        tuple(t * (x - s) for t, x, s in zip(totals, inputs, baselines)),
        tuple(v * (x - s).abs() for v, x, s in zip(variation, inputs, baselines)),
    )


def assert_within_reference(ours, reference, variation, max_weight):
    """The Gauss-Legendre nodes separate its cumulative weights (Chebyshev-Markov-Stieltjes),
    so across each jump of a piecewise-constant gradient the rule errs by at most the largest
    weight: per feature, |error| <= variation * max weight. Twice the variation seen between
    neighbouring nodes covers jumps that cancel between two nodes."""
    for o, r, v in zip(ours, reference, variation):
        bound = 2 * v * max_weight + 1e-12 * r.abs().max()
        assert ((o - r).abs() <= bound).all(), float(((o - r).abs() - bound).max())


def exactline(model: nn.Sequential, x: Tensor, s: Tensor, target: int) -> tuple[Tensor, int]:
    """ExactLine (Sotoudeh and Thakur) for a sequential Linear/ReLU net, one example: layer by
    layer, the ReLU's crossings between neighbouring points (where every earlier ReLU keeps
    its sign, so the pre-activation is affine) are added to the points. Returns the
    attributions and the number of pieces."""
    alphas = torch.tensor([0.0, 1.0], dtype=torch.float64)
    for depth, layer in enumerate(model):
        if not isinstance(layer, nn.ReLU):
            continue
        with torch.no_grad():
            z = model[:depth](s + alphas[:, None] * (x - s))
        za, zb = z[:-1], z[1:]
        crossing = za * zb < 0
        t = za / (za - zb)
        pair = crossing.nonzero()[:, 0]
        new = alphas[pair] + t[crossing] * (alphas[pair + 1] - alphas[pair])
        alphas = torch.unique(torch.cat([alphas, new]))
    middles = ((alphas[:-1] + alphas[1:]) / 2)[:, None]
    points = (s + middles * (x - s)).requires_grad_()
    (grads,) = torch.autograd.grad(model(points)[:, target].sum(), points)
    return (alphas.diff()[:, None] * grads).sum(0) * (x - s), alphas.numel() - 1


def assert_complete(attributions, delta, rtol: float = 1e-12) -> None:
    """Completeness for every example, relative to the attributions' magnitude."""
    attributions = attributions if isinstance(attributions, tuple) else (attributions,)
    scale = sum(a.abs().flatten(1).sum(1) for a in attributions)
    assert (delta.abs() <= rtol * scale + 1e-300).all(), (delta / scale).tolist()


def snapshot(model: nn.Module) -> dict[str, object]:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "hooks": [
            (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for m in model.modules()
        ],
    }


def assert_as_found(model: nn.Module, before: dict[str, object]) -> None:
    after = snapshot(model)
    assert after["training"] == before["training"]
    assert after["hooks"] == before["hooks"]
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key
    assert _get_current_dispatch_mode() is None


# ------------------------------------------------------------------------------ behaviour


def test_pieces_and_attributions_match_exactline() -> None:
    model = relu_mlp()
    # Examples of different lengths: one of zero length (one piece), a short one, long ones.
    baselines = data(1, 6, seed=2) * 0.3
    inputs = data(4, 6) * torch.tensor([[0.0], [0.05], [1.0], [3.0]], dtype=torch.float64)
    inputs[0] = baselines[0]
    targets = [0, 2, 1, 2]
    before = snapshot(model)
    attributions, delta, pieces = IntegratedGradients(model).attribute(
        inputs, baselines, target=targets, method="exact", return_convergence_delta=True,
        return_n_steps=True,
    )  # fmt: skip
    assert_as_found(model, before)
    for b in range(4):
        expected, count = exactline(model, inputs[b], baselines[0], targets[b])
        torch.testing.assert_close(attributions[b], expected, rtol=1e-11, atol=1e-13)
        assert pieces[b] == count
    assert pieces.dtype == torch.int64
    assert pieces[0] == 1 and len(set(pieces.tolist())) > 2
    assert_complete(attributions, delta)


def test_return_n_steps() -> None:
    """The steps come last, after the delta; a quadrature rule takes n_steps everywhere."""
    model = relu_mlp()
    inputs = data(3, 6)
    ig = IntegratedGradients(model)
    attributions, steps = ig.attribute(inputs, target=0, n_steps=12, return_n_steps=True)
    assert steps.tolist() == [12, 12, 12]
    torch.testing.assert_close(attributions, ig.attribute(inputs, target=0, n_steps=12))
    _, pieces = ig.attribute(inputs, target=0, method="exact", return_n_steps=True)
    _, _, layer_pieces = LayerIntegratedGradients(model, model[0]).attribute(
        inputs, target=0, method="exact", return_convergence_delta=True, return_n_steps=True
    )
    # The layer's path crosses the same kinks as the input's: the first layer is affine.
    assert layer_pieces.tolist() == pieces.tolist()
    _, neuron_pieces = NeuronIntegratedGradients(model, model[2]).attribute(
        inputs, (0,), method="exact", return_n_steps=True
    )
    assert (neuron_pieces <= pieces).all()


@pytest.mark.parametrize(
    "build, shape",
    [(relu_mlp, (6,)), (leaky_mlp, (6,)), (cnn, (3, 8, 8)), (FunctionalResidual, (3, 8, 8))],
    ids=["relu-mlp", "leaky-relu6-hardtanh-mlp", "cnn-bn-maxpool", "functional-residual"],
)
def test_against_gauss_legendre(build, shape, reference_rule) -> None:
    model = seeded(build()) if build is FunctionalResidual else build()
    inputs = data(3, *shape)
    baselines = data(3, *shape, seed=5) * 0.5
    target = torch.tensor([0, 2, 1])
    before = snapshot(model)
    attributions, delta = IntegratedGradients(model).attribute(
        inputs, baselines, target=target, method="exact", return_convergence_delta=True
    )
    assert_as_found(model, before)
    assert_complete(attributions, delta)
    alphas, weights = reference_rule
    reference, variation = quadrature(model, (inputs,), (baselines,), target, alphas, weights)
    assert_within_reference((attributions,), reference, variation, weights.max())
    # The exact integral is what captum's default approximates: 50 nodes are visibly off.
    coarse = captum_attr.IntegratedGradients(model).attribute(inputs, baselines, target=target)
    assert (coarse - attributions).abs().max() > 10 * (reference[0] - attributions).abs().max()


def test_tuple_inputs_baseline_forms_and_arguments(reference_rule) -> None:
    model = seeded(TwoInputs())
    x, y = data(4, 6), data(4, 2, 2, seed=3)
    mask = (data(4, 6, seed=4) > -0.5).double()
    target = [2, 0, 1, 1]
    ig = IntegratedGradients(model)
    forms = [None, (0.25, -1), (data(1, 6, seed=6), 0), (data(4, 6, seed=7), data(4, 2, 2))]
    for baselines in forms:
        attributions, delta = ig.attribute(
            (x, y), baselines, target=target, additional_forward_args=(mask, 1.5),
            method="exact", return_convergence_delta=True,
        )  # fmt: skip
        assert isinstance(attributions, tuple) and len(attributions) == 2
        assert_complete(attributions, delta)
    alphas, weights = reference_rule
    starts = tuple(b.expand_as(i) for b, i in zip(baselines, (x, y)))
    reference, variation = quadrature(
        model, (x, y), starts, torch.tensor(target), alphas, weights,
        args_rows=lambda steps: (mask.repeat(steps, 1), 1.5),
    )  # fmt: skip
    assert_within_reference(attributions, reference, variation, weights.max())


def test_float32_is_complete_to_float32_rounding() -> None:
    model = cnn().float()
    inputs = data(2, 3, 8, 8, dtype=torch.float32)
    attributions, delta = IntegratedGradients(model).attribute(
        inputs, target=1, method="exact", return_convergence_delta=True
    )
    assert attributions.dtype == torch.float32
    assert_complete(attributions, delta, rtol=1e-5)


def test_local_attributions_and_chunks() -> None:
    """multiply_by_inputs=False gives the mean gradient; small chunks give the same result."""
    model = cnn()
    inputs = data(2, 3, 8, 8)
    whole = IntegratedGradients(model, multiply_by_inputs=False).attribute(
        inputs, target=0, method="exact"
    )
    chunked = IntegratedGradients(model, multiply_by_inputs=False).attribute(
        inputs, target=0, method="exact", internal_batch_size=32
    )
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-14)
    global_ = IntegratedGradients(model).attribute(inputs, target=0, method="exact")
    torch.testing.assert_close(global_, whole * inputs, rtol=1e-12, atol=1e-14)


def test_layer_and_neuron_methods(reference_rule) -> None:
    """The path runs through the part of the model after the layer (LayerIntegratedGradients)
    or before the neuron (NeuronIntegratedGradients): what is not piecewise linear elsewhere
    is fine. Against Gauss-Legendre on that part, and captum at 2000 midpoint steps (which
    errs by at most one step per unit of the gradient's variation)."""
    inputs = data(2, 6)
    zeros = torch.zeros_like(inputs)
    alphas, weights = reference_rule
    riemann = {"n_steps": 2000, "method": "riemann_middle"}
    first = torch.zeros(2, dtype=torch.long)

    gelu_first = seeded(
        nn.Sequential(
            nn.Linear(6, 10), nn.GELU(), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 10),
            nn.ReLU(), nn.Linear(10, 3),
        )
    )  # fmt: skip
    layer = LayerIntegratedGradients(gelu_first, gelu_first[2])
    ours, delta = layer.attribute(inputs, target=1, method="exact", return_convergence_delta=True)
    assert_complete(ours, delta)
    with torch.no_grad():
        ends, starts = gelu_first[:3](inputs), gelu_first[:3](zeros)
    reference, variation = quadrature(
        lambda h: gelu_first[3:](h)[:, 1:2], (ends,), (starts,), first, alphas, weights
    )
    assert_within_reference((ours,), reference, variation, weights.max())
    theirs = captum_attr.LayerIntegratedGradients(gelu_first, gelu_first[2]).attribute(
        inputs, target=1, **riemann
    )
    assert_within_reference((ours,), (theirs,), variation, 1 / 2000)

    gelu_last = seeded(
        nn.Sequential(
            nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 10),
            nn.GELU(), nn.Linear(10, 3), nn.Softmax(-1),
        )
    )  # fmt: skip
    ours = NeuronIntegratedGradients(gelu_last, gelu_last[4]).attribute(
        inputs, (3,), method="exact"
    )
    reference, variation = quadrature(
        lambda x: gelu_last[:5](x)[:, 3:4], (inputs,), (zeros,), first, alphas, weights
    )
    assert_within_reference((ours,), reference, variation, weights.max())
    theirs = captum_attr.NeuronIntegratedGradients(gelu_last, gelu_last[4]).attribute(
        inputs, (3,), **riemann
    )
    assert_within_reference((ours,), (theirs,), variation, 1 / 2000)
    with pytest.raises(ValueError, match=r"module '5' \(GELU\)"):
        LayerIntegratedGradients(gelu_last, gelu_last[4]).attribute(
            inputs, target=1, method="exact"
        )


def test_threads_share_a_model() -> None:
    model = cnn()
    inputs = [data(2, 3, 8, 8, seed=s) for s in range(4)]
    ig = IntegratedGradients(model)
    expected = [ig.attribute(x, target=1, method="exact") for x in inputs]
    results: list[Tensor | None] = [None] * 4

    def work(k: int) -> None:
        results[k] = ig.attribute(inputs[k], target=1, method="exact")

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for got, want in zip(results, expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------ bad models


class GeluInside(nn.Module):
    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.act = nn.GELU()
        self.out = nn.Linear(8, 3)
        self.functional = functional

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x).relu()
        return self.out(F.gelu(h) if self.functional else self.act(h))


@pytest.mark.parametrize(
    "model, message",
    [
        (seeded(GeluInside(False)), r"module 'act' \(GELU\).*aten\.gelu.*not piecewise linear"),
        (
            seeded(GeluInside(True)),
            r"the model \(GeluInside\), at .*test_exact\.py:\d+.*aten\.gelu",
        ),
        (
            seeded(nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3))),
            r"module '1' \(LayerNorm\).*native_layer_norm",
        ),
    ],
    ids=["gelu-module", "gelu-functional", "layer-norm"],
)
def test_not_piecewise_linear_names_the_module(model, message) -> None:
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        IntegratedGradients(model).attribute(data(2, 6), target=0, method="exact")
    assert_as_found(model, before)


def test_products_and_wrappers_are_refused() -> None:
    model = relu_mlp()
    with pytest.raises(ValueError, match="multiplies two values that depend on the input"):
        IntegratedGradients(lambda x: model(x) * model(x)).attribute(
            data(2, 6), target=0, method="exact"
        )
    with pytest.raises(ValueError, match=r"aten\._softmax.*not piecewise linear"):
        IntegratedGradients(lambda x: model(x).softmax(-1)).attribute(
            data(2, 6), target=0, method="exact"
        )


class WrittenIntoBuffer(nn.Module):
    """Values that depend on the input written into a fresh buffer through a view."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.zeros(x.shape[0], 10, dtype=x.dtype)
        out[:, :4] = self.fc(x)
        out[:, 4:] = x
        return torch.sigmoid(out)


def test_values_written_into_a_buffer_are_followed() -> None:
    with pytest.raises(ValueError, match=r"the model \(WrittenIntoBuffer\).*aten\.sigmoid"):
        IntegratedGradients(seeded(WrittenIntoBuffer())).attribute(
            data(2, 6), target=0, method="exact"
        )


def test_training_mode_batch_norm_is_refused_before_running() -> None:
    model = cnn().train()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"module '1' \(BatchNorm2d\) is in training mode"):
        IntegratedGradients(model).attribute(data(2, 3, 8, 8), target=0, method="exact")
    assert_as_found(model, before)

    # Behind a plain function the module can't be seen: the op itself is refused.
    batch_norm = seeded(nn.BatchNorm1d(6))
    with pytest.raises(ValueError, match="batch norm in training mode"):
        IntegratedGradients(
            lambda x: F.batch_norm(
                x, batch_norm.running_mean, batch_norm.running_var, training=True
            )
        ).attribute(data(3, 6), method="exact")


def test_interrupted_forward_leaves_the_model_as_found() -> None:
    model = cnn()
    calls = [0]

    def interrupt(module, args, output):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt

    handle = model[0].register_forward_hook(interrupt)
    before = snapshot(model)
    with pytest.raises(KeyboardInterrupt):
        IntegratedGradients(model).attribute(data(2, 3, 8, 8), target=0, method="exact")
    assert_as_found(model, before)
    handle.remove()


def test_method_exact_ignores_n_steps() -> None:
    model = relu_mlp()
    inputs = data(2, 6)
    ig = IntegratedGradients(model)
    torch.testing.assert_close(
        ig.attribute(inputs, target=0, method="exact", n_steps=7),
        ig.attribute(inputs, target=0, method="exact"),
        rtol=0,
        atol=0,
    )
    with pytest.raises(ValueError, match="method must be one of"):
        ig.attribute(inputs, target=0, method="exactly")


def test_rounds_are_bounded(monkeypatch) -> None:
    """A model whose kinks keep splitting the path beyond what its kinks can explain (here: a
    bound lowered to one round) stops with an error instead of running on."""
    import fastattr._exact as exact

    monkeypatch.setattr(exact, "MIN_ROUNDS", 1)
    monkeypatch.setattr(exact, "ROUNDS_PER_KINK", 0)
    with pytest.raises(RuntimeError, match="did not finish splitting the path after 1 rounds"):
        IntegratedGradients(relu_mlp()).attribute(data(2, 6), target=0, method="exact")


def test_attribute_targets_share_the_pieces() -> None:
    """method='exact' through attribute_targets: each result (attributions, delta, pieces) is
    attribute()'s for that target, for IG, LayerIG and NeuronIG."""
    model = relu_mlp()
    inputs, baselines = data(5, 6), data(5, 6, seed=2)
    ig = IntegratedGradients(model)
    many = ig.attribute_targets(
        inputs, [0, [1, 2, 0, 1, 2]], baselines=baselines, method="exact",
        return_convergence_delta=True, return_n_steps=True,
    )  # fmt: skip
    for target, (attributions, delta, pieces) in zip([0, [1, 2, 0, 1, 2]], many):
        want = ig.attribute(
            inputs, baselines=baselines, target=target, method="exact",
            return_convergence_delta=True, return_n_steps=True,
        )  # fmt: skip
        torch.testing.assert_close(attributions, want[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(delta, want[1], rtol=0, atol=1e-12)
        assert torch.equal(pieces, want[2])
        assert_complete(attributions, delta)
    layer = LayerIntegratedGradients(model, model[1])
    (lig,) = layer.attribute_targets(inputs, [2], method="exact")
    torch.testing.assert_close(lig, layer.attribute(inputs, target=2, method="exact"))
    neuron = NeuronIntegratedGradients(model, model[1])
    nig = neuron.attribute_targets(inputs, [0, 3], method="exact")
    torch.testing.assert_close(nig[1], neuron.attribute(inputs, 3, method="exact"))


def test_exact_needs_one_output_per_example_and_batched_arguments() -> None:
    """What only captum's whole-path chunking makes sense of is refused by method='exact',
    naming what is wrong: an output reduced over the batch, an argument without a batch
    dimension."""
    model = relu_mlp()
    inputs = data(3, 6)
    with pytest.raises(ValueError, match="method='exact' needs the selected output"):
        IntegratedGradients(lambda x: model(x)[:, 0].sum().unsqueeze(0)).attribute(
            inputs, method="exact"
        )

    def shifted(x: Tensor, shift: Tensor) -> Tensor:
        return model(x + shift[0])

    with pytest.raises(ValueError, match="additional_forward_args must hold one row"):
        IntegratedGradients(shifted).attribute(
            inputs, target=0, additional_forward_args=(torch.ones(1, dtype=inputs.dtype),),
            method="exact",
        )  # fmt: skip
