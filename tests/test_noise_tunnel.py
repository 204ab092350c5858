"""fastattr.NoiseTunnel against captum.attr.NoiseTunnel, with the same seeds.

The noise must be captum's draw for draw (same generator, calls, order and shapes), so float64
results agree to rounding and the generators end where captum leaves them; around the
integrated-gradients methods the noisy copies stream through the path engine a group at a
time, and memory stays bounded by a chunk as nt_samples grows.
"""

from __future__ import annotations

import weakref

import captum.attr as captum_attr
import numpy as np
import pytest
import torch
from seeding import seeded  # tests/seeding.py (pytest puts tests/ on sys.path)
from torch import Tensor, nn

import fastattr
import fastattr._path_integral as path_integral
from fastattr import NoiseTunnel

NT_TYPES = ("smoothgrad", "smoothgrad_sq", "vargrad")


def mlp() -> nn.Module:
    return seeded(
        nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 4))
    )


class Pair(nn.Module):
    """Two inputs (one with rows of fewer than 16 values) and a per-example argument."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 8)
        self.b = nn.Conv2d(2, 8, 3)
        self.out = nn.Linear(8, 4)

    def forward(self, x: Tensor, image: Tensor, scale: Tensor) -> Tensor:
        mixed = torch.tanh(self.a(x)) * self.b(image).mean((2, 3)) * scale
        return self.out(mixed)


def data(*shape: int, seed: int = 1) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def run_both(make, inputs, seed: int = 0, **kwargs):
    """fastattr's and captum's NoiseTunnel around ``make(library)``, from the same torch and
    numpy seeds; also checks that both leave the generators in the same state."""
    results, states = [], []
    for library in (fastattr, captum_attr):
        torch.manual_seed(seed)
        np.random.seed(seed)
        results.append(library.NoiseTunnel(make(library)).attribute(inputs, **kwargs))
        states.append((torch.get_rng_state(), np.random.get_state()[1].copy()))
    assert torch.equal(states[0][0], states[1][0]), "torch's generator ends elsewhere"
    assert np.array_equal(states[0][1], states[1][1]), "numpy's generator ends elsewhere"
    return results


def assert_close(actual, expected) -> None:
    if isinstance(expected, (tuple, list)):
        assert type(actual) is type(expected) and len(actual) == len(expected)
        for a, e in zip(actual, expected):
            assert_close(a, e)
        return
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    scale = max(float(expected.abs().max()), 1e-30) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12 * scale)


@pytest.fixture(params=[1 << 29, 3000], ids=["default-budget", "small-budget"])
def budget(request, monkeypatch):
    """The default chunk budget (one group of copies) and a small one: many groups of copies,
    the noise drawn a group at a time, chunks of a few points."""
    monkeypatch.setattr(path_integral, "CPU_CHUNK_BYTES", request.param)
    return request.param


# ----------------------------------------------------------------------------- agreement


@pytest.mark.parametrize("nt_type", NT_TYPES)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("nt_samples_batch_size", [None, 2, 4])
def test_integrated_gradients_match_captum(budget, nt_type, batch, nt_samples_batch_size):
    model = mlp()
    x = data(batch, 6)
    kwargs = dict(
        nt_type=nt_type,
        nt_samples=5,
        nt_samples_batch_size=nt_samples_batch_size,
        stdevs=0.3,
        target=2,
        n_steps=6,
        return_convergence_delta=True,
    )
    (ours, our_delta), (theirs, their_delta) = run_both(
        lambda lib: lib.IntegratedGradients(model), x, **kwargs
    )
    assert_close(ours, theirs)
    assert our_delta.shape == (5 * batch,)
    assert_close(our_delta, their_delta)


@pytest.mark.parametrize("draw", [False, True], ids=["given", "drawn"])
def test_tuple_inputs_baselines_targets_and_arguments(budget, draw):
    model = seeded(Pair())
    inputs = (data(3, 3), data(3, 2, 4, 4, seed=2))
    scale = data(3, 1, seed=3)
    baselines = (
        (data(5, 3, seed=4), data(5, 2, 4, 4, seed=5)) if draw else (0.5, data(3, 2, 4, 4, seed=6))
    )
    kwargs = dict(
        nt_type="vargrad",
        nt_samples=7,
        nt_samples_batch_size=3,
        stdevs=(0.2, 0.7),
        draw_baseline_from_distrib=draw,
        baselines=baselines,
        target=[0, 3, 1],
        additional_forward_args=(scale,),
        n_steps=5,
        method="riemann_trapezoid",
        return_convergence_delta=True,
    )
    (ours, our_delta), (theirs, their_delta) = run_both(
        lambda lib: lib.IntegratedGradients(model), inputs, **kwargs
    )
    assert isinstance(ours, tuple) and len(ours) == 2
    assert_close(ours, theirs)
    assert_close(our_delta, their_delta)


@pytest.mark.parametrize("target", [torch.tensor([2, 0, 1]), (1,)], ids=["tensor", "tuple"])
def test_other_target_forms_and_per_example_baselines(budget, target):
    model = mlp()
    x = data(3, 6)
    kwargs = dict(nt_samples=4, stdevs=0.5, target=target, baselines=data(3, 6, seed=9), n_steps=4)
    ours, theirs = run_both(lambda lib: lib.IntegratedGradients(model, False), x, **kwargs)
    assert_close(ours, theirs)


@pytest.mark.parametrize(
    ("cls", "layer", "kwargs"),
    [
        ("LayerIntegratedGradients", 1, dict(target=1, return_convergence_delta=True)),
        ("NeuronIntegratedGradients", 3, dict(neuron_selector=5)),
        ("LRP", None, dict(target=[1, 0, 3], return_convergence_delta=True)),
    ],
)
def test_other_methods_match_captum(budget, cls, layer, kwargs):
    model = mlp()
    x = data(3, 6)

    def make(library):
        return getattr(library, cls)(model, *(() if layer is None else (model[layer],)))

    kwargs = dict(nt_type="smoothgrad_sq", nt_samples=5, nt_samples_batch_size=2, **kwargs)
    ours, theirs = run_both(make, x, **kwargs)
    assert_close(ours, theirs)


class Columns(nn.Module):
    """Forward arguments of every kind: a list of columns, a one-value tensor, a number."""

    def __init__(self) -> None:
        super().__init__()
        self.out = nn.Linear(3, 4)

    def forward(self, x: Tensor, columns: list[int], factor: Tensor, scale: int) -> Tensor:
        return self.out(torch.tanh(x[:, columns] * scale) * factor.sum())


@pytest.mark.parametrize("method", ["IntegratedGradients", "Saliency"])
def test_forward_arguments_that_are_not_per_example_tensors(budget, method):
    # captum repeats each tensor argument with a first dimension once per copy and passes
    # anything else (a list of column indices, a number) as it is.
    model = seeded(Columns())
    x = data(3, 5)
    args = ([0, 2, 4], torch.tensor([0.5], dtype=torch.float64), 2)

    def make(library):
        return getattr(captum_attr if method == "Saliency" else library, method)(model)

    kwargs = dict(nt_samples=5, nt_samples_batch_size=2, stdevs=0.3, target=1)
    if method == "IntegratedGradients":
        # (factor.sum() counts the repeats: captum's rows per forward, see docs/captum.md.)
        kwargs.update(n_steps=4, internal_batch_size=4 * 3 * 2)
    ours, theirs = run_both(make, x, additional_forward_args=args, **kwargs)
    assert_close(ours, theirs)


@pytest.mark.parametrize("shared", [False, True], ids=["per-example", "shared"])
def test_feature_mask_follows_the_copies(shared):
    # captum's NoiseTunnel repeats a feature_mask with one row per example once per copy
    # (FeatureAblation, Occlusion and the like take one).
    model = mlp()
    x = data(3, 6)
    mask = torch.tensor([[0, 0, 1, 1, 2, 2], [0, 1, 2, 0, 1, 2], [0, 0, 0, 1, 1, 1]])
    mask = mask[:1] if shared else mask
    for feature_mask in (mask, (mask,)):
        inputs = x if isinstance(feature_mask, Tensor) else (x,)
        ours, theirs = run_both(
            lambda lib: captum_attr.FeatureAblation(model),
            inputs,
            nt_samples=4,
            nt_samples_batch_size=3,
            stdevs=0.2,
            target=[0, 3, 1],
            feature_mask=feature_mask,
        )
        assert_close(ours, theirs)


def test_layer_lrp_is_the_mean_over_captums_noisy_copies():
    # captum's NoiseTunnel can't wrap captum's LayerLRP (its attribute has no __wrapped__):
    # the oracle is captum's procedure by hand, captum's own noise on the expanded batch.
    model = mlp()
    x = data(3, 6)
    layer_lrp = fastattr.LayerLRP(model, model[2])
    torch.manual_seed(0)
    ours = NoiseTunnel(layer_lrp).attribute(x, nt_type="smoothgrad", nt_samples=4, target=1)
    torch.manual_seed(0)
    noise = torch.normal(0, torch.tensor(1.0).repeat(12, 6))
    noisy = x.repeat_interleave(4, dim=0) + noise
    copies = layer_lrp.attribute(noisy, target=1)
    assert_close(ours, copies.view(3, 4, 12).sum(1) * 1 / 4)


def test_float32_model_and_default_dtype_noise():
    model = mlp().float()
    x = data(4, 6).float()
    ours, theirs = run_both(
        lambda lib: lib.IntegratedGradients(model), x, nt_samples=3, target=0, n_steps=8
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_empty_batch():
    attributions = NoiseTunnel(fastattr.IntegratedGradients(mlp())).attribute(
        data(0, 6), nt_samples=3, target=1
    )
    assert attributions.shape == (0, 6)


def test_protocol():
    ig = fastattr.IntegratedGradients(mlp(), multiply_by_inputs=False)
    nt = NoiseTunnel(ig)
    assert nt.attribution_method is ig and nt.forward_func is ig.forward_func
    assert nt.has_convergence_delta() is True and nt.is_delta_supported is True
    assert nt.multiplies_by_inputs is False and nt.is_gradient_method is True
    assert (
        NoiseTunnel(fastattr.NeuronIntegratedGradients(mlp(), mlp()[1])).has_convergence_delta()
        is False
    )
    assert nt.get_name() == "Noise Tunnel"
    with pytest.raises(NotImplementedError):
        nt.attribute_future()
    assert isinstance(nt, captum_attr.NoiseTunnel)
    # captum's own NoiseTunnel accepts fastattr's (as its attribution method's wrapper calls).
    assert captum_attr.NoiseTunnel(ig).attribute(data(2, 6), nt_samples=2, target=0).shape == (2, 6)


# ----------------------------------------------------------------------------- memory


class LiveSavedBytes:
    """The most bytes autograd held for backward passes at any one time (each saved tensor
    counted until it is freed), the model's parameters aside."""

    def __init__(self, model: nn.Module) -> None:
        self.live = self.peak = 0
        self.parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(self, tensor: Tensor) -> Tensor:
        if tensor.untyped_storage().data_ptr() in self.parameters:
            return tensor
        size = tensor.untyped_storage().nbytes()
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(tensor, self._free, size)
        return tensor

    def _free(self, size: int) -> None:
        self.live -= size

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def test_memory_stays_bounded_as_nt_samples_grow(monkeypatch):
    monkeypatch.setattr(path_integral, "CPU_CHUNK_BYTES", 1 << 15)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 4))
    model = seeded(model).float()
    x = data(2, 3, 8, 8).float()
    peaks = {}
    for library in (fastattr, captum_attr):
        for nt_samples in (4, 16):
            rows: list[int] = []
            handle = model[0].register_forward_pre_hook(
                lambda m, args, rows=rows: rows.append(args[0].shape[0])
            )
            meter = LiveSavedBytes(model)
            with meter.hooks():
                library.NoiseTunnel(library.IntegratedGradients(model)).attribute(
                    x, nt_samples=nt_samples, target=1, n_steps=8
                )
            handle.remove()
            peaks[library.__name__, nt_samples] = (meter.peak, max(rows))
    ours_small, ours_large = peaks["fastattr", 4], peaks["fastattr", 16]
    theirs_small, theirs_large = peaks["captum.attr", 4], peaks["captum.attr", 16]
    # captum holds every copy at every step at once: 4x the copies, 4x the memory.
    assert theirs_large[0] >= 3.5 * theirs_small[0] and theirs_large[1] == 2 * 16 * 8
    # fastattr: the same chunks whatever the number of copies.
    assert ours_large == ours_small
    assert ours_large[0] < theirs_small[0] / 4


# ----------------------------------------------------------------------------- bad input

BAD = {
    "nt_type": (dict(nt_type="smooth"), ValueError),
    "nt_samples": (dict(nt_samples=0), ValueError),
    "nt_samples-float": (dict(nt_samples=2.0), TypeError),
    "nt_samples_batch_size": (dict(nt_samples_batch_size=0), ValueError),
    "stdevs": (dict(stdevs=(0.1, 0.2)), ValueError),
    "stdevs-type": (dict(stdevs="1"), TypeError),
    "stdevs-negative": (dict(stdevs=-0.1), ValueError),
    "stdevs-nan": (dict(stdevs=float("nan")), ValueError),
    "baselines": (dict(draw_baseline_from_distrib=True, baselines=torch.zeros(3, 5)), ValueError),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_arguments_name_the_argument(case):
    kwargs, error = BAD[case]
    name = case.split("-")[0]
    with pytest.raises(error, match=name):
        NoiseTunnel(fastattr.IntegratedGradients(mlp())).attribute(data(2, 6), target=0, **kwargs)


@pytest.mark.parametrize("target", [[0], torch.tensor([0, 1, 0])], ids=["list", "tensor"])
def test_a_target_that_does_not_fit_the_examples_is_refused(target):
    # captum refuses a list target of the wrong length (an AssertionError); fastattr names
    # the target and the number of examples, before any copy is attributed.
    method = captum_attr.IntegratedGradients(mlp())
    with pytest.raises(AssertionError, match="Target list length"):
        captum_attr.NoiseTunnel(method).attribute(data(2, 6), nt_samples=3, target=[0])
    with pytest.raises(ValueError, match=r"target .* per example \(2\)"):
        NoiseTunnel(fastattr.IntegratedGradients(mlp())).attribute(
            data(2, 6), nt_samples=3, target=target
        )


def test_bad_method_and_inputs():
    with pytest.raises(TypeError, match="attribution_method"):
        NoiseTunnel(mlp())
    nt = NoiseTunnel(fastattr.IntegratedGradients(mlp()))
    with pytest.raises(TypeError, match="inputs"):
        nt.attribute([data(2, 6)], target=0)
    with pytest.raises(ValueError, match="batch size"):
        nt.attribute((data(2, 6), data(3, 6)), target=0)


# ----------------------------------------------------------------------------- GPU


@pytest.mark.cuda
def test_cuda_matches_captum():
    model = mlp().cuda()
    x = data(3, 6).cuda()
    results = []
    for library in (fastattr, captum_attr):
        torch.cuda.manual_seed(0)
        results.append(
            library.NoiseTunnel(library.IntegratedGradients(model)).attribute(
                x, nt_type="vargrad", nt_samples=6, nt_samples_batch_size=4, target=1, n_steps=8
            )
        )
    assert_close(*results)


@pytest.mark.skipif(not hasattr(BaseException, "add_note"), reason="exception notes: 3.11+")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_made_float32_by_the_noise_are_explained(dtype) -> None:
    # The noise is drawn in the default dtype, as captum's: added to half-precision inputs it
    # makes them float32, and a half-precision model fails on them as it does in captum, with
    # an error about matrix dtypes that names neither NoiseTunnel nor the noise.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(dtype).eval()
    x = torch.randn(4, 6).to(dtype)
    with pytest.raises(RuntimeError):
        captum_attr.NoiseTunnel(captum_attr.IntegratedGradients(model)).attribute(
            x, target=1, nt_samples=2, n_steps=4
        )
    with pytest.raises(RuntimeError) as raised:
        NoiseTunnel(fastattr.IntegratedGradients(model)).attribute(
            x, target=1, nt_samples=2, n_steps=4
        )
    assert any(f"torch.set_default_dtype({dtype})" in note for note in raised.value.__notes__)


@pytest.mark.skipif(not hasattr(BaseException, "add_note"), reason="exception notes: 3.11+")
def test_token_ids_made_floating_point_by_the_noise_are_explained() -> None:
    # NoiseTunnel around LayerIntegratedGradients on an embedding, as for a text model: the
    # noise makes the token ids floating point and the embedding fails, in captum too. The
    # note must not send the user to torch.set_default_dtype(torch.int64), which torch refuses.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2)).double().eval()
    ids = torch.randint(0, 10, (2, 3))
    with pytest.raises(RuntimeError, match="indices"):
        captum_attr.NoiseTunnel(captum_attr.LayerIntegratedGradients(model, model[0])).attribute(
            ids, target=1, nt_samples=2
        )
    with pytest.raises(RuntimeError, match="indices") as raised:
        NoiseTunnel(fastattr.LayerIntegratedGradients(model, model[0])).attribute(
            ids, target=1, nt_samples=2
        )
    (note,) = raised.value.__notes__
    assert "token ids take no noise" in note and "inputs_embeds" in note
    assert "set_default_dtype" not in note
