"""The kink_flips op (method="exact") against its twin: random operands of every dtype, the
boundary of the tolerance, opcheck, bad arguments naming the argument, and on CUDA."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

from fastattr import ops, use_backend
from fastattr.ops import reference

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
RANDOM = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def draw_operands(data: st.DataObject, device: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Switch values with exact zeros and values on the tolerance among them, tolerances
    (some zero), and segments' ends, some repeated or equal."""
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    points = data.draw(st.integers(1, 6), label="points")
    units = data.draw(st.integers(0, 9), label="units")
    segments = data.draw(st.integers(0, 8), label="segments")
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**32 - 1)))
    values = torch.randn(points, units, generator=generator, dtype=torch.float64)
    tolerance = torch.rand(points, generator=generator, dtype=torch.float64) * 0.5
    tolerance[torch.rand(points, generator=generator) < 0.3] = 0
    values[torch.rand(points, units, generator=generator) < 0.15] = 0
    on_band = torch.rand(points, units, generator=generator) < 0.15
    values[on_band] = tolerance.unsqueeze(1).expand_as(values)[on_band]
    values, tolerance = values.to(dtype), tolerance.to(dtype)
    ends_a = torch.randint(0, points, (segments,), generator=generator)
    ends_b = torch.randint(0, points, (segments,), generator=generator)
    return tuple(t.to(device) for t in (values, tolerance, ends_a, ends_b))  # type: ignore[return-value]


def flips_by_definition(values, tolerance, ends_a, ends_b) -> Tensor:
    """Element by element, in float64."""
    values, tolerance = values.double().cpu(), tolerance.double().cpu()
    result = torch.zeros(ends_a.numel(), values.shape[1], dtype=torch.bool)
    for p, (a, b) in enumerate(zip(ends_a.tolist(), ends_b.tolist())):
        for u in range(values.shape[1]):
            x, y = float(values[a, u]), float(values[b, u])
            ta, tb = float(tolerance[a]), float(tolerance[b])
            result[p, u] = (x > ta and y < -tb) or (x < -ta and y > tb)
    return result


@given(data=st.data())
@RANDOM
def test_twin_is_the_definition(data: st.DataObject) -> None:
    operands = draw_operands(data, "cpu")
    assert torch.equal(reference.kink_flips(*operands), flips_by_definition(*operands))


@given(data=st.data())
@RANDOM
def test_kernel_matches_twin(data: st.DataObject) -> None:
    operands = draw_operands(data, "cpu")
    with use_backend("compiled"):
        got = ops.kink_flips(*operands)
    assert got.dtype == torch.bool
    assert torch.equal(got, reference.kink_flips(*operands))


def test_kernel_takes_strided_values() -> None:
    values = torch.randn(8, 6, dtype=torch.float64)[::2].t().contiguous().t()
    tolerance = torch.full((4,), 0.1, dtype=torch.float64)[::1]
    ends_a, ends_b = torch.tensor([0, 1, 3]), torch.tensor([2, 3, 0])
    with use_backend("compiled"):
        got = ops.kink_flips(values, tolerance, ends_a, ends_b)
    assert torch.equal(got, reference.kink_flips(values, tolerance, ends_a, ends_b))


def test_opcheck() -> None:
    generator = torch.Generator().manual_seed(3)
    values = torch.randn(5, 7, generator=generator)
    for dtype in DTYPES:
        torch.library.opcheck(
            torch.ops.fastattr.kink_flips,
            (
                values.to(dtype),
                torch.full((5,), 0.2, dtype=dtype),
                torch.tensor([0, 4, 2]),
                torch.tensor([1, 1, 3]),
            ),
        )


def _good() -> list:
    return [torch.randn(3, 4), torch.zeros(3), torch.tensor([0, 1]), torch.tensor([2, 2])]


BAD = [
    (lambda: [torch.randn(3, 4).int(), *_good()[1:]], TypeError, "values"),
    (lambda: [torch.randn(3, 4, 1), torch.zeros(3), *_good()[2:]], ValueError, "values"),
    (lambda: [_good()[0], torch.zeros(4), *_good()[2:]], ValueError, "tolerance"),
    (lambda: [_good()[0], torch.zeros(3).double(), *_good()[2:]], TypeError, "tolerance"),
    (lambda: [*_good()[:2], torch.tensor([0, 1]).int(), _good()[3]], TypeError, "ends_a"),
    (lambda: [*_good()[:2], torch.tensor([[0, 1]]), torch.tensor([[0, 1]])], ValueError, "ends_a"),
    (lambda: [*_good()[:3], torch.tensor([0, 1, 2])], ValueError, "ends_a and ends_b"),
    (lambda: [*_good()[:2], torch.tensor([0, 3]), _good()[3]], IndexError, "ends_a"),
    (lambda: [*_good()[:3], torch.tensor([-1, 0])], IndexError, "ends_b"),
]


@pytest.mark.parametrize("backend", ["reference", "compiled"])
@pytest.mark.parametrize(("make_args", "error", "argument"), BAD)
def test_bad_arguments_raise_naming_the_argument(backend, make_args, error, argument) -> None:
    with use_backend(backend), pytest.raises(error, match=rf"^{argument}\b"):
        ops.kink_flips(*make_args())


@pytest.mark.parametrize(("make_args", "error", "argument"), BAD)
def test_kernel_called_directly_refuses_what_would_crash_it(make_args, error, argument) -> None:
    with pytest.raises(error, match=rf"^fastattr::kink_flips: {argument}\b"):
        torch.ops.fastattr.kink_flips(*make_args())


@pytest.mark.cuda
@given(data=st.data())
@RANDOM
def test_cuda_kernel_matches_twin(data: st.DataObject) -> None:
    operands = draw_operands(data, "cuda")
    with use_backend("compiled"):
        got = ops.kink_flips(*operands)
    assert got.device.type == "cuda"
    assert torch.equal(got.cpu(), reference.kink_flips(*(t.cpu() for t in operands)))
