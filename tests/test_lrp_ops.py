"""input_relevance, the op LRP's backward runs at each module's input, and
epsilon_ratio_of_product, which folds it into the previous module's ratio: compiled kernels
against their PyTorch twins, their argument checks, and their registration (opcheck); LRP's
autograd nodes against theirs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastattr import ops
from fastattr._backend import is_compiled

pytestmark = pytest.mark.skipif(not is_compiled(), reason="fastattr._C is not built")

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _compiled(activations: torch.Tensor, contributions: torch.Tensor) -> torch.Tensor:
    return torch.ops.fastattr.input_relevance(activations, contributions)


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    dtype=st.sampled_from(DTYPES),
    transposed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_twin(shape: list[int], dtype: torch.dtype, transposed: bool, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    activations = torch.randn(shape, generator=generator).to(dtype)
    contributions = torch.randn(shape, generator=generator).to(dtype)
    if transposed and len(shape) > 1:
        # Non-contiguous operands: the kernel lays them out itself.
        activations = activations.mT.contiguous().mT
        contributions = contributions.mT.contiguous().mT
    result = _compiled(activations, contributions)
    expected = ops.reference.input_relevance(activations, contributions)
    assert result.dtype == dtype and result.shape == activations.shape
    torch.testing.assert_close(result, expected, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["channels_last", "channels_last_3d"])
def test_channels_last(layout: str) -> None:
    shape, fmt = {
        "channels_last": ((2, 3, 4, 5), torch.channels_last),
        "channels_last_3d": ((2, 3, 2, 4, 5), torch.channels_last_3d),
    }[layout]
    activations = torch.randn(shape).contiguous(memory_format=fmt)
    contributions = torch.randn(shape)
    result = _compiled(activations, contributions)
    assert result.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(result, activations * contributions, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["compiled", "reference"])
def test_bad_arguments(backend: str) -> None:
    from fastattr import use_backend

    a = torch.randn(3, 4)
    with use_backend(backend):
        with pytest.raises(TypeError, match="activations"):
            ops.input_relevance(a.long(), a.long())
        with pytest.raises(TypeError, match="contributions"):
            ops.input_relevance(a, a.double())
        with pytest.raises(ValueError, match="contributions"):
            ops.input_relevance(a, torch.randn(4, 3))


def test_opcheck() -> None:
    for dtype in (torch.float32, torch.float64):
        args = (torch.randn(3, 5, dtype=dtype), torch.randn(3, 5, dtype=dtype))
        torch.library.opcheck(torch.ops.fastattr.input_relevance.default, args)


@pytest.mark.cuda
def test_cuda_matches_twin() -> None:
    for dtype in DTYPES:
        activations = torch.randn(7, 33, dtype=dtype, device="cuda")
        contributions = torch.randn(7, 33, dtype=dtype, device="cuda")
        expected = ops.reference.input_relevance(activations.cpu(), contributions.cpu())
        result = _compiled(activations, contributions).cpu()
        torch.testing.assert_close(result, expected, rtol=0, atol=0)


def _ratio_of_product(a: torch.Tensor, c: torch.Tensor, z: torch.Tensor, eps: float):
    return torch.ops.fastattr.epsilon_ratio_of_product(a, c, z, eps)


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    dtype=st.sampled_from(DTYPES),
    transposed=st.booleans(),
    epsilon=st.sampled_from([0.0, 1e-9, 0.25]),
    seed=st.integers(0, 2**16),
)
def test_ratio_of_product_matches_twin(
    shape: list[int], dtype: torch.dtype, transposed: bool, epsilon: float, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    a, c, z = (torch.randn(shape, generator=generator).to(dtype) for _ in range(3))
    z[(0,) * len(shape)] = 0.0  # sign(0) = +1
    if transposed and len(shape) > 1:
        a, z = a.mT.contiguous().mT, z.mT.contiguous().mT
    result = _ratio_of_product(a, c, z, epsilon)
    expected = ops.reference.epsilon_ratio_of_product(a, c, z, epsilon)
    assert result.dtype == dtype and result.shape == a.shape
    torch.testing.assert_close(result, expected, rtol=0, atol=0)
    # Exactly the two ops it replaces, one after the other.
    unfused = ops.reference.epsilon_ratio(ops.reference.input_relevance(a, c), z, epsilon)
    torch.testing.assert_close(result, unfused, rtol=0, atol=0)


def test_ratio_of_product_channels_last() -> None:
    a = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    c, z = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    result = _ratio_of_product(a, c, z, 0.1)
    assert result.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(
        result, ops.reference.epsilon_ratio_of_product(a, c, z, 0.1), rtol=0, atol=0
    )


@pytest.mark.parametrize("backend", ["compiled", "reference"])
def test_ratio_of_product_bad_arguments(backend: str) -> None:
    from fastattr import use_backend

    a = torch.randn(3, 4)
    with use_backend(backend):
        with pytest.raises(ValueError, match="epsilon"):
            ops.epsilon_ratio_of_product(a, a, a, -1.0)
        with pytest.raises(TypeError, match="activations"):
            ops.epsilon_ratio_of_product(a.long(), a.long(), a.long(), 0.1)
        with pytest.raises(TypeError, match="z"):
            ops.epsilon_ratio_of_product(a, a, a.double(), 0.1)
        with pytest.raises(ValueError, match="z"):
            ops.epsilon_ratio_of_product(a, a, torch.randn(4, 3), 0.1)


# LRP's autograd nodes (csrc/lrp_nodes.cpp) against their twins in fastattr.ops.reference.


def _grads_through(node, inputs: tuple, upstream: torch.Tensor) -> tuple:
    output = node(*inputs)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return (output.detach().clone(), *torch.autograd.grad(output, leaves, upstream))


@settings(max_examples=30, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    node=st.sampled_from(["product", "ratio", "ratio_shown", "pass", "product_ratio"]),
    copy=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_nodes_match_twins(
    shape: list[int], dtype: torch.dtype, node: str, copy: bool, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    first = torch.randn(shape, generator=generator, dtype=dtype).requires_grad_()
    second = torch.randn(shape, generator=generator, dtype=dtype)
    upstream = torch.randn(shape, generator=generator, dtype=dtype)
    first.data[(0,) * len(shape)] = 0.0  # sign(0) = +1 in the ratio
    compiled, twin = {
        "product": (
            lambda a: torch.ops.fastattr.lrp_product_node(a),
            lambda a: ops.reference.lrp_product_node(a),
        ),
        "ratio": (
            lambda z: torch.ops.fastattr.lrp_ratio_node(z, None, 1e-3, copy),
            lambda z: ops.reference.lrp_ratio_node(z, None, 1e-3, copy),
        ),
        "ratio_shown": (
            lambda z: torch.ops.fastattr.lrp_ratio_node(z, second, 0.0, copy),
            lambda z: ops.reference.lrp_ratio_node(z, second, 0.0, copy),
        ),
        "pass": (
            lambda s: torch.ops.fastattr.lrp_pass_node(s, second, copy),
            lambda s: ops.reference.lrp_pass_node(s, second, copy),
        ),
        "product_ratio": (
            lambda z: torch.ops.fastattr.lrp_product_ratio_node(z, second, 1e-3),
            lambda z: ops.reference.lrp_product_ratio_node(z, second, 1e-3),
        ),
    }[node]
    results = _grads_through(compiled, (first,), upstream)
    expected = _grads_through(twin, (first,), upstream)
    for result, reference_result in zip(results, expected):
        torch.testing.assert_close(result, reference_result, rtol=0, atol=0)


@pytest.mark.parametrize("copy", [False, True])
def test_nodes_alias_their_input_unless_copying(copy: bool) -> None:
    z = torch.randn(3, 4, requires_grad=True)
    shown = torch.randn(3, 4)
    outputs = [
        (torch.ops.fastattr.lrp_ratio_node(z, None, 1e-9, copy), z),
        (torch.ops.fastattr.lrp_ratio_node(z, shown, 1e-9, copy), shown),
        (torch.ops.fastattr.lrp_pass_node(z, shown, copy), shown),
    ]
    for output, source in outputs:
        assert (output.data_ptr() == source.data_ptr()) != copy
        assert torch.equal(output, source)
    assert torch.ops.fastattr.lrp_product_node(z).data_ptr() == z.data_ptr()
    assert torch.ops.fastattr.lrp_product_ratio_node(z, shown, 1e-9).data_ptr() == shown.data_ptr()


def test_nodes_under_inference_mode_are_identities() -> None:
    z, shown = torch.randn(2, 3), torch.randn(2, 3)
    with torch.inference_mode():
        assert torch.equal(torch.ops.fastattr.lrp_product_node(z), z)
        assert torch.equal(torch.ops.fastattr.lrp_ratio_node(z, shown, 1e-9, False), shown)
        assert torch.equal(torch.ops.fastattr.lrp_pass_node(z, shown, True), shown)
        assert torch.equal(torch.ops.fastattr.lrp_product_ratio_node(z, shown, 1e-9), shown)
