"""input_relevance, the op LRP's backward runs at each module's input, and
epsilon_ratio_of_product, which folds it into the previous module's ratio: compiled kernels
against their PyTorch twins, their argument checks, and their registration (opcheck); LRP's
autograd nodes against theirs."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from matrix_products import MatrixProducts  # tests/matrix_products.py

from fastattr import ops, use_backend
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


ELEMENTWISE = {
    "input_relevance": lambda a, b, c: (a, b),
    "relevance_share": lambda a, b, c: (a, b, 0.25),
    "epsilon_ratio": lambda a, b, c: (a, b, 1e-3),
    "epsilon_ratio_of_product": lambda a, b, c: (a, b, c, 1e-3),
}


def _heads(generator: torch.Generator) -> torch.Tensor:
    # Attention's query as the model holds it: (batch, tokens, heads, width) seen as
    # (batch, heads, tokens, width).
    return torch.randn(2, 5, 3, 4, generator=generator).transpose(1, 2)


@pytest.mark.parametrize("name", sorted(ELEMENTWISE))
@pytest.mark.parametrize("others", ["same", "contiguous", "sliced"])
def test_elementwise_ops_read_a_dense_leading_operand_where_it_lies(name: str, others: str) -> None:
    """The leading operand is read in its own dense layout (a permuted view is not copied) and
    the output takes that layout; the others are brought to it, whatever theirs. The fake
    kernel gives the same layout."""
    generator = torch.Generator().manual_seed(11)
    first = _heads(generator)
    rest = [_heads(generator) for _ in range(2)]
    if others == "contiguous":
        rest = [t.contiguous() for t in rest]
    elif others == "sliced":
        rest = [torch.randn(2, 3, 5, 8, generator=generator)[..., ::2] for _ in range(2)]
    args = ELEMENTWISE[name](first, *rest)
    result = getattr(torch.ops.fastattr, name)(*args)
    expected = getattr(ops.reference, name)(*args)
    assert result.stride() == first.stride()
    torch.testing.assert_close(result, expected, rtol=0, atol=0)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        assert getattr(torch.ops.fastattr, name)(*fake).stride() == result.stride()


@pytest.mark.parametrize("name", sorted(ELEMENTWISE))
def test_elementwise_ops_lay_out_a_leading_operand_that_is_not_dense(name: str) -> None:
    generator = torch.Generator().manual_seed(12)
    tensors = [torch.randn(3, 4, 10, generator=generator) for _ in range(3)]
    first = tensors[0][..., ::2]  # strided: not dense
    args = ELEMENTWISE[name](first, *(t[..., :5] for t in tensors[1:]))
    result = getattr(torch.ops.fastattr, name)(*args)
    assert result.stride() == torch.empty_like(first).stride() == (20, 5, 1)
    torch.testing.assert_close(result, getattr(ops.reference, name)(*args), rtol=0, atol=0)


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


def test_kernels_called_directly_refuse_what_would_crash_them() -> None:
    a = torch.randn(3, 4)
    ratio = torch.ops.fastattr.epsilon_ratio_of_product
    with pytest.raises(TypeError, match=r"^fastattr::epsilon_ratio_of_product: activations\b"):
        ratio(a.long(), a.long(), a.long(), 0.1)
    with pytest.raises(TypeError, match=r"^fastattr::epsilon_ratio_of_product: z\b"):
        ratio(a, a, a.double(), 0.1)
    with pytest.raises(ValueError, match=r"^fastattr::epsilon_ratio_of_product: z\b"):
        ratio(a, a, torch.randn(4, 3), 0.1)
    with pytest.raises(ValueError, match=r"^fastattr::input_relevance: contributions\b"):
        _compiled(a, torch.randn(4, 3))


# LRP's autograd nodes (csrc/lrp_nodes.cpp) against their twins in fastattr.ops.reference.

# name -> (call with the tensor receiving relevance first, the other operand second, epsilon)
NODES = {
    "lrp_product_node": lambda op, first, second, eps: op(first),
    "lrp_product_ratio_node": lambda op, first, second, eps: op(first, second, eps),
    "lrp_ratio_node": lambda op, first, second, eps: op(first, eps),
    "lrp_ratio_shown_node": lambda op, first, second, eps: op(first, second, eps),
    "lrp_pass_node": lambda op, first, second, eps: op(first, second),
}
# The input each node's output is a view of.
SHOWN = {
    "lrp_product_node": 0,
    "lrp_product_ratio_node": 1,
    "lrp_ratio_node": 0,
    "lrp_ratio_shown_node": 1,
    "lrp_pass_node": 1,
}


def _grads_through(call, first: torch.Tensor, second: torch.Tensor, upstream, eps: float):
    output = call(first, second, eps)
    return (output.detach().clone(), *torch.autograd.grad(output, first, upstream))


@settings(max_examples=30, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    name=st.sampled_from(sorted(NODES)),
    epsilon=st.sampled_from([0.0, 1e-3, 0.25]),
    seed=st.integers(0, 2**16),
)
def test_nodes_match_twins(
    shape: list[int], dtype: torch.dtype, name: str, epsilon: float, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    first = torch.randn(shape, generator=generator, dtype=dtype).requires_grad_()
    second = torch.randn(shape, generator=generator, dtype=dtype)
    upstream = torch.randn(shape, generator=generator, dtype=dtype)
    first.data[(0,) * len(shape)] = 0.0  # sign(0) = +1 in the ratio
    compiled = getattr(torch.ops.fastattr, name).default
    twin = getattr(ops.reference, name)
    results = _grads_through(partial(NODES[name], compiled), first, second, upstream, epsilon)
    expected = _grads_through(partial(NODES[name], twin), first, second, upstream, epsilon)
    for result, reference_result in zip(results, expected):
        torch.testing.assert_close(result, reference_result, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["compiled", "reference"])
@pytest.mark.parametrize("name", sorted(NODES))
def test_nodes_return_views_that_refuse_in_place_changes(backend: str, name: str) -> None:
    # What the schemas declare: the output aliases one input (and so is a view of it, sharing
    # its version counter); autograd refuses to let the model write into it, which would
    # change what the node saved.
    first = torch.randn(3, 4, requires_grad=True)
    second = torch.randn(3, 4)
    with use_backend(backend):
        output = NODES[name](getattr(ops, name), first, second, 1e-9)
    shown = (first, second)[SHOWN[name]]
    assert output._base is shown
    assert torch.equal(output, shown) and output.data_ptr() == shown.data_ptr()
    with pytest.raises(RuntimeError, match="custom Function"):
        output.add_(1.0)


@pytest.mark.parametrize("backend", ["compiled", "reference"])
@pytest.mark.parametrize("epsilon", [-1e-9, float("nan"), float("inf")])
@pytest.mark.parametrize(
    "name", ["lrp_product_ratio_node", "lrp_ratio_node", "lrp_ratio_shown_node"]
)
def test_nodes_refuse_a_bad_epsilon_when_made(backend: str, epsilon: float, name: str) -> None:
    first = torch.randn(3, 4, requires_grad=True)
    with use_backend(backend), pytest.raises(ValueError, match=r"^epsilon\b"):
        NODES[name](getattr(ops, name), first, torch.randn(3, 4), epsilon)


@pytest.mark.parametrize("name", sorted(NODES))
def test_nodes_under_inference_mode_are_views(name: str) -> None:
    first, second = torch.randn(2, 3), torch.randn(2, 3)
    shown = (first, second)[SHOWN[name]]
    with torch.inference_mode():
        output = NODES[name](getattr(torch.ops.fastattr, name).default, first, second, 1e-9)
        assert output.data_ptr() == shown.data_ptr() and torch.equal(output, shown)


OPCHECKED = {
    "epsilon_ratio": lambda a, b, c: (a, b, 1e-6),
    "epsilon_ratio_of_product": lambda a, b, c: (a, b, c, 0.25),
    "input_relevance": lambda a, b, c: (a, b),
}


@pytest.mark.parametrize("name", sorted([*OPCHECKED, *NODES]))
def test_opcheck_every_lrp_op(name: str) -> None:
    generator = torch.Generator().manual_seed(5)
    for dtype in (torch.float32, torch.float64):
        a, b, c = (torch.randn(3, 5, generator=generator, dtype=dtype) for _ in range(3))
        op = getattr(torch.ops.fastattr, name).default
        if name in OPCHECKED:
            torch.library.opcheck(op, OPCHECKED[name](a, b, c))
            continue
        args = {
            "lrp_product_node": (a.requires_grad_(),),
            "lrp_ratio_node": (a.requires_grad_(), 1e-6),
            "lrp_pass_node": (a.requires_grad_(), b),
        }.get(name, (a.requires_grad_(), b, 1e-6))
        # torch's functionalization (test_aot_dispatch_*) does not take custom ops whose
        # outputs alias an input; the schema, autograd registration and fake tensor checks do.
        torch.library.opcheck(
            op,
            args,
            test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
        )


def test_every_registered_op_is_checked_here_or_in_test_ops() -> None:
    registered = {
        name.split("::", 1)[1]
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith("fastattr::")
    }
    from test_attention_ops import ATTENTION_OPS

    # opchecked in tests/test_ops.py and tests/test_kink_flips.py
    path_ops = {
        "interpolate_points",
        "accumulate_points",
        "point_slopes",
        "quadrature_finish",
        "kink_flips",
    }
    assert registered == path_ops | set(OPCHECKED) | set(NODES) | ATTENTION_OPS | {LINEAR}


# lrp_linear_node: a linear layer's backward that multiplies only the rows with relevance.
LINEAR = "lrp_linear_node"


def _linear_operands(leading, features, dtype, generator):
    x = torch.randn(*leading, features[0], generator=generator, dtype=dtype).requires_grad_()
    weight = torch.randn(features[1], features[0], generator=generator, dtype=dtype)
    return x, weight, (x @ weight.T).detach()


@settings(max_examples=40, deadline=None)
@given(
    leading=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    features=st.tuples(st.integers(1, 6), st.integers(1, 6)),
    live=st.floats(0.0, 1.0),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_the_linear_node_matches_its_twin_whichever_rows_carry_relevance(
    leading: list[int], features: tuple[int, int], live: float, dtype: torch.dtype, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    x, weight, shown = _linear_operands(leading, features, dtype, generator)
    contribution = torch.randn(shown.shape, generator=generator, dtype=dtype)
    keep = torch.rand(shown.shape[:-1], generator=generator) < live
    contribution = contribution * keep.unsqueeze(-1)
    contribution.view(-1, shown.shape[-1])[0, 0] = 0.0  # a live row may start with a zero
    results = []
    for node in (ops.lrp_linear_node, ops.reference.lrp_linear_node):
        output = node(x, weight, shown)
        assert output._base is shown and torch.equal(output, shown)
        results.append(torch.autograd.grad(output, x, contribution)[0])
    torch.testing.assert_close(results[0], results[1])
    torch.testing.assert_close(results[0], contribution @ weight)
    assert torch.equal(results[0][~keep], torch.zeros_like(results[0][~keep]))


@pytest.mark.parametrize("live_rows", [0, 1, 3, 4, 5, 8])
def test_the_linear_node_multiplies_the_live_rows_alone_when_at_most_half_are(
    live_rows: int,
) -> None:
    generator = torch.Generator().manual_seed(0)
    x, weight, shown = _linear_operands([2, 4], (3, 5), torch.float64, generator)
    contribution = torch.zeros(2, 4, 5, dtype=torch.float64)
    rows = torch.randperm(8, generator=generator)[:live_rows]
    contribution.view(8, 5)[rows] = torch.randn(live_rows, 5, generator=generator).double()
    output = ops.lrp_linear_node(x, weight, shown)
    with MatrixProducts() as seen:
        (result,) = torch.autograd.grad(output, x, contribution)
    multiplied = live_rows if 2 * live_rows <= 8 else 8
    assert seen.shapes == [((multiplied, 5), (5, 3))]
    torch.testing.assert_close(result, contribution @ weight, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", ["compiled", "reference"])
def test_the_linear_node_refuses_what_does_not_fit(backend: str) -> None:
    x = torch.randn(2, 3, 4, requires_grad=True)
    weight, shown = torch.randn(5, 4), torch.randn(2, 3, 5)
    node = ops.lrp_linear_node if backend == "compiled" else ops.reference.lrp_linear_node
    with use_backend(backend):
        with pytest.raises(ValueError, match=r"^weight must be \(out_features, in_features\)"):
            node(x, weight.T, shown)
        with pytest.raises(ValueError, match=r"^shown must have the shape \[2, 3, 5\]"):
            node(x, weight, shown[:, :2])
        with pytest.raises(TypeError, match=r"^weight must have the dtype of x"):
            node(x, weight.double(), shown)
        with pytest.raises(TypeError, match=r"^x must be a floating point tensor"):
            node(x.detach().long(), weight, shown)


def test_the_linear_node_is_a_view_that_refuses_in_place_changes_and_passes_opcheck() -> None:
    generator = torch.Generator().manual_seed(3)
    op = torch.ops.fastattr.lrp_linear_node.default
    for dtype in (torch.float32, torch.float64):
        x, weight, shown = _linear_operands([2, 3], (4, 5), dtype, generator)
        torch.library.opcheck(
            op,
            (x, weight, shown),
            test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
        )
        output = op(x, weight, shown)
        with pytest.raises(RuntimeError, match="custom Function"):
            output.add_(1.0)
    with torch.inference_mode():
        output = op(x.detach(), weight, shown)
        assert output.data_ptr() == shown.data_ptr() and torch.equal(output, shown)
