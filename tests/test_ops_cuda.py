"""The CUDA kernels where only a GPU can test them: operands larger than a grid, the current
stream, the operands' device, opcheck, operands on mixed devices. Every test needs a GPU and is
skipped without one.

The random-operand comparisons with the twins on the GPU and with the CPU kernels are the
"cuda" cases of the *_matches_twin tests in tests/test_ops.py.
"""

from __future__ import annotations

import pytest
import torch
from test_ops import (
    _opcheck_samples,
    assert_identical,
    assert_raises_untouched,
    assert_row_sums_close,
)
from torch import Tensor

from fastattr.ops import reference

pytestmark = pytest.mark.cuda

DEVICE = "cuda"
# A second device for mixed-device calls.
OTHER = "cpu"


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
    rows = torch.arange(batch).repeat(steps).flip(0)
    alphas = torch.rand(steps * batch, generator=generator, dtype=torch.float64)
    path = torch.ops.fastattr.interpolate_points(inputs, baselines, rows, alphas)
    assert_identical(path, reference.interpolate_points(inputs, baselines, rows, alphas))

    accumulator, grads = randn(batch, row, kind=torch.float32), randn(steps * batch, row)
    expected = accumulator.clone()
    reference.accumulate_points(expected, grads, rows, alphas)
    torch.ops.fastattr.accumulate_points(accumulator, grads, rows, alphas)
    assert_identical(accumulator, expected)

    slopes = torch.ops.fastattr.point_slopes(grads, rows, inputs, baselines)
    terms = grads.double() * (inputs.double() - baselines.double()).index_select(0, rows.cuda())
    assert_row_sums_close(slopes, reference.point_slopes(grads, rows, inputs, baselines), terms)

    attributions, sums = torch.ops.fastattr.quadrature_finish(accumulator, inputs, baselines, True)
    want, want_sums = reference.quadrature_finish(accumulator, inputs, baselines, True)
    assert_identical(attributions, want)
    assert_row_sums_close(sums, want_sums, want)

    z = randn(batch, row)
    assert_identical(
        torch.ops.fastattr.epsilon_ratio(inputs, z, 1e-3),
        reference.epsilon_ratio(inputs, z, 1e-3),
    )
    assert_identical(
        torch.ops.fastattr.input_relevance(inputs, z), reference.input_relevance(inputs, z)
    )


def test_kernels_run_on_the_current_stream() -> None:
    generator = torch.Generator().manual_seed(7)
    inputs = torch.randn(64, 4096, generator=generator).to(DEVICE)
    rows = torch.arange(64).repeat(8)
    alphas = torch.rand(8 * 64, generator=generator, dtype=torch.float64)
    zero = torch.zeros((), device=DEVICE)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        path = torch.ops.fastattr.interpolate_points(inputs, zero, rows, alphas)
        accumulator = torch.zeros(64, 4096, device=DEVICE)
        torch.ops.fastattr.accumulate_points(accumulator, path, rows, alphas)
        attributions, _ = torch.ops.fastattr.quadrature_finish(accumulator, inputs, zero, True)
    side.synchronize()
    expected_path = reference.interpolate_points(inputs, zero, rows, alphas)
    assert_identical(path, expected_path)
    expected = torch.zeros(64, 4096, device=DEVICE)
    reference.accumulate_points(expected, expected_path, rows, alphas)
    assert_identical(attributions, reference.quadrature_finish(expected, inputs, zero, True)[0])


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs"
)
def test_kernels_run_on_the_operands_device() -> None:
    device = torch.device(DEVICE, 1)
    generator = torch.Generator().manual_seed(8)
    inputs = torch.randn(3, 5, generator=generator).to(device)
    baselines = torch.randn(5, generator=generator).to(device)
    rows = torch.tensor([2, 0, 1, 2])
    alphas = torch.rand(4, generator=generator, dtype=torch.float64)
    with torch.cuda.device(0):
        path = torch.ops.fastattr.interpolate_points(inputs, baselines, rows, alphas)
        relevance = torch.ops.fastattr.input_relevance(inputs, baselines.expand(3, 5))
    assert path.device == device and relevance.device == device
    assert_identical(path, reference.interpolate_points(inputs, baselines, rows, alphas))


@pytest.mark.parametrize(("name", "args"), _opcheck_samples())
def test_opcheck(name: str, args: tuple) -> None:
    on_device = tuple(arg.to(DEVICE) if isinstance(arg, Tensor) else arg for arg in args)
    torch.library.opcheck(getattr(torch.ops.fastattr, name), on_device)


def _t(*shape: int, device: str = DEVICE) -> Tensor:
    return torch.ones(shape, device=device)


def _a(*values: float, device: str = "cpu") -> Tensor:
    return torch.tensor(values, dtype=torch.float64, device=device)


def _r(*values: int, device: str = "cpu") -> Tensor:
    return torch.tensor(values, dtype=torch.int64, device=device)


# op: [(the argument the error names, the arguments)], one operand on the other device.
MIXED_DEVICES = {
    "interpolate_points": [
        ("baselines", lambda: (_t(2, 3), _t(3, device=OTHER), _r(0), _a(0.5))),
        ("baselines", lambda: (_t(2, 3, device=OTHER), _t(3), _r(0), _a(0.5, device=OTHER))),
        (
            "rows",
            lambda: (_t(2, 3, device=OTHER), _t(3, device=OTHER), _r(0, device=DEVICE), _a(0.5)),
        ),
        (
            "alphas",
            lambda: (_t(2, 3, device=OTHER), _t(3, device=OTHER), _r(0), _a(0.5, device=DEVICE)),
        ),
    ],
    "accumulate_points": [
        ("grads", lambda: (_t(2, 3), _t(1, 3, device=OTHER), _r(0), _a(0.5))),
        ("grads", lambda: (_t(2, 3, device=OTHER), _t(1, 3), _r(0), _a(0.5))),
        (
            "rows",
            lambda: (_t(2, 3, device=OTHER), _t(1, 3, device=OTHER), _r(0, device=DEVICE), _a(0.5)),
        ),
        (
            "weights",
            lambda: (_t(2, 3, device=OTHER), _t(1, 3, device=OTHER), _r(0), _a(0.5, device=DEVICE)),
        ),
    ],
    "point_slopes": [
        ("inputs", lambda: (_t(1, 3), _r(0), _t(2, 3, device=OTHER), _t(3))),
        ("baselines", lambda: (_t(1, 3), _r(0), _t(2, 3), _t(3, device=OTHER))),
        (
            "rows",
            lambda: (
                _t(1, 3, device=OTHER),
                _r(0, device=DEVICE),
                _t(2, 3, device=OTHER),
                _t(3, device=OTHER),
            ),
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
    "input_relevance": [
        ("contributions", lambda: (_t(2, 3), _t(2, 3, device=OTHER))),
        ("contributions", lambda: (_t(2, 3, device=OTHER), _t(2, 3))),
    ],
    "epsilon_ratio_of_product": [
        ("contributions", lambda: (_t(2, 3), _t(2, 3, device=OTHER), _t(2, 3), 0.1)),
        ("z", lambda: (_t(2, 3), _t(2, 3), _t(2, 3, device=OTHER), 0.1)),
    ],
}


MIXED_CASES = [
    pytest.param(name, argument, make_args, id=f"{name}-{argument}-{i}")
    for name, cases in MIXED_DEVICES.items()
    for i, (argument, make_args) in enumerate(cases)
]


@pytest.mark.parametrize("backend", ["compiled", "reference"])
@pytest.mark.parametrize(("name", "argument", "make_args"), MIXED_CASES)
def test_mixed_devices_raise_naming_the_argument(
    backend: str, name: str, argument: str, make_args
) -> None:
    assert_raises_untouched(backend, name, make_args(), ValueError, rf"^{argument}\b.*device")


@pytest.mark.parametrize(("name", "argument", "make_args"), MIXED_CASES)
def test_kernels_called_directly_refuse_mixed_devices(name: str, argument: str, make_args) -> None:
    match = rf"^fastattr::{name}: {argument}\b.*device"
    assert_raises_untouched(None, name, make_args(), ValueError, match)
