"""The compiled kernels (torch.ops.fastattr.*) against their PyTorch twins.

The CPU kernels are built without FMA contraction and compute in the twins' precision and
order, so the elementwise results must be bit-identical. Only the per-example sums may differ:
both accumulate in float64, but in a different order. The random-operand tests also run on a
GPU (the "cuda" cases, skipped without one), where the CUDA kernels must match both the twins
and the CPU kernels; tests/test_ops_cuda.py has the checks only a GPU has.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

from fastattr import ops, use_backend
from fastattr.ops import reference

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
BACKENDS = ("compiled", "reference")
RANDOM = settings(max_examples=35, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------
# Drawing operands


def layouts_for(dim: int) -> list[str]:
    """Every memory layout a tensor of `dim` dimensions can be given here."""
    layouts = ["contiguous", "sliced"]
    if dim >= 2:
        layouts.append("transposed")
    if dim == 4:
        layouts.append("channels_last")
    if dim == 5:
        layouts.append("channels_last_3d")
    return layouts


def dense_layouts_for(dim: int) -> list[str]:
    """The layouts an accumulator may have."""
    return [layout for layout in layouts_for(dim) if layout not in ("sliced", "transposed")]


def make_tensor(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    layout: str,
    generator: torch.Generator,
    device: str = "cpu",
) -> Tensor:
    """Standard normal values of `shape` on `device`, stored as `layout` says."""
    shape = tuple(shape)

    def randn(*size: int) -> Tensor:
        values = torch.randn(size, generator=generator, dtype=torch.float64)
        return values.to(device=device, dtype=dtype)

    if layout == "sliced":
        if not shape:
            return randn(2)[::2][0]
        return randn(*shape[:-1], 2 * shape[-1])[..., ::2]
    if layout == "transposed":
        return randn(*shape[:-2], shape[-1], shape[-2]).transpose(-1, -2)
    tensor = randn(*shape)
    if layout == "channels_last":
        return tensor.contiguous(memory_format=torch.channels_last)
    if layout == "channels_last_3d":
        return tensor.contiguous(memory_format=torch.channels_last_3d)
    assert layout == "contiguous", layout
    return tensor


@st.composite
def batched_shapes(draw: st.DrawFn, max_dims: int = 5) -> tuple[int, ...]:
    """(B, ...) with 1 to `max_dims` dimensions; B may be 0."""
    dims = draw(st.integers(1, max_dims))
    batch = draw(st.integers(0, 4))
    return (batch, *draw(st.lists(st.integers(1, 4), min_size=dims - 1, max_size=dims - 1)))


@st.composite
def any_shapes(draw: st.DrawFn) -> tuple[int, ...]:
    """0 to 5 dimensions of 0 to 4 each (for the ops that take no batch dimension)."""
    dims = draw(st.integers(0, 5))
    return tuple(draw(st.lists(st.integers(0, 4), min_size=dims, max_size=dims)))


def draw_generator(data: st.DataObject) -> torch.Generator:
    return torch.Generator().manual_seed(data.draw(st.integers(0, 2**32 - 1), label="seed"))


def draw_baselines(
    data: st.DataObject,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    generator: torch.Generator,
    device: str = "cpu",
) -> Tensor:
    """A baseline broadcastable to `shape` in one of the forms the ops accept."""
    form = data.draw(
        st.sampled_from(["scalar", "one", "full", "expanded", "lower_rank"]), label="baselines"
    )
    if form == "scalar":
        return make_tensor((), dtype, "contiguous", generator, device)
    if form == "one":
        return make_tensor((1, *shape[1:]), dtype, "contiguous", generator, device)
    if form == "full":
        layout = data.draw(st.sampled_from(layouts_for(len(shape))), label="baselines layout")
        return make_tensor(shape, dtype, layout, generator, device)
    if form == "expanded":  # (B, ...) in size, one row in memory (stride 0)
        return make_tensor((1, *shape[1:]), dtype, "contiguous", generator, device).expand(shape)
    # Trailing dimensions only, some of them broadcast from 1.
    offset = data.draw(st.integers(1, len(shape)), label="dropped dims")
    kept = [size if data.draw(st.booleans(), label="keep dim") else 1 for size in shape[offset:]]
    return make_tensor(tuple(kept), dtype, "contiguous", generator, device)


# ---------------------------------------------------------------------------------------------
# Comparisons


def assert_identical(actual: Tensor, expected: Tensor) -> None:
    """Same shape, dtype, device and bits (NaN where the twin has NaN)."""
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    assert actual.device == expected.device
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


def assert_row_sums_close(actual: Tensor, expected: Tensor, terms: Tensor) -> None:
    """Per-example sums that were accumulated in float64 in two different orders.

    The two float64 sums of row b differ by at most n * eps64 * sum_j |term_j|; rounding each
    to the output dtype adds at most one unit in the last place.
    """
    assert actual.shape == expected.shape == (terms.shape[0],)
    assert actual.dtype == expected.dtype
    rows = terms.detach().double().reshape(terms.shape[0], math.prod(terms.shape[1:]))
    order_error = rows.shape[1] * torch.finfo(torch.float64).eps * rows.abs().sum(1)
    rounding = torch.finfo(actual.dtype).eps * expected.double().abs()
    error = (actual.double() - expected.double()).abs()
    assert bool((error <= order_error + rounding).all()), (actual, expected)


# ---------------------------------------------------------------------------------------------
# The twins compute what the ops are defined to compute


@pytest.mark.parametrize("backend", BACKENDS)
def test_interpolate_points_puts_each_point_on_its_examples_path(backend: str) -> None:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(3, 2, 5, generator=generator, dtype=torch.float64)
    baselines = torch.randn(3, 2, 5, generator=generator, dtype=torch.float64)
    rows = torch.tensor([2, 0, 2, 1, 0])
    alphas = torch.tensor([0.0, 0.25, 1.0, 1.5, 0.0], dtype=torch.float64)
    with use_backend(backend):
        path = ops.interpolate_points(inputs, baselines, rows, alphas)
    assert path.shape == (5, 2, 5)
    for p, (b, alpha) in enumerate(zip(rows.tolist(), alphas.tolist())):
        row = baselines[b] + alpha * (inputs[b] - baselines[b])
        torch.testing.assert_close(path[p], row, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(path[[0, 4]], baselines[[2, 0]], rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_accumulate_points_is_a_weighted_sum_per_row(backend: str) -> None:
    generator = torch.Generator().manual_seed(1)
    batch = 3
    rows = torch.tensor([1, 0, 1, 2, 1, 0, 0])
    grads = torch.randn(rows.numel(), 4, generator=generator, dtype=torch.float64)
    weights = torch.rand(rows.numel(), generator=generator, dtype=torch.float64)
    inputs = torch.randn(batch, 4, generator=generator, dtype=torch.float64)
    baselines = torch.randn(4, generator=generator, dtype=torch.float64)
    start = torch.randn(batch, 4, generator=generator, dtype=torch.float64)
    accumulator = start.clone()
    with use_backend(backend):
        ops.accumulate_points(accumulator, grads, rows, weights)
        scaled, scaled_sums = ops.quadrature_finish(accumulator, inputs, baselines, True)
        plain, plain_sums = ops.quadrature_finish(accumulator, inputs, baselines, False)
    integral = start.clone()
    for p, b in enumerate(rows.tolist()):
        integral[b] += weights[p] * grads[p]
    torch.testing.assert_close(accumulator, integral, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(scaled, integral * (inputs - baselines), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(scaled_sums, scaled.sum(1), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(plain, accumulator, rtol=0, atol=0)
    torch.testing.assert_close(plain_sums, accumulator.sum(1), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("backend", BACKENDS)
def test_point_slopes_are_directional_derivatives(backend: str) -> None:
    generator = torch.Generator().manual_seed(8)
    inputs = torch.randn(3, 2, 4, generator=generator, dtype=torch.float64)
    baselines = torch.randn(1, 2, 4, generator=generator, dtype=torch.float64)
    rows = torch.tensor([2, 0, 2, 1])
    grads = torch.randn(4, 2, 4, generator=generator, dtype=torch.float64)
    with use_backend(backend):
        slopes = ops.point_slopes(grads, rows, inputs, baselines)
    assert slopes.dtype == torch.float64 and slopes.shape == (4,)
    for p, b in enumerate(rows.tolist()):
        expected = (grads[p] * (inputs[b] - baselines[0])).sum()
        torch.testing.assert_close(slopes[p], expected, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_epsilon_ratio_takes_sign_of_zero_as_positive(backend: str, dtype: torch.dtype) -> None:
    relevance = torch.tensor([1.0, 1.0, 1.0, -2.0], dtype=dtype)
    z = torch.tensor([0.0, -0.0, -1.0, 3.0], dtype=dtype)
    with use_backend(backend):
        ratio = ops.epsilon_ratio(relevance, z, 0.5)
    expected = torch.tensor([2.0, 2.0, -1.0 / 1.5, -2.0 / 3.5], dtype=torch.float64)
    torch.testing.assert_close(ratio.double(), expected, rtol=torch.finfo(dtype).eps, atol=0)


# ---------------------------------------------------------------------------------------------
# Kernels against twins on random operands, on each device
#
# On a GPU the kernel must also match the CPU kernel on the same operands moved to the CPU
# (built with --fmad=false, the CUDA kernels round each operation as the CPU kernels do).

DEVICES = ("cpu", pytest.param("cuda", marks=pytest.mark.cuda))


def on_each_device(test: Callable[[str, st.DataObject], None]) -> Callable:
    """test(device, data) with RANDOM's settings, parametrized by device."""
    return pytest.mark.parametrize("device", DEVICES)(RANDOM(given(data=st.data())(test)))


def on_cpu(*tensors: Tensor) -> list[Tensor]:
    return [tensor.cpu() for tensor in tensors]


def draw_table(data: st.DataObject, table: Tensor, device: str) -> Tensor:
    """A float64 table (alphas, weights): on a GPU, either on the CPU or on the GPU (both are
    accepted)."""
    if device == "cpu":
        return table
    return table.to(data.draw(st.sampled_from(["cpu", device]), label="table device"))


def assert_kernel_identical(name: str, tensors: tuple[Tensor, ...], *scalars: object) -> Tensor:
    """torch.ops.fastattr.<name>(*tensors, *scalars), bit-identical to its twin on the same
    operands and, off the CPU, to the CPU kernel on the operands moved to the CPU."""
    kernel = getattr(torch.ops.fastattr, name)
    actual = kernel(*tensors, *scalars)
    assert_identical(actual, getattr(reference, name)(*tensors, *scalars))
    if actual.device.type != "cpu":
        assert_identical(actual.cpu(), kernel(*on_cpu(*tensors), *scalars))
    return actual


@st.composite
def point_rows(draw: st.DrawFn, batch: int, max_points: int = 12) -> Tensor:
    """(P,) int64 rows of a batch of `batch`, in any order and with repeats (none if empty)."""
    if batch == 0:
        return torch.zeros(0, dtype=torch.int64)
    count = draw(st.integers(0, max_points), label="points")
    return torch.tensor(
        draw(st.lists(st.integers(0, batch - 1), min_size=count, max_size=count)), dtype=torch.int64
    )


@on_each_device
def test_interpolate_points_matches_twin(device: str, data: st.DataObject) -> None:
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    shape = data.draw(batched_shapes(), label="shape")
    layout = data.draw(st.sampled_from(layouts_for(len(shape))), label="layout")
    rows = data.draw(point_rows(shape[0]), label="rows")
    generator = draw_generator(data)
    inputs = make_tensor(shape, dtype, layout, generator, device)
    baselines = draw_baselines(data, shape, dtype, generator, device)
    # Alphas outside [0, 1] too: the op does not assume a particular quadrature.
    alphas = 2 * torch.rand(rows.numel(), generator=generator, dtype=torch.float64) - 0.5
    alphas = draw_table(data, alphas, device)
    rows = draw_table(data, rows, device)
    path = assert_kernel_identical("interpolate_points", (inputs, baselines, rows, alphas))
    assert path.shape == (rows.numel(), *shape[1:])


@on_each_device
def test_accumulate_points_matches_twin_streamed_in_chunks(
    device: str, data: st.DataObject
) -> None:
    grad_dtype = data.draw(st.sampled_from(DTYPES), label="grad dtype")
    accumulator_dtypes = (
        [torch.float64] if grad_dtype == torch.float64 else [torch.float32, torch.float64]
    )
    accumulator_dtype = data.draw(st.sampled_from(accumulator_dtypes), label="acc dtype")
    shape = data.draw(batched_shapes(), label="shape")
    accumulator_layout = data.draw(st.sampled_from(dense_layouts_for(len(shape))))
    grad_layout = data.draw(st.sampled_from(layouts_for(len(shape))), label="grad layout")
    rows = data.draw(point_rows(shape[0]), label="rows")
    points = rows.numel()
    cuts = (
        sorted(data.draw(st.sets(st.integers(1, points - 1)), label="cuts")) if points > 1 else []
    )
    generator = draw_generator(data)
    start = make_tensor(shape, accumulator_dtype, accumulator_layout, generator, device)
    grads = make_tensor((points, *shape[1:]), grad_dtype, grad_layout, generator, device)
    weights = torch.rand(points, generator=generator, dtype=torch.float64)
    weights = draw_table(data, weights, device)
    rows = draw_table(data, rows, device)

    expected = start.clone()
    reference.accumulate_points(expected, grads, rows, weights)

    whole = start.clone()
    torch.ops.fastattr.accumulate_points(whole, grads, rows, weights)
    assert_identical(whole, expected)
    assert whole.stride() == start.stride()

    # Each row adds its points in order whatever the chunking, so streaming is exact.
    streamed = start.clone()
    for low, high in itertools.pairwise([0, *cuts, points]):
        torch.ops.fastattr.accumulate_points(
            streamed, grads[low:high], rows[low:high], weights[low:high]
        )
    assert streamed.stride() == start.stride()
    assert_identical(streamed, expected)

    if device != "cpu":
        on_host = start.cpu()
        torch.ops.fastattr.accumulate_points(on_host, *on_cpu(grads, rows, weights))
        assert_identical(streamed.cpu(), on_host)


@on_each_device
def test_point_slopes_match_twin(device: str, data: st.DataObject) -> None:
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    shape = data.draw(batched_shapes(), label="shape")
    rows = data.draw(point_rows(shape[0]), label="rows")
    grad_layout = data.draw(st.sampled_from(layouts_for(len(shape))), label="grad layout")
    input_layout = data.draw(st.sampled_from(layouts_for(len(shape))), label="input layout")
    generator = draw_generator(data)
    inputs = make_tensor(shape, dtype, input_layout, generator, device)
    baselines = draw_baselines(data, shape, dtype, generator, device)
    grads = make_tensor((rows.numel(), *shape[1:]), dtype, grad_layout, generator, device)
    rows = draw_table(data, rows, device)
    expected = reference.point_slopes(grads, rows, inputs, baselines)
    actual = torch.ops.fastattr.point_slopes(grads, rows, inputs, baselines)
    index = rows.to(inputs.device)
    terms = grads.double() * (inputs.double() - baselines.double()).index_select(0, index)
    assert_row_sums_close(actual, expected, terms)
    if device != "cpu":
        on_host = torch.ops.fastattr.point_slopes(*on_cpu(grads, rows, inputs, baselines))
        assert_row_sums_close(actual.cpu(), on_host, terms.cpu())


def test_accumulate_points_over_a_wide_span_of_rows() -> None:
    """Points scattered over many more rows than there are points (grouped by a sort rather
    than a count over the span), and rows longer than a task's slice of columns."""
    generator = torch.Generator().manual_seed(9)
    for batch, row, points in ((10_000, 3, 7), (3, 40_000, 9)):
        rows = torch.randint(0, batch, (points,), generator=generator)
        rows[-1] = rows[0]  # a repeat, added in order
        grads = torch.randn(points, row, generator=generator)
        weights = torch.rand(points, generator=generator, dtype=torch.float64)
        actual = torch.zeros(batch, row)
        expected = actual.clone()
        torch.ops.fastattr.accumulate_points(actual, grads, rows, weights)
        reference.accumulate_points(expected, grads, rows, weights)
        assert_identical(actual, expected)


@on_each_device
def test_quadrature_finish_matches_twin(device: str, data: st.DataObject) -> None:
    accumulator_dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
    input_dtype = data.draw(st.sampled_from(DTYPES), label="input dtype")
    shape = data.draw(batched_shapes(), label="shape")
    accumulator_layout = data.draw(st.sampled_from(dense_layouts_for(len(shape))))
    input_layout = data.draw(st.sampled_from(layouts_for(len(shape))), label="input layout")
    multiply_by_inputs = data.draw(st.booleans(), label="multiply_by_inputs")
    generator = draw_generator(data)
    accumulator = make_tensor(shape, accumulator_dtype, accumulator_layout, generator, device)
    inputs = make_tensor(shape, input_dtype, input_layout, generator, device)
    baselines = draw_baselines(data, shape, input_dtype, generator, device)

    expected, expected_sums = reference.quadrature_finish(
        accumulator, inputs, baselines, multiply_by_inputs
    )
    actual, sums = torch.ops.fastattr.quadrature_finish(
        accumulator, inputs, baselines, multiply_by_inputs
    )
    assert_identical(actual, expected)
    assert_row_sums_close(sums, expected_sums, expected)
    if device != "cpu":
        cpu_actual, cpu_sums = torch.ops.fastattr.quadrature_finish(
            *on_cpu(accumulator, inputs, baselines), multiply_by_inputs
        )
        assert_identical(actual.cpu(), cpu_actual)
        assert_row_sums_close(sums.cpu(), cpu_sums, cpu_actual)


def draw_signed_zeros(z: Tensor, generator: torch.Generator) -> None:
    """Exact zeros of both signs in `z`, where the sign convention decides the result (in
    place, so that z keeps its layout)."""
    pick = torch.rand(z.shape, generator=generator).to(z.device)
    z.masked_fill_(pick < 0.2, 0.0).masked_fill_(pick > 0.9, -0.0)


@on_each_device
def test_epsilon_ratio_matches_twin(device: str, data: st.DataObject) -> None:
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    shape = data.draw(any_shapes(), label="shape")
    dims = len(shape)
    relevance_layout = data.draw(st.sampled_from(layouts_for(dims)), label="relevance layout")
    z_layout = data.draw(st.sampled_from(layouts_for(dims)), label="z layout")
    epsilon = data.draw(
        st.one_of(st.sampled_from([0.0, 1e-9, 0.25]), st.floats(0, 10)), label="epsilon"
    )
    generator = draw_generator(data)
    relevance = make_tensor(shape, dtype, relevance_layout, generator, device)
    z = make_tensor(shape, dtype, z_layout, generator, device)
    draw_signed_zeros(z, generator)
    assert_kernel_identical("epsilon_ratio", (relevance, z), epsilon)


@on_each_device
def test_input_relevance_matches_twin(device: str, data: st.DataObject) -> None:
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    shape = data.draw(any_shapes(), label="shape")
    dims = len(shape)
    activation_layout = data.draw(st.sampled_from(layouts_for(dims)))
    contribution_layout = data.draw(st.sampled_from(layouts_for(dims)))
    generator = draw_generator(data)
    activations = make_tensor(shape, dtype, activation_layout, generator, device)
    contributions = make_tensor(shape, dtype, contribution_layout, generator, device)
    assert_kernel_identical("input_relevance", (activations, contributions))


@on_each_device
def test_epsilon_ratio_of_product_matches_twin(device: str, data: st.DataObject) -> None:
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    shape = data.draw(any_shapes(), label="shape")
    dims = len(shape)
    layouts = [data.draw(st.sampled_from(layouts_for(dims))) for _ in range(3)]
    epsilon = data.draw(st.sampled_from([0.0, 1e-9, 0.25]), label="epsilon")
    generator = draw_generator(data)
    a, c, z = (make_tensor(shape, dtype, layout, generator, device) for layout in layouts)
    draw_signed_zeros(z, generator)
    assert_kernel_identical("epsilon_ratio_of_product", (a, c, z), epsilon)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("shape", "layout"), [((3, 4, 2, 5), "channels_last"), ((2, 3, 2, 4, 3), "channels_last_3d")]
)
def test_channels_last_operands_match_twin(
    shape: tuple[int, ...], layout: str, dtype: torch.dtype
) -> None:
    """Every op on channels_last data, mixed with contiguous operands (the random tests reach
    these layouts only now and then)."""
    generator = torch.Generator().manual_seed(7)
    inputs = make_tensor(shape, dtype, layout, generator)
    other = make_tensor(shape, dtype, "contiguous", generator)
    rows = torch.arange(shape[0]).repeat(3)
    alphas = torch.rand(rows.numel(), generator=generator, dtype=torch.float64)
    for baselines in (other, other[:1], make_tensor(shape[1:], dtype, "contiguous", generator)):
        assert_identical(
            torch.ops.fastattr.interpolate_points(inputs, baselines, rows, alphas),
            reference.interpolate_points(inputs, baselines, rows, alphas),
        )
    accumulator_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for accumulator_layout in (layout, "contiguous"):
        start = make_tensor(shape, accumulator_dtype, accumulator_layout, generator)
        for grads_layout in (layout, "contiguous"):
            grads = make_tensor((rows.numel(), *shape[1:]), dtype, grads_layout, generator)
            actual, expected = start.clone(), start.clone()
            torch.ops.fastattr.accumulate_points(actual, grads, rows, alphas)
            reference.accumulate_points(expected, grads, rows, alphas)
            assert_identical(actual, expected)
        for finish_inputs in (inputs, other):
            attributions, sums = torch.ops.fastattr.quadrature_finish(
                start, finish_inputs, other[:1], True
            )
            want, want_sums = reference.quadrature_finish(start, finish_inputs, other[:1], True)
            assert_identical(attributions, want)
            assert_row_sums_close(sums, want_sums, want)
    for first, second in ((inputs, other), (other, inputs)):
        assert_identical(
            torch.ops.fastattr.epsilon_ratio(first, second, 0.01),
            reference.epsilon_ratio(first, second, 0.01),
        )
        assert_identical(
            torch.ops.fastattr.input_relevance(first, second),
            reference.input_relevance(first, second),
        )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("shape", "steps"),
    [((0,), 3), ((0, 3), 1), ((2, 0), 3), ((3, 0, 2), 2), ((2, 3), 0), ((0, 2, 2, 2), 0)],
)
def test_empty_operands_match_twin(shape: tuple[int, ...], steps: int, dtype: torch.dtype) -> None:
    """Empty batches, empty rows and no points give empty or unchanged results, no error."""
    generator = torch.Generator().manual_seed(3)
    inputs = make_tensor(shape, dtype, "contiguous", generator)
    baselines = torch.zeros((), dtype=dtype)
    rows = torch.arange(shape[0]).repeat(steps)
    alphas = torch.rand(rows.numel(), generator=generator, dtype=torch.float64)
    assert_identical(
        torch.ops.fastattr.interpolate_points(inputs, baselines, rows, alphas),
        reference.interpolate_points(inputs, baselines, rows, alphas),
    )
    accumulator_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    start = make_tensor(shape, accumulator_dtype, "contiguous", generator)
    grads = make_tensor((rows.numel(), *shape[1:]), dtype, "contiguous", generator)
    actual, expected = start.clone(), start.clone()
    torch.ops.fastattr.accumulate_points(actual, grads, rows, alphas)
    reference.accumulate_points(expected, grads, rows, alphas)
    assert_identical(actual, expected)
    for multiply_by_inputs in (True, False):
        for got, want in zip(
            torch.ops.fastattr.quadrature_finish(actual, inputs, baselines, multiply_by_inputs),
            reference.quadrature_finish(actual, inputs, baselines, multiply_by_inputs),
        ):
            assert_identical(got, want)
    assert_identical(
        torch.ops.fastattr.epsilon_ratio(inputs, inputs, 0.1),
        reference.epsilon_ratio(inputs, inputs, 0.1),
    )
    assert_identical(
        torch.ops.fastattr.input_relevance(inputs, inputs),
        reference.input_relevance(inputs, inputs),
    )


# ---------------------------------------------------------------------------------------------
# Registration: schemas, fake implementations, torch.compile


def _opcheck_samples() -> list[tuple[str, tuple]]:
    generator = torch.Generator().manual_seed(4)

    def randn(*shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
        return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)

    def channels_last(tensor: Tensor) -> Tensor:
        return tensor.contiguous(memory_format=torch.channels_last)

    rows = torch.tensor([3, 0, 1, 3, 2])
    alphas = torch.rand(5, generator=generator, dtype=torch.float64)
    image = channels_last(randn(2, 3, 4, 5))
    half_image = channels_last(randn(2, 3, 4, 5, dtype=torch.float16))
    volume = randn(2, 3, 2, 2, 2).contiguous(memory_format=torch.channels_last_3d)
    return [
        ("interpolate_points", (randn(4, 6), randn(1, 6), rows, alphas)),
        ("interpolate_points", (image, randn(4, 5), rows[:3] % 2, alphas[:3])),
        (
            "interpolate_points",
            (volume.double(), torch.zeros((), dtype=torch.float64), rows[:2] % 2, alphas[:2]),
        ),
        ("interpolate_points", (randn(5, 3).t(), randn(5, 3).t(), rows[1:2], alphas[:1])),
        ("accumulate_points", (randn(4, 6), randn(5, 6), rows, alphas)),
        (
            "accumulate_points",
            (channels_last(randn(2, 3, 4, 5)), randn(3, 3, 4, 5), rows[:3] % 2, alphas[:3]),
        ),
        (
            "accumulate_points",
            (randn(4, 6, dtype=torch.float64), randn(5, 6).bfloat16(), rows, alphas),
        ),
        ("point_slopes", (randn(5, 6), rows, randn(4, 6), randn(1, 6))),
        (
            "point_slopes",
            (half_image[[0, 1, 1]], rows[:3] % 2, half_image, randn(5, dtype=torch.float16)),
        ),
        (
            "point_slopes",
            (
                volume.double()[[1]],
                rows[1:2],
                volume.double(),
                torch.zeros((), dtype=torch.float64),
            ),
        ),
        ("quadrature_finish", (randn(2, 6), randn(2, 6), randn(6), True)),
        (
            "quadrature_finish",
            (
                channels_last(randn(2, 3, 4, 5)),
                half_image,
                randn(1, 3, 4, 5, dtype=torch.float16),
                True,
            ),
        ),
        ("quadrature_finish", (randn(3, 4, dtype=torch.float64), randn(3, 4), randn(), False)),
        ("epsilon_ratio", (randn(3, 4), randn(3, 4), 1e-6)),
        ("epsilon_ratio", (image, channels_last(randn(2, 3, 4, 5)), 0.25)),
        ("epsilon_ratio", (randn().bfloat16(), randn().bfloat16(), 0.0)),
        ("input_relevance", (randn(3, 4), randn(3, 4))),
        ("input_relevance", (image, randn(2, 3, 4, 5))),
        ("input_relevance", (randn().double(), randn().double())),
        ("input_relevance", (volume.bfloat16(), volume.bfloat16())),
        ("epsilon_ratio_of_product", (randn(3, 4), randn(3, 4), randn(3, 4), 1e-6)),
        ("epsilon_ratio_of_product", (image, randn(2, 3, 4, 5), randn(2, 3, 4, 5), 0.25)),
        ("epsilon_ratio_of_product", (randn().double(), randn().double(), randn().double(), 0.0)),
        ("epsilon_ratio_of_product", (volume.half(), volume.half(), volume.half(), 1e-3)),
    ]


@pytest.mark.parametrize(("name", "args"), _opcheck_samples())
def test_opcheck(name: str, args: tuple) -> None:
    torch.library.opcheck(getattr(torch.ops.fastattr, name), args)


def test_compiles_with_fullgraph() -> None:
    def attribute(
        accumulator: Tensor,
        inputs: Tensor,
        baselines: Tensor,
        rows: Tensor,
        alphas: Tensor,
        weights: Tensor,
    ) -> tuple[Tensor, Tensor]:
        path = torch.ops.fastattr.interpolate_points(inputs, baselines, rows, alphas)
        torch.ops.fastattr.accumulate_points(accumulator, path, rows, weights)
        return torch.ops.fastattr.quadrature_finish(accumulator, inputs, baselines, True)

    generator = torch.Generator().manual_seed(5)
    inputs = torch.randn(2, 3, generator=generator, dtype=torch.float64)
    baselines = torch.randn(3, generator=generator, dtype=torch.float64)
    rows = torch.tensor([0, 1, 1, 0, 1])
    alphas = torch.rand(5, generator=generator, dtype=torch.float64)
    weights = torch.rand(5, generator=generator, dtype=torch.float64)
    eager_accumulator = torch.zeros(2, 3, dtype=torch.float64)
    compiled_accumulator = eager_accumulator.clone()
    expected = attribute(eager_accumulator, inputs, baselines, rows, alphas, weights)
    compiled = torch.compile(attribute, fullgraph=True)
    actual = compiled(compiled_accumulator, inputs, baselines, rows, alphas, weights)
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # The in-place accumulation reaches the caller's tensor under compile too.
    torch.testing.assert_close(compiled_accumulator, eager_accumulator, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Bad arguments: fastattr.ops raises the same exception on both backends, naming the argument
# (one check, in Python); the kernels called directly guard against what would crash them


def t(*shape: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Tensor:
    return torch.ones(shape, dtype=dtype, device=device)


def a(*values: float, device: str = "cpu") -> Tensor:
    return torch.tensor(values, dtype=torch.float64, device=device)


def r(*values: int, device: str = "cpu") -> Tensor:
    return torch.tensor(values, dtype=torch.int64, device=device)


F16, BF16, F64, I32, I64 = torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64
NAN, INF, META = math.nan, math.inf, "meta"

# op: [(exception, the argument its message names, the arguments)]: faults that would crash a
# kernel or make it misread memory, which the kernels guard against too
BAD_CALLS = {
    "interpolate_points": [  # (inputs, baselines, rows, alphas)
        (ValueError, "inputs", lambda: (t(), t(), r(0), a(0.5))),
        (TypeError, "inputs", lambda: (t(2, dtype=I64), t(2, dtype=I64), r(0), a(0.5))),
        (TypeError, "inputs", lambda: (t(2, dtype=torch.float8_e4m3fn), t(), r(0), a(0.5))),
        (TypeError, "inputs", lambda: (t(2, dtype=torch.complex64), t(), r(0), a(0.5))),
        (ValueError, "baselines", lambda: (t(2, 3), t(2, 4), r(0), a(0.5))),
        (ValueError, "baselines", lambda: (t(2, 3), t(3, 1), r(0), a(0.5))),
        (ValueError, "baselines", lambda: (t(2, 3), t(1, 2, 3), r(0), a(0.5))),
        (TypeError, "baselines", lambda: (t(2, 3), t(2, 3, dtype=F64), r(0), a(0.5))),
        (ValueError, "baselines", lambda: (t(2, 3), t(2, 3, device=META), r(0), a(0.5))),
        (ValueError, "baselines", lambda: (t(2, 3, device=META), t(3), r(0), a(0.5))),
        (IndexError, "rows", lambda: (t(2, 3), t(3), r(2), a(0.5))),
        (IndexError, "rows", lambda: (t(2, 3), t(3), r(0, -1), a(0.5, 0.5))),
        (IndexError, "rows", lambda: (t(0, 3), t(3), r(0), a(0.5))),
        (TypeError, "rows", lambda: (t(2, 3), t(3), r(0).int(), a(0.5))),
        (TypeError, "rows", lambda: (t(2, 3), t(3), a(0.0), a(0.5))),
        (ValueError, "rows", lambda: (t(2, 3), t(3), r(0).view(1, 1), a(0.5))),
        (ValueError, "rows", lambda: (t(2, 3), t(3), r(0, device=META), a(0.5))),
        (TypeError, "alphas", lambda: (t(2, 3), t(3), r(0), a(0.5).float())),
        (TypeError, "alphas", lambda: (t(2, 3), t(3), r(0, 1), torch.tensor([0, 1]))),
        (ValueError, "alphas", lambda: (t(2, 3), t(3), r(0, 1), a(0.5, 1.0).view(1, 2))),
        (ValueError, "alphas", lambda: (t(2, 3), t(3), r(0), a(0.5)[0])),
        (ValueError, "alphas", lambda: (t(2, 3), t(3), r(0), a(0.5, device=META))),
        (ValueError, "alphas", lambda: (t(2, 3), t(3), r(0, 1), a(0.5))),
    ],
    "accumulate_points": [  # (accumulator, grads, rows, weights)
        (ValueError, "accumulator", lambda: (t(), t(2), r(0), a(0.5))),
        (TypeError, "accumulator", lambda: (t(2, dtype=F16), t(1), r(0), a(0.5))),
        (TypeError, "accumulator", lambda: (t(2, dtype=BF16), t(1), r(0), a(0.5))),
        (TypeError, "accumulator", lambda: (t(2, dtype=I32), t(1), r(0), a(0.5))),
        (TypeError, "accumulator", lambda: (t(2, 3), t(1, 3, dtype=F64), r(0), a(0.5))),
        (ValueError, "accumulator", lambda: (t(3, 2).t(), t(1, 3), r(0), a(0.5))),
        (ValueError, "accumulator", lambda: (t(2, 6)[:, ::2], t(1, 3), r(0), a(0.5))),
        (TypeError, "grads", lambda: (t(2, 3), t(1, 3, dtype=I64), r(0), a(0.5))),
        (ValueError, "grads", lambda: (t(2, 3), t(), r(0), a(0.5))),
        (ValueError, "grads", lambda: (t(2, 3), t(2, 3), r(0), a(0.5))),
        (ValueError, "grads", lambda: (t(2, 3), t(2, 4), r(0, 1), a(0.5, 0.5))),
        (ValueError, "grads", lambda: (t(2, 3), t(2, 3, 1), r(0, 1), a(0.5, 0.5))),
        (ValueError, "grads", lambda: (t(2, 3), t(1, 3, device=META), r(0), a(0.5))),
        (ValueError, "grads", lambda: (t(2, 3, device=META), t(1, 3), r(0), a(0.5))),
        (IndexError, "rows", lambda: (t(2, 3), t(1, 3), r(2), a(0.5))),
        (IndexError, "rows", lambda: (t(2, 3), t(2, 3), r(1, -2), a(0.5, 0.5))),
        (TypeError, "rows", lambda: (t(2, 3), t(1, 3), r(0).int(), a(0.5))),
        (ValueError, "rows", lambda: (t(2, 3), t(1, 3), r(0).view(1, 1), a(0.5))),
        (ValueError, "rows", lambda: (t(2, 3), t(1, 3), r(0, device=META), a(0.5))),
        (ValueError, "weights", lambda: (t(2, 3), t(1, 3), r(0), a(0.5).view(1, 1))),
        (TypeError, "weights", lambda: (t(2, 3), t(1, 3), r(0), a(0.5).float())),
        (ValueError, "weights", lambda: (t(2, 3), t(1, 3), r(0), a(0.5, device=META))),
        (ValueError, "weights", lambda: (t(2, 3), t(2, 3), r(0, 1), a(0.5))),
    ],
    "point_slopes": [  # (grads, rows, inputs, baselines)
        (ValueError, "grads", lambda: (t(), r(0), t(2, 3), t(3))),
        (TypeError, "grads", lambda: (t(1, 3, dtype=I64), r(0), t(2, 3), t(3))),
        (ValueError, "inputs", lambda: (t(1, 3), r(0), t(), t())),
        (TypeError, "inputs", lambda: (t(1, 3), r(0), t(2, 3, dtype=F64), t(3, dtype=F64))),
        (ValueError, "inputs", lambda: (t(1, 3), r(0), t(2, 3, device=META), t(3))),
        (ValueError, "baselines", lambda: (t(1, 3), r(0), t(2, 3), t(4))),
        (TypeError, "baselines", lambda: (t(1, 3), r(0), t(2, 3), t(3, dtype=F64))),
        (IndexError, "rows", lambda: (t(1, 3), r(2), t(2, 3), t(3))),
        (TypeError, "rows", lambda: (t(1, 3), a(0.0), t(2, 3), t(3))),
        (ValueError, "grads", lambda: (t(2, 3), r(0), t(2, 3), t(3))),
        (ValueError, "grads", lambda: (t(1, 4), r(0), t(2, 3), t(3))),
    ],
    "quadrature_finish": [  # (accumulator, inputs, baselines, multiply_by_inputs)
        (TypeError, "accumulator", lambda: (t(2, 3, dtype=F16), t(2, 3), t(3), True)),
        (ValueError, "accumulator", lambda: (t(3, 2).t(), t(2, 3), t(3), True)),
        (ValueError, "accumulator", lambda: (t(), t(), t(), True)),
        (TypeError, "inputs", lambda: (t(2, 3), t(2, 3, dtype=I64), t(3), True)),
        (ValueError, "inputs", lambda: (t(2, 3), t(2, 4), t(4), True)),
        (ValueError, "inputs", lambda: (t(2, 3), t(2, 3, device=META), t(3), True)),
        (TypeError, "baselines", lambda: (t(2, 3), t(2, 3), t(3, dtype=F64), True)),
        (ValueError, "baselines", lambda: (t(2, 3), t(2, 3), t(2), False)),
        (ValueError, "baselines", lambda: (t(2, 3), t(2, 3), t(3, device=META), True)),
    ],
    "epsilon_ratio": [  # (relevance, z, epsilon)
        (TypeError, "relevance", lambda: (t(2, dtype=I64), t(2, dtype=I64), 0.1)),
        (TypeError, "z", lambda: (t(2), t(2, dtype=F64), 0.1)),
        (ValueError, "z", lambda: (t(2), t(3), 0.1)),
        (ValueError, "z", lambda: (t(2, 3), t(3), 0.1)),
        (ValueError, "z", lambda: (t(2), t(2, device=META), 0.1)),
    ],
    "input_relevance": [  # (activations, contributions)
        (TypeError, "activations", lambda: (t(2, dtype=I64), t(2, dtype=I64))),
        (TypeError, "activations", lambda: (t(2, dtype=torch.float8_e5m2), t(2))),
        (TypeError, "contributions", lambda: (t(2), t(2, dtype=F64))),
        (ValueError, "contributions", lambda: (t(2, 3), t(3, 2))),
        (ValueError, "contributions", lambda: (t(), t(1))),
        (ValueError, "contributions", lambda: (t(2, 3), t(2, 3, device=META))),
        (ValueError, "contributions", lambda: (t(2, 3, device=META), t(2, 3))),
    ],
}
# Faults no kernel can crash on, which only fastattr.ops checks
HARMLESS_TO_KERNELS = {
    "interpolate_points": [
        (ValueError, "alphas", lambda: (t(2, 3), t(3), r(0, 1), a(0.5, NAN))),
        (ValueError, "alphas", lambda: (t(2, 3), t(3), r(0), a(-INF))),
    ],
    "accumulate_points": [
        (ValueError, "weights", lambda: (t(2, 3), t(2, 3), r(0, 1), a(0.5, INF))),
        (ValueError, "weights", lambda: (t(2, 3), t(2, 3), r(0, 1), a(NAN, 0.5))),
    ],
    "epsilon_ratio": [
        (ValueError, "epsilon", lambda: (t(2), t(2), -1e-9)),
        (ValueError, "epsilon", lambda: (t(2), t(2), NAN)),
        (ValueError, "epsilon", lambda: (t(2), t(2), INF)),
    ],
    "epsilon_ratio_of_product": [
        (ValueError, "epsilon", lambda: (t(2), t(2), t(2), -0.5)),
    ],
}


def bad_cases(calls: dict) -> list:
    return [
        pytest.param(name, make_args, error, argument, id=f"{name}-{argument}-{i}")
        for name, cases in calls.items()
        for i, (error, argument, make_args) in enumerate(cases)
    ]


GUARDED_CASES = bad_cases(BAD_CALLS)
HARMLESS_CASES = bad_cases(HARMLESS_TO_KERNELS)


def assert_raises_untouched(
    backend: str | None, name: str, args: tuple, error: type[Exception], match: str
) -> None:
    """ops.<name>(*args) on `backend` (torch.ops.fastattr.<name> when None) raises `error`
    with a message matching `match`, and writes nothing before it: the in-place accumulator
    is untouched."""
    before = [arg.clone() if isinstance(arg, Tensor) else arg for arg in args]
    with pytest.raises(error, match=match):
        if backend is None:
            getattr(torch.ops.fastattr, name)(*args)
        else:
            with use_backend(backend):
                getattr(ops, name)(*args)
    for arg, original in zip(args, before):
        if isinstance(arg, Tensor) and arg.device.type != "meta":
            assert_identical(arg, original)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("name", "make_args", "error", "argument"), GUARDED_CASES + HARMLESS_CASES)
def test_bad_arguments_raise_naming_the_argument(
    backend: str, name: str, make_args, error: type[Exception], argument: str
) -> None:
    assert_raises_untouched(backend, name, make_args(), error, rf"^{argument}\b")


@pytest.mark.parametrize(("name", "make_args", "error", "argument"), GUARDED_CASES)
def test_kernels_called_directly_refuse_what_would_crash_them(
    name: str, make_args, error: type[Exception], argument: str
) -> None:
    """The same exception type, with the kernel's terse message naming the op and the
    argument (the fake kernel's, which is fastattr.ops', where a meta tensor sends the call
    there)."""
    match = rf"^(fastattr::{name}: )?{argument}\b"
    assert_raises_untouched(None, name, make_args(), error, match)


@pytest.mark.parametrize(("name", "make_args", "error", "argument"), HARMLESS_CASES)
def test_kernels_called_directly_leave_harmless_faults_to_fastattr_ops(
    name: str, make_args, error: type[Exception], argument: str
) -> None:
    result = getattr(torch.ops.fastattr, name)(*make_args())
    assert result is None or isinstance(result, Tensor)
