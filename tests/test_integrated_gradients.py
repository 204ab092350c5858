"""fastattr.IntegratedGradients against captum.attr.IntegratedGradients.

float64 results must agree to float64 rounding, float32 to float32 rounding; bad input must
fail up front with an error naming the argument; the model must be left exactly as found.
"""

from __future__ import annotations

import itertools
import math
import sys
import types
import warnings

import captum.attr as captum_attr
import numpy as np
import pytest
import torch
from seeding import seeded  # tests/seeding.py (pytest puts tests/ on sys.path)
from torch import Tensor, nn

import fastattr
import fastattr._path_integral as path_integral
from fastattr import IntegratedGradients

RIEMANN = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")
METHODS = (*RIEMANN, "gausslegendre")
BATCH = 4
FEATURES = 6

# (rtol, atol relative to the largest expected magnitude)
TOLERANCES = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-5, 1e-6)}


# ----------------------------------------------------------------------------- models


def mlp(dtype: torch.dtype = torch.float64, classes: int = 5) -> nn.Module:
    return seeded(
        nn.Sequential(
            nn.Linear(FEATURES, 16),
            nn.Tanh(),
            nn.Linear(16, 16),
            nn.ReLU(),
            nn.Linear(16, classes),
        ),
        dtype,
    )


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 6, 3)
        self.tanh = nn.Tanh()
        self.avg = nn.AvgPool2d(2)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.relu(self.conv1(x)))
        x = self.avg(self.tanh(self.conv2(x)))
        return self.fc(torch.flatten(x, 1))


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(FEATURES, 8)
        self.b = nn.Linear(3 * 2, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.out(torch.tanh(self.a(x)) * torch.sigmoid(self.b(y.flatten(1))))


class WithArgs(nn.Module):
    """Takes a per-example tensor, a 0-dim tensor, a number and a string after the input."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(FEATURES, 4)

    def forward(self, x: Tensor, mask: Tensor, shift: Tensor, scale: float, mode: str) -> Tensor:
        out = torch.tanh(self.fc(x * mask) + shift) * scale
        return out.exp() if mode == "exp" else out


class Output3D(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(FEATURES, 12)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.fc(x)).reshape(-1, 3, 4) ** 2


class Scalar(nn.Module):
    """One value per example: (B,) or, with ``keepdim``, (B, 1)."""

    def __init__(self, keepdim: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(FEATURES, 4)
        self.keepdim = keepdim

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.fc(x)).pow(2).sum(1, keepdim=self.keepdim)


def data(*shape: int, dtype: torch.dtype = torch.float64, seed: int = 1) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(dtype)


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(params=("compiled", "reference"))
def backend(request: pytest.FixtureRequest):
    with fastattr.use_backend(request.param):
        yield request.param


def assert_close(actual, expected, scale: float | None = None) -> None:
    """Equal up to the rounding of ``expected``'s dtype, ``atol`` scaled to its magnitude."""
    if isinstance(expected, tuple):
        assert isinstance(actual, tuple), f"expected a tuple, got {type(actual).__name__}"
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected):
            assert_close(a, e, scale)
        return
    assert isinstance(actual, Tensor), f"expected a tensor, got {type(actual).__name__}"
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    rtol, atol = TOLERANCES[expected.dtype]
    if scale is None:
        finite = expected[torch.isfinite(expected)]
        scale = float(finite.abs().max()) if finite.numel() else 1.0
    torch.testing.assert_close(
        actual, expected, rtol=rtol, atol=atol * max(scale, 1e-30), equal_nan=True
    )


def delta_scale(attributions) -> float:
    """What the convergence delta's rounding is relative to: the attributions' row sums and
    the model's outputs (O(1) for these models)."""
    tensors = attributions if isinstance(attributions, tuple) else (attributions,)
    rows = sum(t.detach().abs().reshape(t.shape[0], -1).sum(1).double() for t in tensors)
    return 1.0 + float(rows.max())


def compare(forward, inputs, *, multiply_by_inputs: bool = True, **kwargs):
    """Attribute with fastattr and captum, check they agree (and their deltas), and return
    fastattr's attributions."""
    kwargs.setdefault("return_convergence_delta", True)
    ours = IntegratedGradients(forward, multiply_by_inputs).attribute(inputs, **kwargs)
    theirs = captum_attr.IntegratedGradients(forward, multiply_by_inputs).attribute(
        inputs, **kwargs
    )
    if kwargs["return_convergence_delta"]:
        (ours, our_delta), (theirs, their_delta) = ours, theirs
        assert_close(ours, theirs)
        assert our_delta.shape == their_delta.shape == (inputs_batch(inputs),)
        assert_close(our_delta, their_delta, delta_scale(theirs))
    else:
        assert_close(ours, theirs)
    return ours


def inputs_batch(inputs) -> int:
    return (inputs[0] if isinstance(inputs, tuple) else inputs).shape[0]


class CountingForward:
    """Wraps a model, recording the number of rows of every forward call; raises on the call
    numbered ``fail_on`` (1-based) if given."""

    def __init__(self, model: nn.Module, fail_on: int | None = None) -> None:
        self.model = model
        self.rows: list[int] = []
        self.fail_on = fail_on

    def __call__(self, *args):
        self.rows.append(args[0].shape[0])
        if self.fail_on is not None and len(self.rows) == self.fail_on:
            raise RuntimeError("model failed mid-way")
        return self.model(*args)


# ----------------------------------------------------------------------------- agreement

METHOD_STEPS = [(m, n) for m in METHODS for n in (2, 7, 50)] + [("gausslegendre", 1)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(("method", "n_steps"), METHOD_STEPS)
def test_methods_and_steps_match_captum(backend, method, n_steps, dtype):
    model = mlp(dtype)
    x = data(BATCH, FEATURES, dtype=dtype)
    baseline = data(1, FEATURES, dtype=dtype, seed=2)
    compare(model, x, baselines=baseline, target=3, method=method, n_steps=n_steps)


SINGLE_BASELINES = {
    "none": lambda: None,
    "float": lambda: 0.5,
    "int": lambda: -1,
    "same-shape": lambda: data(BATCH, FEATURES, seed=3),
    "first-dim-1": lambda: data(1, FEATURES, seed=3),
}


@pytest.mark.parametrize("baseline", list(SINGLE_BASELINES), ids=list(SINGLE_BASELINES))
@pytest.mark.parametrize("method", ["gausslegendre", "riemann_trapezoid"])
def test_single_input_baselines(backend, baseline, method):
    compare(
        mlp(),
        data(BATCH, FEATURES),
        baselines=SINGLE_BASELINES[baseline](),
        target=1,
        method=method,
        n_steps=9,
    )


TUPLE_BASELINES = {
    "none": lambda: None,
    "scalar-and-tensor": lambda: (0.25, data(BATCH, 3, 2, seed=4)),
    "first-dim-1-and-int": lambda: (data(1, FEATURES, seed=4), -1),
    "tensors": lambda: (data(BATCH, FEATURES, seed=4), data(1, 3, 2, seed=5)),
}


@pytest.mark.parametrize("baseline", list(TUPLE_BASELINES), ids=list(TUPLE_BASELINES))
def test_tuple_inputs_baselines(backend, baseline):
    inputs = (data(BATCH, FEATURES), data(BATCH, 3, 2, seed=6))
    out = compare(
        seeded(TwoInputs()),
        inputs,
        baselines=TUPLE_BASELINES[baseline](),
        target=2,
        method="riemann_middle",
        n_steps=8,
    )
    assert isinstance(out, tuple) and len(out) == 2


def test_single_element_tuple_stays_a_tuple():
    out = compare(mlp(), (data(BATCH, FEATURES),), target=0, n_steps=5)
    assert isinstance(out, tuple) and len(out) == 1


TARGETS = {
    "none-scalar-output": (lambda: seeded(Scalar()), None),
    "none-B1-output": (lambda: seeded(Scalar(keepdim=True)), None),
    "int": (lambda: mlp(), 2),
    "negative-int": (lambda: mlp(), -1),
    "tuple-3d": (lambda: seeded(Output3D()), (1, 2)),
    "list": (lambda: mlp(), [0, 4, 2, 2]),
    "tensor-per-example": (lambda: mlp(), torch.tensor([3, 1, 0, 4])),
    "tensor-1-element": (lambda: mlp(), torch.tensor([4])),
    "tensor-0-dim": (lambda: mlp(), torch.tensor(1)),
    "list-of-tuples-3d": (lambda: seeded(Output3D()), [(0, 1), (2, 3), (1, 0), (2, 2)]),
}


@pytest.mark.parametrize("target", list(TARGETS), ids=list(TARGETS))
@pytest.mark.parametrize("method", ["gausslegendre", "riemann_trapezoid"])
def test_targets(backend, target, method):
    make_model, value = TARGETS[target]
    model = make_model()
    # internal_batch_size=BATCH: one step per chunk, so per-example targets are repeated
    # across several chunks.
    for internal_batch_size in (None, BATCH):
        compare(
            model,
            data(BATCH, FEATURES),
            baselines=0.1,
            target=value,
            method=method,
            n_steps=6,
            internal_batch_size=internal_batch_size,
        )


def test_negative_per_example_targets_count_from_the_end(backend):
    # captum rejects negative indices in a per-example target; fastattr reads them as Python
    # does, which must equal the same targets counted from the start.
    model, x = mlp(classes=5), data(BATCH, FEATURES)
    for negative, positive in (
        ([0, -1, 2, -5], [0, 4, 2, 0]),
        (torch.tensor([-2, 1, -3, 3]), [3, 1, 2, 3]),
    ):
        ours = IntegratedGradients(model).attribute(x, target=negative, n_steps=5)
        assert_close(ours, compare(model, x, target=positive, n_steps=5))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16])
def test_a_tensor_target_of_small_integers_indexes_as_int64(backend, dtype):
    # captum's gather takes int32 and int64 indices alone; fastattr takes any integer type.
    model, x, target = mlp(), data(BATCH, FEATURES), torch.tensor([3, 1, 0, 4])
    with pytest.raises(RuntimeError, match="int32/int64"):
        captum_attr.IntegratedGradients(model).attribute(x, target=target.to(dtype), n_steps=5)
    ours = IntegratedGradients(model).attribute(x, target=target.to(dtype), n_steps=5)
    assert_close(ours, compare(model, x, target=target, n_steps=5))


@pytest.mark.parametrize("internal_batch_size", [None, BATCH, 3 * BATCH + 1])
@pytest.mark.parametrize("mode", ["exp", "plain"])
def test_additional_forward_args(backend, internal_batch_size, mode):
    model = seeded(WithArgs())
    mask = (data(BATCH, FEATURES, seed=7) > 0).double()
    shift = torch.tensor(0.3, dtype=torch.float64)
    compare(
        model,
        data(BATCH, FEATURES),
        target=[1, 0, 3, 2],
        additional_forward_args=(mask, shift, 1.5, mode),
        n_steps=7,
        internal_batch_size=internal_batch_size,
    )


def test_additional_forward_arg_not_in_a_tuple(backend):
    model = seeded(TwoInputs())
    y = data(BATCH, 3, 2, seed=8)
    compare(model, data(BATCH, FEATURES), target=0, additional_forward_args=y, n_steps=5)


@pytest.mark.parametrize(
    "counts",
    [
        dict(n_steps=np.int64(6)),
        dict(n_steps=torch.tensor(6)),
        dict(n_steps=6, internal_batch_size=np.int32(2 * BATCH)),
        dict(n_steps=np.int16(8), internal_batch_size=torch.tensor(3 * BATCH)),
    ],
    ids=["numpy-n_steps", "tensor-n_steps", "numpy-internal_batch_size", "both"],
)
def test_integer_like_counts_are_taken_like_captum(backend, counts):
    # captum takes numpy integers and 0-dim integer tensors for its counts; so must fastattr,
    # with chunk sizes (and per-example targets repeated per chunk) as for plain ints.
    compare(mlp(), data(BATCH, FEATURES), target=[1, 0, 3, 2], method="riemann_right", **counts)


def test_measured_step_cost_is_reused_per_instance_and_shape(backend):
    model, x = mlp(), data(BATCH, FEATURES)
    kwargs = dict(target=[1, 0, 3, 2], n_steps=12)
    theirs = captum_attr.IntegratedGradients(model).attribute(x, **kwargs)
    counter = CountingForward(model)
    ig = IntegratedGradients(counter)
    assert_close(ig.attribute(x, **kwargs), theirs)
    assert counter.rows == [BATCH, 11 * BATCH]  # a measuring step, then the rest
    counter.rows.clear()
    assert_close(ig.attribute(x, **kwargs), theirs)
    assert counter.rows == [12 * BATCH]  # the same shape: measured already
    counter.rows.clear()
    # The cost is per point: another batch size of the same rows is not measured again.
    ig.attribute(data(2 * BATCH, FEATURES), target=1, n_steps=12)
    assert counter.rows == [24 * BATCH]
    counter.rows.clear()
    wider = IntegratedGradients(CountingForward(lambda x: model(x[:, :FEATURES])))
    wider.attribute(data(BATCH, FEATURES + 2), target=1, n_steps=12)
    assert wider.forward_func.rows[0] == BATCH  # a new row shape is measured
    IntegratedGradients(counter).attribute(x, **kwargs)
    assert counter.rows[0] == BATCH  # and so is a new instance


def captum_row_counts(model, x, **kwargs) -> list[int]:
    counter = CountingForward(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        captum_attr.IntegratedGradients(counter).attribute(x, **kwargs)
    return counter.rows


@pytest.mark.parametrize("internal_batch_size", [BATCH, BATCH + 1, 2 * BATCH, 13, 28, 1000])
def test_internal_batch_size_chunks_like_captum(backend, internal_batch_size):
    model, x = mlp(), data(BATCH, FEATURES)
    kwargs = dict(target=2, n_steps=7, internal_batch_size=internal_batch_size)
    compare(model, x, method="riemann_left", **kwargs)
    counter = CountingForward(model)
    IntegratedGradients(counter).attribute(x, **kwargs)
    # captum's delta forwards are not part of its path: count its path alone.
    assert counter.rows == captum_row_counts(model, x, **kwargs)


@pytest.mark.parametrize("internal_batch_size", [1, BATCH - 1])
def test_internal_batch_size_below_batch_warns_like_captum(backend, internal_batch_size):
    model, x = mlp(), data(BATCH, FEATURES)
    kwargs = dict(target=1, n_steps=5, internal_batch_size=internal_batch_size)
    with pytest.warns(UserWarning, match="internal_batch_size"):
        ours = IntegratedGradients(model).attribute(x, **kwargs)
    with pytest.warns(UserWarning):
        theirs = captum_attr.IntegratedGradients(model).attribute(x, **kwargs)
    assert_close(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("method", ["gausslegendre", "riemann_right"])
def test_multiply_by_inputs_false(backend, dtype, method):
    model = mlp(dtype)
    ig = IntegratedGradients(model, multiply_by_inputs=False)
    assert ig.multiplies_by_inputs is False
    assert IntegratedGradients(model).multiplies_by_inputs is True
    assert ig.has_convergence_delta() is True
    compare(
        model,
        data(BATCH, FEATURES, dtype=dtype),
        baselines=data(1, FEATURES, dtype=dtype, seed=9),
        target=[0, 1, 2, 3],
        method=method,
        n_steps=10,
        multiply_by_inputs=False,
    )


def test_compute_convergence_delta_directly():
    model = seeded(TwoInputs())
    inputs = (data(BATCH, FEATURES), data(BATCH, 3, 2, seed=10))
    baselines = (0.5, data(1, 3, 2, seed=11))
    target = [2, 0, 1, 1]
    attributions = captum_attr.IntegratedGradients(model).attribute(
        inputs, baselines, target=target, n_steps=4
    )
    ours = IntegratedGradients(model).compute_convergence_delta(
        attributions, baselines, inputs, target=target
    )
    theirs = captum_attr.IntegratedGradients(model).compute_convergence_delta(
        attributions, baselines, inputs, target=target
    )
    assert ours.shape == theirs.shape == (BATCH,)
    assert_close(ours, theirs, delta_scale(attributions))
    # With additional forward args and a single tensor.
    args_model, x = seeded(WithArgs()), data(BATCH, FEATURES)
    args = (torch.ones(BATCH, FEATURES, dtype=torch.float64), torch.tensor(0.0).double(), 2.0, "x")
    single = captum_attr.IntegratedGradients(args_model).attribute(
        x, target=3, additional_forward_args=args, n_steps=3
    )
    ours = IntegratedGradients(args_model).compute_convergence_delta(
        single, None, x, target=3, additional_forward_args=args
    )
    theirs = captum_attr.IntegratedGradients(args_model).compute_convergence_delta(
        single, None, x, target=3, additional_forward_args=args
    )
    assert_close(ours, theirs, delta_scale(single))


def test_compute_convergence_delta_of_no_examples():
    # attribute takes a batch of none (captum fails there); so does the delta it returns, and
    # compute_convergence_delta called directly (captum fails reshaping the empty rows).
    model, empty = mlp(), data(0, FEATURES)
    attributions, delta = IntegratedGradients(model).attribute(
        empty, target=1, return_convergence_delta=True
    )
    with pytest.raises(RuntimeError, match="cannot reshape tensor of 0 elements"):
        captum_attr.IntegratedGradients(model).compute_convergence_delta(
            attributions, 0.0, empty, target=1
        )
    direct = IntegratedGradients(model).compute_convergence_delta(attributions, 0.0, empty, 1)
    assert direct.shape == delta.shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cnn(backend, dtype, layout):
    model = seeded(CNN(), dtype)
    x = data(BATCH, 3, 8, 8, dtype=dtype)
    baseline = data(1, 3, 8, 8, dtype=dtype, seed=12)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        baseline = baseline.contiguous(memory_format=torch.channels_last)
    compare(
        model,
        x,
        baselines=baseline,
        target=torch.tensor([0, 1, 2, 3]),
        n_steps=8,
        internal_batch_size=3 * BATCH,
    )
    compare(model, x, target=4, method="riemann_trapezoid", n_steps=5)


def test_channels_last_model_and_inputs(backend):
    model = seeded(CNN()).to(memory_format=torch.channels_last)
    x = data(BATCH, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    compare(model, x, baselines=data(BATCH, 3, 8, 8, seed=13), target=2, n_steps=6)


def test_strided_inputs_and_baselines(backend):
    # Dense but neither contiguous nor channels_last (a transposed matrix, a permuted image
    # batch), and a sliced one: captum takes them all.
    transposed = data(FEATURES, BATCH).t()
    sliced = data(BATCH, 2 * FEATURES)[:, ::2]
    compare(mlp(), transposed, baselines=sliced, target=[1, 0, 3, 2], n_steps=5)
    compare(mlp(), sliced, baselines=transposed, target=2, method="riemann_trapezoid", n_steps=4)
    permuted = data(BATCH, 8, 8, 3).permute(0, 3, 2, 1)
    channels_last = data(BATCH, 3, 8, 8, seed=15).contiguous(memory_format=torch.channels_last)
    cnn = seeded(CNN())
    compare(cnn, permuted, baselines=channels_last, target=1, n_steps=4)
    compare(cnn, channels_last, baselines=permuted[:1], target=3, n_steps=4)


def test_inputs_that_require_grad_give_captums_numbers_without_a_graph(backend):
    leaf = data(BATCH, FEATURES).requires_grad_()
    non_leaf = leaf * 2
    for x in (leaf, non_leaf):
        ours = IntegratedGradients(mlp()).attribute(x, baselines=0.1, target=1, n_steps=5)
        theirs = captum_attr.IntegratedGradients(mlp()).attribute(
            x, baselines=0.1, target=1, n_steps=5
        )
        # captum's graph runs through inputs - baselines alone; fastattr's carry none.
        assert theirs.requires_grad and not ours.requires_grad
        assert_close(ours, theirs.detach())
    assert leaf.requires_grad and leaf.grad is None


def test_import_from_fastattr_attr():
    from fastattr.attr import IntegratedGradients as FromAttr

    assert FromAttr is fastattr.IntegratedGradients
    model, x = mlp(), data(BATCH, FEATURES)
    assert_close(
        FromAttr(model).attribute(x, target=0, n_steps=5),
        captum_attr.IntegratedGradients(model).attribute(x, target=0, n_steps=5),
    )


def test_grad_disabled_outside_is_respected_and_restored(backend):
    model, x = mlp(), data(BATCH, FEATURES)
    with torch.no_grad():
        ours = IntegratedGradients(model).attribute(x, target=1, n_steps=5)
        assert not torch.is_grad_enabled()
    theirs = captum_attr.IntegratedGradients(model).attribute(x, target=1, n_steps=5)
    assert_close(ours, theirs)


def test_inference_mode_is_a_clear_error_and_inference_tensors_work(backend):
    model = mlp()
    with torch.inference_mode():
        x = data(BATCH, FEATURES) * 1.0
        with pytest.raises(RuntimeError, match="inference_mode"):
            IntegratedGradients(model).attribute(x, target=1, n_steps=4)
    # Tensors made under inference mode are fine as inputs outside it.
    assert x.is_inference()
    compare(model, x, baselines=x.flip(0), target=1, n_steps=4)


# ----------------------------------------------------------------------------- chunking


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_trapezoid"])
def test_auto_chunking_matches_captum(backend, monkeypatch, method):
    model, x = mlp(), data(BATCH, FEATURES)
    n_steps = 12
    kwargs = dict(target=[1, 2, 3, 4], method=method, n_steps=n_steps)
    theirs, their_delta = captum_attr.IntegratedGradients(model).attribute(
        x, return_convergence_delta=True, **kwargs
    )

    def chunk_rows(budget: int) -> list[int]:
        monkeypatch.setattr(path_integral, "CPU_CHUNK_BYTES", budget)
        counter = CountingForward(model)
        assert_close(IntegratedGradients(counter).attribute(x, **kwargs), theirs)
        assert sum(counter.rows) == n_steps * BATCH
        _, delta = IntegratedGradients(model).attribute(x, return_convergence_delta=True, **kwargs)
        assert_close(delta, their_delta, delta_scale(theirs))
        return counter.rows

    # A budget below one point's activations: every chunk is one point (one example at one
    # step), so memory is bounded whatever the batch.
    assert chunk_rows(1) == [1] * (n_steps * BATCH)
    sizes = {budget: chunk_rows(budget) for budget in (1 << k for k in range(8, 24))}
    # Budgets in between: a measuring chunk of at most one step, then equal chunks but the
    # last (and the one completing the measuring chunk's step); ending on whole steps once a
    # chunk holds a step or more, else of part of a step.
    for rows in sizes.values():
        assert rows[0] <= BATCH
        assert len(set(rows[2:-1])) <= 1, rows
        if max(rows[1:], default=0) >= BATCH:
            bounds = list(itertools.accumulate(rows))[1:]
            assert all(bound % BATCH == 0 for bound in bounds), rows
    assert any(1 < max(rows[1:], default=0) < BATCH for rows in sizes.values()), sizes
    assert any(len(rows) >= 3 and max(rows) > BATCH for rows in sizes.values()), sizes
    # The default budget runs the rest of this small path in one chunk after the first step.
    monkeypatch.undo()
    assert chunk_rows(path_integral.CPU_CHUNK_BYTES) == [BATCH, (n_steps - 1) * BATCH]


def test_auto_chunking_cnn_with_args_and_tuple(backend, monkeypatch):
    # Chunks of single points: per-example targets and arguments follow their examples.
    monkeypatch.setattr(path_integral, "CPU_CHUNK_BYTES", 1)
    model = seeded(WithArgs())
    counter = CountingForward(model)
    x = data(BATCH, FEATURES)
    args = (data(BATCH, FEATURES, seed=5), torch.tensor(0.3, dtype=torch.float64), 2.0, "exp")
    kwargs = dict(target=torch.tensor([0, 1, 2, 3]), additional_forward_args=args, n_steps=5)
    ours = IntegratedGradients(counter).attribute(x, **kwargs)
    assert counter.rows == [1] * (5 * BATCH)
    assert_close(ours, captum_attr.IntegratedGradients(model).attribute(x, **kwargs))
    two = seeded(TwoInputs())
    inputs = (data(BATCH, FEATURES), data(BATCH, 3, 2, seed=14))
    ours = IntegratedGradients(two).attribute(inputs, target=[0, 1, 2, 0], n_steps=5)
    theirs = captum_attr.IntegratedGradients(two).attribute(inputs, target=[0, 1, 2, 0], n_steps=5)
    assert_close(ours, theirs)


# ----------------------------------------------------------------------------- half precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_inputs_return_float32(backend, dtype):
    model, x = mlp(dtype), data(BATCH, FEATURES, dtype=dtype)
    # The same problem in float32: the half parameters and inputs, exactly widened.
    model32, x32 = mlp(dtype).float(), x.float()
    ours, delta = IntegratedGradients(model).attribute(
        x, target=2, n_steps=16, return_convergence_delta=True
    )
    theirs = captum_attr.IntegratedGradients(model).attribute(x, target=2, n_steps=16)
    full = IntegratedGradients(model32).attribute(x32, target=2, n_steps=16)
    assert ours.dtype == theirs.dtype == torch.float32
    assert ours.shape == x.shape and delta.shape == (BATCH,)
    # Half rounding of activations and gradients: a few units of its epsilon, relative to the
    # attributions' magnitude.
    eps = torch.finfo(dtype).eps
    scale = float(full.abs().max())
    torch.testing.assert_close(ours, theirs, rtol=0, atol=8 * eps * scale)
    torch.testing.assert_close(ours, full, rtol=0, atol=8 * eps * scale)


# ----------------------------------------------------------------------------- model state


def snapshot(model: nn.Module) -> dict:
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "param_ids": {n: id(p) for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {
            n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
        },
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "training": {n: m.training for n, m in model.named_modules()},
        "hooks": {
            n: (
                dict(m._forward_hooks),
                dict(m._forward_pre_hooks),
                dict(m._backward_hooks),
                dict(m._backward_pre_hooks),
                dict(getattr(m, "_state_dict_hooks", {})),
            )
            for n, m in model.named_modules()
        },
        "global_hooks": (
            dict(nn.modules.module._global_forward_hooks),
            dict(nn.modules.module._global_forward_pre_hooks),
            dict(nn.modules.module._global_backward_hooks),
        ),
        "grad_enabled": torch.is_grad_enabled(),
    }


def assert_same_state(before: dict, after: dict) -> None:
    for name, param in before["params"].items():
        now = after["params"][name]
        assert now.dtype == param.dtype and now.shape == param.shape
        # Bit-identical, NaN payloads included.
        assert torch.equal(now.view(torch.uint8), param.view(torch.uint8)), name
    for key in ("param_ids", "requires_grad", "training", "hooks", "global_hooks"):
        assert after[key] == before[key], key
    for name, grad in before["grads"].items():
        now = after["grads"][name]
        assert (grad is None) == (now is None), name
        assert grad is None or torch.equal(grad, now), name
    for name, buffer in before["buffers"].items():
        assert torch.equal(after["buffers"][name], buffer), name
    assert after["grad_enabled"] == before["grad_enabled"]


def instrumented_model() -> nn.Module:
    """A model with what attribution must not disturb: a frozen layer, a gradient already
    accumulated, mixed train/eval modules, a BatchNorm's running statistics, and hooks."""
    model = nn.Sequential(
        nn.Linear(FEATURES, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)
    ).double()
    seeded(model)
    model.train()
    model[1].eval()  # BatchNorm evaluated with its running stats: deterministic
    model[0].weight.requires_grad_(False)
    model[3].bias.grad = torch.full_like(model[3].bias, 0.25)
    calls = []
    model[2].register_forward_hook(lambda module, args, out: calls.append(out.shape[0]))
    model[3].register_forward_pre_hook(lambda module, args: None)
    model[3].register_full_backward_hook(lambda module, gin, gout: None)
    return model


@pytest.mark.parametrize("internal_batch_size", [None, BATCH])
@pytest.mark.parametrize("input_requires_grad", [False, True])
def test_model_and_inputs_left_as_found(backend, internal_batch_size, input_requires_grad):
    model = instrumented_model()
    x = data(BATCH, FEATURES).requires_grad_(input_requires_grad)
    x_before = x.detach().clone()
    before = snapshot(model)
    ours = IntegratedGradients(model).attribute(
        x, target=1, n_steps=6, internal_batch_size=internal_batch_size
    )
    assert_same_state(before, snapshot(model))
    assert x.requires_grad == input_requires_grad and x.grad is None
    assert torch.equal(x.detach(), x_before)
    theirs = captum_attr.IntegratedGradients(model).attribute(
        x.detach(), target=1, n_steps=6, internal_batch_size=internal_batch_size
    )
    assert_close(ours.detach(), theirs)


@pytest.mark.parametrize("fail_on", [1, 2], ids=["first-chunk", "second-chunk"])
@pytest.mark.parametrize("internal_batch_size", [None, BATCH])
@pytest.mark.parametrize("grad_enabled", [True, False])
def test_model_left_as_found_when_forward_raises(
    backend, internal_batch_size, grad_enabled, fail_on
):
    # Failing on the first chunk fails inside the memory meter's saved-tensor hooks.
    model = instrumented_model()
    x = data(BATCH, FEATURES).requires_grad_()
    before = snapshot(model)
    failing = CountingForward(model, fail_on=fail_on)
    with torch.set_grad_enabled(grad_enabled):
        before["grad_enabled"] = torch.is_grad_enabled()
        with pytest.raises(RuntimeError, match="model failed mid-way"):
            IntegratedGradients(failing).attribute(
                x, target=1, n_steps=6, internal_batch_size=internal_batch_size
            )
        assert_same_state(before, snapshot(model))
    assert len(failing.rows) == fail_on
    assert x.requires_grad and x.grad is None
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    # Still usable afterwards, with the same numbers as captum.
    compare(model, x.detach(), target=1, n_steps=6)


def test_model_left_as_found_when_target_is_bad(backend):
    model = instrumented_model()
    before = snapshot(model)
    with pytest.raises(IndexError, match="target"):
        IntegratedGradients(model).attribute(data(BATCH, FEATURES), target=7)
    assert_same_state(before, snapshot(model))


# ----------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_left"])
def test_nan_input_propagates(backend, method):
    model = mlp()
    x = data(BATCH, FEATURES)
    x[1, 2] = math.nan
    ours, delta = IntegratedGradients(model).attribute(
        x, target=0, method=method, n_steps=5, return_convergence_delta=True
    )
    theirs, their_delta = captum_attr.IntegratedGradients(model).attribute(
        x, target=0, method=method, n_steps=5, return_convergence_delta=True
    )
    assert torch.isnan(ours[1]).any() and torch.isnan(delta[1])
    others = [0, 2, 3]
    assert torch.isfinite(ours[others]).all() and torch.isfinite(delta[others]).all()
    assert_close(ours, theirs)
    assert_close(delta, their_delta, delta_scale(theirs[others]))


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_trapezoid"])
def test_empty_batch(backend, method):
    # captum fails on an empty batch (IndexError deep inside); fastattr returns empty results.
    model = seeded(CNN())
    x = data(0, 3, 8, 8)
    attributions, delta = IntegratedGradients(model).attribute(
        x, target=[], method=method, n_steps=4, return_convergence_delta=True
    )
    assert attributions.shape == x.shape and attributions.dtype == x.dtype
    assert delta.shape == (0,)
    pair = IntegratedGradients(seeded(TwoInputs())).attribute(
        (data(0, FEATURES), data(0, 3, 2)), target=1, method=method, n_steps=4
    )
    assert [t.shape for t in pair] == [(0, FEATURES), (0, 3, 2)]


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["gausslegendre", "riemann_trapezoid"])
def test_cuda_matches_captum_and_synchronizes_once_per_call(backend, method):
    model = seeded(CNN()).cuda()
    x = data(BATCH, 3, 8, 8).cuda()
    target = torch.tensor([0, 3, 1, 2], device="cuda")
    # Five chunks of two steps: the path is streamed, yet the target's range is read once.
    kwargs = dict(target=target, method=method, n_steps=10, internal_batch_size=2 * BATCH)
    explainer = IntegratedGradients(model)
    compare(model, x, **kwargs)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            explainer.attribute(x, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "called a synchronizing" in str(w.message)]
    assert len(syncs) <= 1, syncs


def test_meta_device_inputs_run_without_data():
    model = mlp().to("meta")
    out = IntegratedGradients(model).attribute(
        torch.empty(BATCH, FEATURES, dtype=torch.float64, device="meta"), target=1, n_steps=3
    )
    assert out.device.type == "meta" and out.shape == (BATCH, FEATURES)


# ----------------------------------------------------------------------------- bad input

X = data(BATCH, FEATURES)
BAD_INPUTS = {
    "n_steps-0-gausslegendre": (dict(n_steps=0), ValueError, "n_steps"),
    "n_steps-negative": (dict(n_steps=-3), ValueError, "n_steps"),
    "n_steps-1-riemann": (dict(n_steps=1, method="riemann_left"), ValueError, "n_steps"),
    "n_steps-float": (dict(n_steps=2.5), TypeError, "n_steps"),
    "n_steps-str": (dict(n_steps="50"), TypeError, "n_steps"),
    "unknown-method": (dict(method="simpson"), ValueError, "method"),
    "baseline-shape": (dict(baselines=torch.zeros(BATCH, 5)), ValueError, "baselines"),
    "baseline-batch": (dict(baselines=torch.zeros(3, FEATURES)), ValueError, "baselines"),
    "baseline-count": (dict(baselines=(0.0, 1.0)), ValueError, "baselines"),
    "baseline-type": (dict(baselines="zeros"), TypeError, "baselines"),
    "target-int-range": (dict(target=5), IndexError, "target"),
    "target-int-negative-range": (dict(target=-6), IndexError, "target"),
    "target-tensor-range": (dict(target=torch.tensor([0, 1, 5, 2])), IndexError, "target"),
    "target-1-element-range": (dict(target=torch.tensor([9])), IndexError, "target"),
    "target-list-range": (dict(target=[0, 1, 2, 10]), IndexError, "target"),
    "target-list-length": (dict(target=[0, 1]), ValueError, "target"),
    "target-tensor-length": (dict(target=torch.tensor([0, 1, 2])), ValueError, "target"),
    "target-float-tensor": (dict(target=torch.tensor([0.0, 1, 2, 3])), TypeError, "target"),
    "target-type": (dict(target=1.5), TypeError, "target"),
    "internal_batch_size-0": (dict(internal_batch_size=0), ValueError, "internal_batch_size"),
    "internal_batch_size-negative": (
        dict(internal_batch_size=-4),
        ValueError,
        "internal_batch_size",
    ),
    "internal_batch_size-float": (
        dict(internal_batch_size=8.0),
        TypeError,
        "internal_batch_size",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_arguments(backend, case):
    kwargs, error, match = BAD_INPUTS[case]
    kwargs = {"target": 0, **kwargs}
    counter = CountingForward(mlp())
    with pytest.raises(error, match=match):
        IntegratedGradients(counter).attribute(X, **kwargs)
    if error is not IndexError:  # range checks need the output's shape: one forward at most
        assert counter.rows == [], "argument errors must come before any forward"


@pytest.mark.parametrize(
    ("target", "error", "match", "captums"),
    [
        ([(0, 1), (2,), (1, 0), (2, 2)], ValueError, "same number of indices", RuntimeError),
        ([(0, 1, 0)] * BATCH, IndexError, "target tuples hold 3 indices", IndexError),
        (
            [(0, 1), (3, 0), (1, 0), (2, 2)],
            IndexError,
            "target holds index 3 at position 0",
            IndexError,
        ),
        ([(0, 1), (2, -5), (1, 0), (2, 2)], IndexError, "index -5 at position 1", IndexError),
        ([(0, 1.0)] * BATCH, TypeError, r"target\[0\] must hold ints", IndexError),
    ],
    ids=["lengths", "too-many", "range", "negative-range", "float"],
)
def test_a_list_of_tuple_targets_that_does_not_fit_is_named(backend, target, error, match, captums):
    # captum fails inside its indexing (torch's own messages); fastattr names the target.
    model = seeded(Output3D())
    with pytest.raises(captums):
        captum_attr.IntegratedGradients(model).attribute(X, target=target, n_steps=3)
    with pytest.raises(error, match=match):
        IntegratedGradients(model).attribute(X, target=target, n_steps=3)


def test_bad_inputs():
    model, two = mlp(), seeded(TwoInputs())
    with pytest.raises(ValueError, match="inputs"):
        IntegratedGradients(two).attribute((X, data(BATCH + 1, 3, 2)), target=0)
    with pytest.raises(ValueError, match="inputs"):
        IntegratedGradients(two).attribute((X, data(BATCH, 3, 2).to("meta")), target=0)
    with pytest.raises(ValueError, match=r"2 inputs, 1 baselines \(a list is one baseline"):
        IntegratedGradients(two).attribute((X, data(BATCH, 3, 2)), baselines=[0.1, 0.2], target=0)
    with pytest.raises(TypeError, match=r"inputs\[0\] must be a real number tensor.*bool"):
        IntegratedGradients(model).attribute(torch.ones(BATCH, FEATURES, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"inputs\[1\] must be a real number tensor.*complex"):
        IntegratedGradients(two).attribute((X, torch.ones(BATCH, 3, 2, dtype=torch.complex64)))
    with pytest.raises(TypeError, match="inputs"):
        IntegratedGradients(model).attribute(X.tolist(), target=0)
    with pytest.raises(TypeError, match="inputs"):
        IntegratedGradients(model).attribute((), target=0)
    with pytest.raises(ValueError, match="inputs"):
        IntegratedGradients(model).attribute(torch.tensor(1.0), target=0)
    with pytest.raises(ValueError, match="baselines"):
        IntegratedGradients(model).attribute(X, baselines=X.to("meta"), target=0)
    with pytest.raises(TypeError, match="forward_func"):
        IntegratedGradients("model")


def _under_no_grad(model):
    def forward(x):
        with torch.no_grad():
            return model(x)

    return forward


@pytest.mark.parametrize(
    "wrap",
    [_under_no_grad, lambda m: lambda x: m(x).detach(), lambda m: lambda x: (m(x) > 0).double()],
    ids=["no_grad", "detached", "from-a-comparison"],
)
def test_an_output_without_a_graph_is_a_clear_error(backend, wrap):
    # captum fails inside autograd ("element 0 of tensors does not require grad"); fastattr
    # says which output and why.
    model = mlp()
    with pytest.raises(RuntimeError, match="does not require grad"):
        captum_attr.IntegratedGradients(wrap(model)).attribute(X, target=1, n_steps=3)
    with pytest.raises(RuntimeError, match=r"the output to attribute .* has no gradient"):
        IntegratedGradients(wrap(model)).attribute(X, target=1, n_steps=3)
    # A neuron of integer values (LayerIntegratedGradients refuses such a layer outright).
    integer_layer = nn.Sequential(model, Comparison())
    with pytest.raises(RuntimeError, match=r"the output to attribute .* has no gradient"):
        fastattr.NeuronIntegratedGradients(integer_layer, integer_layer[1]).attribute(
            X, 1, n_steps=3
        )


class Comparison(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return (x > 0).long()


def test_output_with_several_values_per_example_needs_target(backend):
    with pytest.raises(ValueError, match="target"):
        IntegratedGradients(mlp()).attribute(X)
    with pytest.raises(ValueError, match="target"):
        IntegratedGradients(seeded(Output3D())).attribute(X, target=1)
    with pytest.raises(ValueError, match="target"):
        IntegratedGradients(seeded(Scalar())).attribute(X, target=0)


class ModelOutput(nn.Module):
    """Returns its logits in an object, as HuggingFace's models do."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> object:
        return types.SimpleNamespace(logits=self.linear(x))


def test_an_output_holding_logits_is_refused_with_the_way_to_take_them():
    model = ModelOutput().double()
    x = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"got SimpleNamespace: it holds \.logits.*\.logits`"):
        fastattr.IntegratedGradients(model).attribute(x, target=0)


@pytest.mark.parametrize("cls", ["IntegratedGradients", "NeuronIntegratedGradients"])
def test_integer_inputs_take_captums_path_in_the_default_dtype(cls):
    # Pixel values in uint8 and counts in int64: captum builds the path in the default
    # floating dtype (its differences from integer baselines taken in the integers' dtype).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    pixels = torch.randint(0, 256, (4, 6), dtype=torch.uint8)
    counts = torch.randint(-9, 10, (4, 6))
    method = {"IntegratedGradients": (), "NeuronIntegratedGradients": (model[1],)}[cls]
    selected = {"target": 2} if cls == "IntegratedGradients" else {"neuron_selector": 3}
    for inputs, baselines in [(pixels, 0), (pixels, 1.5), (counts, -2), (counts, None)]:
        kwargs = {"baselines": baselines, "n_steps": 9, **selected}
        ours = getattr(fastattr, cls)(model, *method).attribute(inputs, **kwargs)
        theirs = getattr(captum_attr, cls)(model, *method).attribute(inputs, **kwargs)
        assert ours.dtype == theirs.dtype == torch.get_default_dtype()
        torch.testing.assert_close(ours, theirs)
    # A baseline above a uint8 pixel: captum's difference wraps around (a pixel of 0 minus a
    # baseline of 1 is 255 in uint8); fastattr's is taken as for floats.
    pixels[0, 0] = 0
    kwargs = {"baselines": 1, "n_steps": 9, **selected}
    ours = getattr(fastattr, cls)(model, *method).attribute(pixels, **kwargs)
    wrapped = getattr(captum_attr, cls)(model, *method).attribute(pixels, **kwargs)
    exact = getattr(captum_attr, cls)(model, *method).attribute(pixels.float(), **kwargs)
    torch.testing.assert_close(ours, exact)
    assert not torch.allclose(wrapped, exact)


def test_token_ids_made_floating_point_fail_in_the_model_with_a_note():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2))
    ids = torch.randint(0, 10, (2, 3))
    with pytest.raises(RuntimeError) as failed:
        IntegratedGradients(model).attribute(ids, target=0)
    with pytest.raises(RuntimeError):  # captum fails in the embedding too
        captum_attr.IntegratedGradients(model).attribute(ids, target=0)
    if sys.version_info >= (3, 11):  # exception notes
        assert "inputs[0] (torch.int64) ran through the model along the path in" in str(
            failed.value.__notes__
        )
        assert "LayerIntegratedGradients" in failed.value.__notes__[0]


def test_a_baseline_of_a_wider_dtype_runs_in_the_inputs_dtype():
    # A float64 baseline (numpy's default) with float32 inputs and model: captum's path takes
    # the wider dtype and fails in the model; fastattr's runs in the inputs' dtype.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    x = torch.randn(3, 4)
    baseline = torch.from_numpy(np.full((1, 4), 0.25))
    ours = IntegratedGradients(model).attribute(x, baselines=baseline, target=1)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(
        ours, IntegratedGradients(model).attribute(x, baselines=baseline.float(), target=1)
    )
    with pytest.raises(RuntimeError, match="dtype"):
        captum_attr.IntegratedGradients(model).attribute(x, baselines=baseline, target=1)
