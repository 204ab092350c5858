"""The CUDA kernels against their twins on the GPU and against the CPU kernels.

Built with --fmad=false, the CUDA kernels round each operation as the twins and the CPU
kernels do, so elementwise results must be bit-identical to both; only the per-example sums
(accumulated in float64 in another order) may differ in the last place. Every test needs a
GPU and is skipped without one.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_ops import (
    DTYPES,
    RANDOM,
    _opcheck_samples,
    assert_identical,
    assert_row_sums_close,
    batched_shapes,
    dense_layouts_for,
    draw_baselines,
    draw_generator,
    layouts_for,
    make_tensor,
)
from torch import Tensor

from fastattr import ops, use_backend
from fastattr.ops import reference

pytestmark = pytest.mark.cuda

DEVICE = "cuda"
# A second device for mixed-device calls.
OTHER = "cpu"


def on_cpu(*tensors: Tensor) -> list[Tensor]:
    return [tensor.cpu() for tensor in tensors]


def draw_alphas(data: st.DataObject, steps: int, generator: torch.Generator) -> Tensor:
    """A float64 table, on the CPU or on the GPU (both are accepted)."""
    alphas = torch.rand(steps, generator=generator, dtype=torch.float64)
    return alphas.to(data.draw(st.sampled_from(["cpu", DEVICE]), label="alphas device"))


@RANDOM
@given(data=st.data())
def test_interpolate_path(data: st.DataObject) -> None:
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    shape = data.draw(batched_shapes(), label="shape")
    layout = data.draw(st.sampled_from(layouts_for(len(shape))), label="layout")
    generator = draw_generator(data)
    inputs = make_tensor(shape, dtype, layout, generator, DEVICE)
    baselines = draw_baselines(data, shape, dtype, generator, DEVICE)
    alphas = draw_alphas(data, data.draw(st.integers(1, 4), label="steps"), generator)

    path = torch.ops.fastattr.interpolate_path(inputs, baselines, alphas)
    assert_identical(path, reference.interpolate_path(inputs, baselines, alphas))
    cpu_path = torch.ops.fastattr.interpolate_path(*on_cpu(inputs, baselines, alphas))
    assert_identical(path.cpu(), cpu_path)


@RANDOM
@given(data=st.data())
def test_quadrature_accumulate_streamed(data: st.DataObject) -> None:
    grad_dtype = data.draw(st.sampled_from(DTYPES), label="grad dtype")
    accumulator_dtype = (
        torch.float64
        if grad_dtype == torch.float64
        else data.draw(st.sampled_from([torch.float32, torch.float64]), label="acc dtype")
    )
    shape = data.draw(batched_shapes(), label="shape")
    accumulator_layout = data.draw(st.sampled_from(dense_layouts_for(len(shape))))
    grad_layout = data.draw(st.sampled_from(layouts_for(len(shape))), label="grad layout")
    steps = data.draw(st.integers(1, 6), label="steps")
    cuts = sorted(data.draw(st.sets(st.integers(1, steps - 1)), label="cuts")) if steps > 1 else []
    generator = draw_generator(data)
    batch = shape[0]
    start = make_tensor(shape, accumulator_dtype, accumulator_layout, generator, DEVICE)
    grads = make_tensor((steps * batch, *shape[1:]), grad_dtype, grad_layout, generator, DEVICE)
    weights = draw_alphas(data, steps, generator)

    expected = start.clone()
    reference.quadrature_accumulate(expected, grads, weights)
    on_host = start.cpu()
    torch.ops.fastattr.quadrature_accumulate(on_host, *on_cpu(grads, weights))

    streamed = start.clone()
    bounds = [0, *cuts, steps]
    for low, high in itertools.pairwise(bounds):
        chunk = grads[low * batch : high * batch]
        torch.ops.fastattr.quadrature_accumulate(streamed, chunk, weights[low:high])
    assert streamed.stride() == start.stride()
    assert_identical(streamed, expected)
    assert_identical(streamed.cpu(), on_host)


@RANDOM
@given(data=st.data())
def test_quadrature_finish(data: st.DataObject) -> None:
    accumulator_dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
    input_dtype = data.draw(st.sampled_from(DTYPES), label="input dtype")
    shape = data.draw(batched_shapes(), label="shape")
    accumulator_layout = data.draw(st.sampled_from(dense_layouts_for(len(shape))))
    input_layout = data.draw(st.sampled_from(layouts_for(len(shape))), label="input layout")
    multiply_by_inputs = data.draw(st.booleans(), label="multiply_by_inputs")
    generator = draw_generator(data)
    accumulator = make_tensor(shape, accumulator_dtype, accumulator_layout, generator, DEVICE)
    inputs = make_tensor(shape, input_dtype, input_layout, generator, DEVICE)
    baselines = draw_baselines(data, shape, input_dtype, generator, DEVICE)

    attributions, sums = torch.ops.fastattr.quadrature_finish(
        accumulator, inputs, baselines, multiply_by_inputs
    )
    expected, expected_sums = reference.quadrature_finish(
        accumulator, inputs, baselines, multiply_by_inputs
    )
    assert_identical(attributions, expected)
    assert_row_sums_close(sums, expected_sums, expected)
    cpu_attributions, cpu_sums = torch.ops.fastattr.quadrature_finish(
        *on_cpu(accumulator, inputs, baselines), multiply_by_inputs
    )
    assert_identical(attributions.cpu(), cpu_attributions)
    assert_row_sums_close(sums.cpu(), cpu_sums, cpu_attributions)


@RANDOM
@given(data=st.data())
def test_epsilon_ratio(data: st.DataObject) -> None:
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    dims = data.draw(st.integers(0, 5), label="dims")
    shape = tuple(data.draw(st.lists(st.integers(0, 4), min_size=dims, max_size=dims)))
    relevance_layout = data.draw(st.sampled_from(layouts_for(dims)), label="relevance layout")
    z_layout = data.draw(st.sampled_from(layouts_for(dims)), label="z layout")
    epsilon = data.draw(
        st.one_of(st.sampled_from([0.0, 1e-9, 0.25]), st.floats(0, 10)), label="epsilon"
    )
    generator = draw_generator(data)
    relevance = make_tensor(shape, dtype, relevance_layout, generator, DEVICE)
    z = make_tensor(shape, dtype, z_layout, generator, DEVICE)
    pick = torch.rand(shape, generator=generator).to(DEVICE)
    z.masked_fill_(pick < 0.2, 0.0).masked_fill_(pick > 0.9, -0.0)

    ratio = torch.ops.fastattr.epsilon_ratio(relevance, z, epsilon)
    assert_identical(ratio, reference.epsilon_ratio(relevance, z, epsilon))
    cpu_ratio = torch.ops.fastattr.epsilon_ratio(*on_cpu(relevance, z), epsilon)
    assert_identical(ratio.cpu(), cpu_ratio)


@RANDOM
@given(data=st.data())
def test_relevance_product(data: st.DataObject) -> None:
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    shape = data.draw(batched_shapes(), label="shape")
    activation_layout = data.draw(st.sampled_from(layouts_for(len(shape))))
    contribution_layout = data.draw(st.sampled_from(layouts_for(len(shape))))
    generator = draw_generator(data)
    activations = make_tensor(shape, dtype, activation_layout, generator, DEVICE)
    contributions = make_tensor(shape, dtype, contribution_layout, generator, DEVICE)

    product, sums = torch.ops.fastattr.relevance_product(activations, contributions)
    expected, expected_sums = reference.relevance_product(activations, contributions)
    terms = activations.to(sums.dtype) * contributions.to(sums.dtype)
    assert_identical(product, expected)
    assert_row_sums_close(sums, expected_sums, terms)
    cpu_product, cpu_sums = torch.ops.fastattr.relevance_product(
        *on_cpu(activations, contributions)
    )
    assert_identical(product.cpu(), cpu_product)
    assert_row_sums_close(sums.cpu(), cpu_sums, terms.cpu())


@RANDOM
@given(data=st.data())
def test_input_relevance(data: st.DataObject) -> None:
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    dims = data.draw(st.integers(0, 5), label="dims")
    shape = tuple(data.draw(st.lists(st.integers(0, 4), min_size=dims, max_size=dims)))
    activation_layout = data.draw(st.sampled_from(layouts_for(dims)))
    contribution_layout = data.draw(st.sampled_from(layouts_for(dims)))
    generator = draw_generator(data)
    activations = make_tensor(shape, dtype, activation_layout, generator, DEVICE)
    contributions = make_tensor(shape, dtype, contribution_layout, generator, DEVICE)

    relevance = torch.ops.fastattr.input_relevance(activations, contributions)
    assert_identical(relevance, reference.input_relevance(activations, contributions))
    cpu_relevance = torch.ops.fastattr.input_relevance(*on_cpu(activations, contributions))
    assert_identical(relevance.cpu(), cpu_relevance)


@RANDOM
@given(data=st.data())
def test_epsilon_ratio_of_product(data: st.DataObject) -> None:
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    dims = data.draw(st.integers(0, 5), label="dims")
    shape = tuple(data.draw(st.lists(st.integers(0, 4), min_size=dims, max_size=dims)))
    layouts = [data.draw(st.sampled_from(layouts_for(dims))) for _ in range(3)]
    epsilon = data.draw(st.sampled_from([0.0, 1e-9, 0.25]), label="epsilon")
    generator = draw_generator(data)
    a, c, z = (make_tensor(shape, dtype, layout, generator, DEVICE) for layout in layouts)
    pick = torch.rand(shape, generator=generator).to(DEVICE)
    z.masked_fill_(pick < 0.2, 0.0).masked_fill_(pick > 0.9, -0.0)

    ratio = torch.ops.fastattr.epsilon_ratio_of_product(a, c, z, epsilon)
    assert_identical(ratio, reference.epsilon_ratio_of_product(a, c, z, epsilon))
    cpu_ratio = torch.ops.fastattr.epsilon_ratio_of_product(*on_cpu(a, c, z), epsilon)
    assert_identical(ratio.cpu(), cpu_ratio)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_large_operands_cross_every_block_and_grid_boundary(dtype: torch.dtype) -> None:
    """More elements than one grid covers (the kernels grid-stride) and rows longer than a
    block, with a ragged last block."""
    generator = torch.Generator().manual_seed(6)
    steps, batch, row = 3, 5, 123_457

    def randn(*shape: int, kind: torch.dtype = dtype) -> Tensor:
        values = torch.randn(shape, generator=generator, dtype=torch.float64)
        return values.to(device=DEVICE, dtype=kind)

    inputs, baselines = randn(batch, row), randn(1, row)
    alphas = torch.rand(steps, generator=generator, dtype=torch.float64)
    path = torch.ops.fastattr.interpolate_path(inputs, baselines, alphas)
    assert_identical(path, reference.interpolate_path(inputs, baselines, alphas))

    accumulator, grads = randn(batch, row, kind=torch.float32), randn(steps * batch, row)
    expected = accumulator.clone()
    reference.quadrature_accumulate(expected, grads, alphas)
    torch.ops.fastattr.quadrature_accumulate(accumulator, grads, alphas)
    assert_identical(accumulator, expected)

    attributions, sums = torch.ops.fastattr.quadrature_finish(accumulator, inputs, baselines, True)
    want, want_sums = reference.quadrature_finish(accumulator, inputs, baselines, True)
    assert_identical(attributions, want)
    assert_row_sums_close(sums, want_sums, want)

    z = randn(batch, row)
    assert_identical(
        torch.ops.fastattr.epsilon_ratio(inputs, z, 1e-3),
        reference.epsilon_ratio(inputs, z, 1e-3),
    )
    product, product_sums = torch.ops.fastattr.relevance_product(inputs, z)
    want, want_sums = reference.relevance_product(inputs, z)
    assert_identical(product, want)
    assert_row_sums_close(product_sums, want_sums, inputs.float() * z.float())
    assert_identical(torch.ops.fastattr.input_relevance(inputs, z), want)


def test_kernels_run_on_the_current_stream() -> None:
    generator = torch.Generator().manual_seed(7)
    inputs = torch.randn(64, 4096, generator=generator).to(DEVICE)
    alphas = torch.rand(8, generator=generator, dtype=torch.float64)
    zero = torch.zeros((), device=DEVICE)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        path = torch.ops.fastattr.interpolate_path(inputs, zero, alphas)
        accumulator = torch.zeros(64, 4096, device=DEVICE)
        torch.ops.fastattr.quadrature_accumulate(accumulator, path, alphas)
        attributions, _ = torch.ops.fastattr.quadrature_finish(accumulator, inputs, zero, True)
    side.synchronize()
    expected_path = reference.interpolate_path(inputs, zero, alphas)
    assert_identical(path, expected_path)
    expected = torch.zeros(64, 4096, device=DEVICE)
    reference.quadrature_accumulate(expected, expected_path, alphas)
    assert_identical(attributions, reference.quadrature_finish(expected, inputs, zero, True)[0])


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs"
)
def test_kernels_run_on_the_operands_device() -> None:
    device = torch.device(DEVICE, 1)
    generator = torch.Generator().manual_seed(8)
    inputs = torch.randn(3, 5, generator=generator).to(device)
    baselines = torch.randn(5, generator=generator).to(device)
    alphas = torch.rand(4, generator=generator, dtype=torch.float64)
    with torch.cuda.device(0):
        path = torch.ops.fastattr.interpolate_path(inputs, baselines, alphas)
        relevance, sums = torch.ops.fastattr.relevance_product(inputs, baselines.expand(3, 5))
    assert path.device == device and relevance.device == device and sums.device == device
    assert_identical(path, reference.interpolate_path(inputs, baselines, alphas))


@pytest.mark.parametrize(("name", "args"), _opcheck_samples())
def test_opcheck(name: str, args: tuple) -> None:
    on_device = tuple(arg.to(DEVICE) if isinstance(arg, Tensor) else arg for arg in args)
    torch.library.opcheck(getattr(torch.ops.fastattr, name), on_device)


def _t(*shape: int, device: str = DEVICE) -> Tensor:
    return torch.ones(shape, device=device)


def _a(*values: float, device: str = "cpu") -> Tensor:
    return torch.tensor(values, dtype=torch.float64, device=device)


# op: [(the argument the error names, the arguments)], one operand on the other device.
MIXED_DEVICES = {
    "interpolate_path": [
        ("baselines", lambda: (_t(2, 3), _t(3, device=OTHER), _a(0.5))),
        ("baselines", lambda: (_t(2, 3, device=OTHER), _t(3), _a(0.5, device=OTHER))),
        ("alphas", lambda: (_t(2, 3, device=OTHER), _t(3, device=OTHER), _a(0.5, device=DEVICE))),
    ],
    "quadrature_accumulate": [
        ("grads", lambda: (_t(2, 3), _t(2, 3, device=OTHER), _a(0.5))),
        ("grads", lambda: (_t(2, 3, device=OTHER), _t(2, 3), _a(0.5))),
        (
            "weights",
            lambda: (_t(2, 3, device=OTHER), _t(2, 3, device=OTHER), _a(0.5, device=DEVICE)),
        ),
    ],
    "quadrature_finish": [
        ("inputs", lambda: (_t(2, 3), _t(2, 3, device=OTHER), _t(3), True)),
        ("inputs", lambda: (_t(2, 3, device=OTHER), _t(2, 3), _t(3), True)),
        ("baselines", lambda: (_t(2, 3), _t(2, 3), _t(3, device=OTHER), True)),
    ],
    "epsilon_ratio": [
        ("z", lambda: (_t(2, 3), _t(2, 3, device=OTHER), 0.1)),
        ("z", lambda: (_t(2, 3, device=OTHER), _t(2, 3), 0.1)),
    ],
    "relevance_product": [
        ("contributions", lambda: (_t(2, 3), _t(2, 3, device=OTHER))),
        ("contributions", lambda: (_t(2, 3, device=OTHER), _t(2, 3))),
    ],
    "input_relevance": [
        ("contributions", lambda: (_t(2, 3), _t(2, 3, device=OTHER))),
        ("contributions", lambda: (_t(2, 3, device=OTHER), _t(2, 3))),
    ],
    "epsilon_ratio_of_product": [
        ("contributions", lambda: (_t(2, 3), _t(2, 3, device=OTHER), _t(2, 3), 0.1)),
        ("z", lambda: (_t(2, 3), _t(2, 3), _t(2, 3, device=OTHER), 0.1)),
    ],
}


@pytest.mark.parametrize("backend", ["compiled", "reference"])
@pytest.mark.parametrize(
    ("name", "argument", "make_args"),
    [
        pytest.param(name, argument, make_args, id=f"{name}-{argument}-{i}")
        for name, cases in MIXED_DEVICES.items()
        for i, (argument, make_args) in enumerate(cases)
    ],
)
def test_mixed_devices_raise_naming_the_argument(
    backend: str, name: str, argument: str, make_args
) -> None:
    args = make_args()
    before = [arg.clone() if isinstance(arg, Tensor) else arg for arg in args]
    with use_backend(backend), pytest.raises(ValueError, match=rf"^{argument}\b.*device"):
        getattr(ops, name)(*args)
    for arg, original in zip(args, before):
        if isinstance(arg, Tensor) and arg.device.type != "meta":
            assert_identical(arg, original)
