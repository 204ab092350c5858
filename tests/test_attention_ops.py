"""The transformer rules' ops (softmax_relevance, softmax_contribution, layer_norm_relevance,
relevance_share) and
their autograd nodes: compiled kernels against their PyTorch twins on fresh random operands,
the twins against the rules written out with autograd, argument checks, and registration
(opcheck)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastattr import ops, use_backend
from fastattr._backend import is_compiled

pytestmark = pytest.mark.skipif(not is_compiled(), reason="fastattr._C is not built")

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
# Row sums run in double in both, in different orders: they agree to the last bits of the
# dtype the sum is rounded to (exactly, except for float64).
SUM_TOLERANCE = {torch.float64: {"rtol": 1e-12, "atol": 1e-300}}


def _close(result: torch.Tensor, expected: torch.Tensor, atol: float = 1e-300) -> None:
    assert result.dtype == expected.dtype and result.shape == expected.shape
    tolerance = SUM_TOLERANCE.get(result.dtype, {"rtol": 0, "atol": 0})
    if result.dtype == torch.float64:
        tolerance = {**tolerance, "atol": atol}
    torch.testing.assert_close(result, expected, **tolerance)


def _randn(shape: list[int], generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(1, 7), min_size=1, max_size=4),
    dtype=st.sampled_from(DTYPES),
    dim_seed=st.integers(0, 16),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_softmax_relevance_matches_twin(
    shape: list[int], dtype: torch.dtype, dim_seed: int, masked: bool, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    dim = dim_seed % len(shape) - (len(shape) if dim_seed % 2 else 0)
    inputs = _randn(shape, generator, dtype)
    if masked:
        inputs[(0,) * len(shape)] = float("-inf")
    probs = torch.softmax(inputs.double(), dim).to(dtype)
    relevance = _randn(shape, generator, dtype)
    result = torch.ops.fastattr.softmax_relevance(inputs, probs, relevance, dim)
    _close(result, ops.reference.softmax_relevance(inputs, probs, relevance, dim))
    assert result.is_contiguous() and torch.isfinite(result).all()


def test_softmax_relevance_is_the_rule() -> None:
    """x * J^T (R / s): the input times the gradient of the softmax weighted by R / s."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(3, 4, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    relevance = torch.randn(3, 4, 6, generator=generator, dtype=torch.float64)
    probs = torch.softmax(inputs, 1)
    (gradient,) = torch.autograd.grad(probs, inputs, relevance / probs.detach())
    expected = inputs.detach() * gradient
    for backend in ("compiled", "reference"):
        with use_backend(backend):
            result = ops.softmax_relevance(inputs.detach(), probs.detach(), relevance, 1)
        torch.testing.assert_close(result, expected, rtol=1e-12, atol=1e-14)


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(1, 7), min_size=1, max_size=4),
    dtype=st.sampled_from(DTYPES),
    dim_seed=st.integers(0, 16),
    scale=st.sampled_from([1.0, 0.125, -0.3, 1 / 3]),
    seed=st.integers(0, 2**16),
)
def test_softmax_contribution_matches_twin(
    shape: list[int], dtype: torch.dtype, dim_seed: int, scale: float, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    dim = dim_seed % len(shape) - (len(shape) if dim_seed % 2 else 0)
    probs = torch.softmax(_randn(shape, generator, torch.float64), dim).to(dtype)
    relevance = _randn(shape, generator, dtype)
    result = torch.ops.fastattr.softmax_contribution(probs, relevance, dim, scale)
    _close(result, ops.reference.softmax_contribution(probs, relevance, dim, scale))
    assert result.is_contiguous()


@pytest.mark.parametrize("mask_value", [float("-inf"), torch.finfo(torch.float64).min])
def test_softmax_contribution_is_the_rule_divided_by_the_scores(mask_value: float) -> None:
    """Where the softmax reads scale * z plus a mask, the softmax rule's relevance divided by z
    (the ratio at the scores, unstabilized): scale * (R - s * sum(R)) where the mask is zero,
    and zero where it masks, as the rule's relevance is there."""
    generator = torch.Generator().manual_seed(3)
    z = torch.randn(3, 4, 6, generator=generator, dtype=torch.float64)
    mask = torch.zeros(3, 1, 6, dtype=torch.float64)
    mask[:, :, 4:] = mask_value
    inputs = 0.125 * z + mask
    probs = torch.softmax(inputs, -1)
    # The relevance at a softmax's output is its output times a contribution (AttnLRP's rules),
    # so zero where it masks.
    relevance = probs * torch.randn(3, 4, 6, generator=generator, dtype=torch.float64)
    expected = ops.reference.softmax_relevance(inputs, probs, relevance, -1) / z
    for backend in ("compiled", "reference"):
        with use_backend(backend):
            result = ops.softmax_contribution(probs, relevance, -1, 0.125)
        torch.testing.assert_close(result, expected, rtol=1e-12, atol=1e-300)
    assert (expected[..., 4:] == 0).all() and (expected[..., :4] != 0).all()


def _layer_norm_operands(shape: list[int], row_dims: int, dtype: torch.dtype, seed: int):
    generator = torch.Generator().manual_seed(seed)
    inputs, relevance = _randn(shape, generator, dtype), _randn(shape, generator, dtype)
    normalized = shape[len(shape) - row_dims :]
    weight, bias = _randn(normalized, generator, dtype), _randn(normalized, generator, dtype)
    outputs, _, rstd = torch.native_layer_norm(
        inputs.double(), normalized, weight.double(), bias.double(), 1e-5
    )
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    return inputs, relevance, outputs.to(dtype), rstd.to(opmath), weight, bias, normalized


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    row_dims_seed=st.integers(0, 8),
    dtype=st.sampled_from(DTYPES),
    weighted=st.booleans(),
    epsilon=st.sampled_from([0.0, 1e-9, 0.25]),
    seed=st.integers(0, 2**16),
)
def test_layer_norm_relevance_matches_twin(
    shape: list[int],
    row_dims_seed: int,
    dtype: torch.dtype,
    weighted: bool,
    epsilon: float,
    seed: int,
) -> None:
    row_dims = 1 + row_dims_seed % len(shape)
    inputs, relevance, outputs, rstd, weight, _, _ = _layer_norm_operands(
        shape, row_dims, dtype, seed
    )
    weight = weight if weighted else None
    result = torch.ops.fastattr.layer_norm_relevance(
        inputs, relevance, outputs, rstd, weight, epsilon
    )
    # v - mean(v) cancels where v is near its row's mean: the two row sums' last-bit difference
    # in the mean (at most a few units of rounding of max |v|) reaches the result times x * rstd.
    v_bound = (relevance.double().abs() / outputs.double().abs().clamp_min(1e-300)).max()
    if weight is not None:
        v_bound = v_bound * weight.double().abs().max()
    atol = 4 * 2.0**-52 * float(v_bound * (inputs.double().abs().max() * rstd.double().max()))
    _close(
        result,
        ops.reference.layer_norm_relevance(inputs, relevance, outputs, rstd, weight, epsilon),
        atol,
    )


def test_layer_norm_relevance_is_the_rule() -> None:
    """x * J^T (R / y) for layer norm with its standard deviation detached (lxt's formulation),
    on rows over the last two dimensions."""
    inputs, relevance, outputs, rstd, weight, bias, _ = _layer_norm_operands(
        [3, 4, 5, 6], 2, torch.float64, 0
    )
    x = inputs.clone().requires_grad_()
    dims = (-2, -1)
    mean = x.mean(dims, keepdim=True)
    std = ((x - mean) ** 2).mean(dims, keepdim=True).add(1e-5).sqrt().detach()
    y = (x - mean) / std * weight + bias
    torch.testing.assert_close(y.detach(), outputs, rtol=1e-13, atol=1e-13)
    (gradient,) = torch.autograd.grad(y, x, relevance / y.detach())
    expected = inputs * gradient
    for backend in ("compiled", "reference"):
        with use_backend(backend):
            result = ops.layer_norm_relevance(inputs, relevance, outputs, rstd, weight, 0.0)
        torch.testing.assert_close(result, expected, rtol=1e-11, atol=1e-13)


@settings(max_examples=30, deadline=None)
@given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    dtype=st.sampled_from(DTYPES),
    share=st.sampled_from([0.25, 0.5, 1.0, 1 / 3]),
    transposed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_relevance_share_matches_twin(
    shape: list[int], dtype: torch.dtype, share: float, transposed: bool, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    activations = _randn(shape, generator, dtype)
    contributions = _randn(shape, generator, dtype)
    if transposed and len(shape) > 1:
        activations = activations.mT.contiguous().mT
    result = torch.ops.fastattr.relevance_share(activations, contributions, share)
    expected = ops.reference.relevance_share(activations, contributions, share)
    torch.testing.assert_close(result, expected, rtol=0, atol=0)


def _x() -> torch.Tensor:
    return torch.randn(3, 4)


def _rstd() -> torch.Tensor:
    return torch.rand(3, 1)


# (op, exception, the argument its message names, the arguments): faults the kernels guard
# against too
GUARDED = [
    ("softmax_relevance", TypeError, "inputs", lambda x: (x.long(), x.long(), x.long(), -1)),
    ("softmax_relevance", TypeError, "probs", lambda x: (x, x.double(), x, -1)),
    ("softmax_relevance", ValueError, "relevance", lambda x: (x, x, torch.randn(4, 3), -1)),
    ("softmax_relevance", ValueError, "dim", lambda x: (x, x, x, 2)),
    ("layer_norm_relevance", TypeError, "rstd", lambda x: (x, x, x, _rstd().double(), None, 0.0)),
    ("layer_norm_relevance", ValueError, "rstd", lambda x: (x, x, x, torch.rand(4, 1), None, 0.0)),
    ("layer_norm_relevance", ValueError, "weight", lambda x: (x, x, x, _rstd(), _x()[0, :3], 0.0)),
    (
        "layer_norm_relevance",
        ValueError,
        "outputs",
        lambda x: (x, x, _x()[:, :3], _rstd(), None, 0.0),
    ),
    ("relevance_share", TypeError, "contributions", lambda x: (x, x.double(), 0.5)),
    ("softmax_contribution", TypeError, "probs", lambda x: (x.long(), x.long(), -1, 1.0)),
    ("softmax_contribution", TypeError, "relevance", lambda x: (x, x.double(), -1, 1.0)),
    ("softmax_contribution", ValueError, "relevance", lambda x: (x, x.mT, -1, 1.0)),
    ("softmax_contribution", ValueError, "dim", lambda x: (x, x, -3, 1.0)),
]
# Faults no kernel can crash on, which only fastattr.ops checks
HARMLESS = [
    ("layer_norm_relevance", ValueError, "epsilon", lambda x: (x, x, x, _rstd(), None, -1.0)),
    ("relevance_share", ValueError, "share", lambda x: (x, x, 0.0)),
    ("softmax_contribution", ValueError, "scale", lambda x: (x, x, -1, float("inf"))),
]


@pytest.mark.parametrize("backend", ["compiled", "reference"])
@pytest.mark.parametrize(("name", "error", "argument", "make_args"), GUARDED + HARMLESS)
def test_bad_arguments(backend: str, name: str, error, argument: str, make_args) -> None:
    with use_backend(backend), pytest.raises(error, match=rf"^{argument}\b"):
        getattr(ops, name)(*make_args(_x()))


@pytest.mark.parametrize(("name", "error", "argument", "make_args"), GUARDED)
def test_kernels_called_directly_refuse_what_would_crash_them(
    name: str, error, argument: str, make_args
) -> None:
    with pytest.raises(error, match=rf"^fastattr::{name}: {argument}\b"):
        getattr(torch.ops.fastattr, name)(*make_args(_x()))


@pytest.mark.parametrize(("name", "error", "argument", "make_args"), HARMLESS)
def test_kernels_called_directly_leave_harmless_faults_to_fastattr_ops(
    name: str, error, argument: str, make_args
) -> None:
    assert isinstance(getattr(torch.ops.fastattr, name)(*make_args(_x())), torch.Tensor)


# Every op this file checks with opcheck (tests/test_lrp_ops.py checks that none is missed).
ATTENTION_OPS = {
    "softmax_relevance",
    "layer_norm_relevance",
    "relevance_share",
    "lrp_share_node",
    "lrp_uniform_matmul_node",
    "lrp_uniform_product_node",
    "lrp_softmax_node",
    "lrp_layer_norm_node",
    "softmax_contribution",
    "lrp_softmax_ratio_node",
}


def test_opcheck() -> None:
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(2, 3, 5, dtype=dtype)
        probs = torch.softmax(x, 1)
        torch.library.opcheck(torch.ops.fastattr.softmax_relevance.default, (x, probs, x, 1))
        torch.library.opcheck(torch.ops.fastattr.softmax_relevance.default, (x, probs, x, -1))
        outputs, _, rstd = torch.native_layer_norm(x, [5], None, None, 1e-5)
        weight = torch.randn(5, dtype=dtype)
        layer_norm = torch.ops.fastattr.layer_norm_relevance.default
        torch.library.opcheck(layer_norm, (x, x, outputs, rstd, weight, 1e-9))
        torch.library.opcheck(layer_norm, (x, x, outputs, rstd, None, 0.0))
        torch.library.opcheck(torch.ops.fastattr.relevance_share.default, (x, x, 0.5))
        contribution = torch.ops.fastattr.softmax_contribution.default
        torch.library.opcheck(contribution, (probs, x, 1, 0.125))
        torch.library.opcheck(contribution, (probs, x, -1, 1.0))
        # The nodes; functionalization (test_aot_dispatch_*) does not take an output aliasing
        # an input (lrp_share_node), as for LRP's other nodes.
        leaf = x.clone().requires_grad_()
        checks = ("test_schema", "test_autograd_registration", "test_faketensor")
        for name, args in (
            ("lrp_share_node", (leaf, 0.5)),
            ("lrp_uniform_matmul_node", (leaf, leaf.mT)),
            ("lrp_uniform_product_node", (leaf, leaf[:, :1])),
            ("lrp_softmax_node", (leaf, 1, None)),
            ("lrp_softmax_ratio_node", (leaf, 0.5 * x, 1, None, 0.5)),
            ("lrp_layer_norm_node", (leaf, [5], weight, None, 1e-5, 1e-9)),
        ):
            node = getattr(torch.ops.fastattr, name).default
            torch.library.opcheck(node, args, test_utils=checks)


def _node_gradients(build, inputs: torch.Tensor, relevance: torch.Tensor):
    results = []
    for backend in ("compiled", "reference"):
        with use_backend(backend):
            x = inputs.clone().requires_grad_()
            output = build(x)
            (gradient,) = torch.autograd.grad(output, x, relevance)
        results.append((output.detach(), gradient))
    return results


def test_nodes_match_their_twins() -> None:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, generator=generator, dtype=torch.float64)
    relevance = torch.randn(2, 3, 8, generator=generator, dtype=torch.float64)
    weight, bias = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    builds = [
        lambda t: ops.lrp_share_node(t, 0.25),
        lambda t: ops.lrp_softmax_node(t, -1),
        lambda t: ops.lrp_softmax_node(t, 1, torch.float32).double(),
        lambda t: ops.lrp_softmax_ratio_node(t, 0.25 * t.detach(), -1, None, 0.25),
        lambda t: ops.lrp_softmax_ratio_node(t, -t.detach(), 1, torch.float32, -1.0).double(),
        lambda t: ops.lrp_layer_norm_node(t, [8], weight, bias, 1e-5, 1e-9),
        lambda t: ops.lrp_layer_norm_node(t, [3, 8], None, None, 1e-5, 0.0),
    ]
    for build in builds:
        (compiled, compiled_grad), (twin, twin_grad) = _node_gradients(build, x, relevance)
        torch.testing.assert_close(compiled, twin, rtol=0, atol=0)
        torch.testing.assert_close(compiled_grad, twin_grad, rtol=1e-12, atol=1e-300)


def _permuted(shape: list[int], order: list[int], generator: torch.Generator) -> torch.Tensor:
    """A float64 tensor of ``shape``, as a permuted view of a contiguous one."""
    stored = [shape[i] for i in order]
    inverse = [order.index(i) for i in range(len(order))]
    return torch.randn(stored, generator=generator, dtype=torch.float64).permute(inverse)


@settings(max_examples=30, deadline=None)
@given(
    batch=st.lists(st.integers(1, 3), max_size=2),
    sizes=st.tuples(st.integers(1, 5), st.integers(1, 5), st.integers(1, 5)),
    broadcast=st.booleans(),
    permute=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_uniform_matmul_node_matches_its_twin_and_the_rule_written_out(
    batch: list[int], sizes: tuple[int, int, int], broadcast: bool, permute: bool, seed: int
) -> None:
    # Factors of any batch shape (the second broadcast over the first's), contiguous or
    # permuted views as attention hands them over.
    generator = torch.Generator().manual_seed(seed)
    rows, inner, columns = sizes
    a_shape = [*batch, rows, inner]
    b_shape = [*([1] * len(batch) if broadcast else batch), inner, columns]
    if permute:
        a = _permuted(a_shape, list(range(len(a_shape)))[::-1], generator)
        b = _permuted(b_shape, [len(b_shape) - 1, *range(len(b_shape) - 1)], generator)
    else:
        a = torch.randn(a_shape, generator=generator, dtype=torch.float64)
        b = torch.randn(b_shape, generator=generator, dtype=torch.float64)
    out_shape = (*torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]), rows, columns)
    relevance = torch.randn(out_shape, generator=generator, dtype=torch.float64)
    _check_uniform_node("lrp_uniform_matmul_node", torch.matmul, a, b, relevance, twin_rtol=1e-12)


def _check_uniform_node(name: str, product, a, b, relevance, twin_rtol: float) -> None:
    """The node computes ``product(a, b)`` on both backends, and its backward is the uniform
    rule written out: half of each factor times its gradient of the product."""
    results = []
    for backend in ("compiled", "reference"):
        with use_backend(backend):
            leaves = (a.detach().requires_grad_(), b.detach().requires_grad_())
            output = getattr(ops, name)(*leaves)
            results.append((output, torch.autograd.grad(output, leaves, relevance)))
    (compiled, compiled_grads), (twin, twin_grads) = results
    # On factors that require grad, as the nodes' are: torch.matmul picks its kernels by that.
    leaves = (a.detach().requires_grad_(), b.detach().requires_grad_())
    written_out = product(*leaves)
    torch.testing.assert_close(compiled, written_out.detach(), rtol=0, atol=0)
    torch.testing.assert_close(twin, written_out.detach(), rtol=0, atol=0)
    gradients = torch.autograd.grad(written_out, leaves, relevance)
    for compiled_grad, twin_grad, factor, gradient in zip(
        compiled_grads, twin_grads, (a, b), gradients
    ):
        torch.testing.assert_close(compiled_grad, twin_grad, rtol=twin_rtol, atol=1e-300)
        torch.testing.assert_close(compiled_grad, 0.5 * factor * gradient, rtol=1e-12, atol=1e-12)


def test_uniform_matmul_node_keeps_the_factors_it_was_given() -> None:
    # What it saves is the permuted views themselves, not the contiguous copies that autograd's
    # matmul would keep: the saved tensors share the factors' storage.
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64, requires_grad=True)
    query, key = x.transpose(1, 2), x.transpose(1, 2).mT
    stored: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        stored.append(tensor.untyped_storage().data_ptr())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ops.lrp_uniform_matmul_node(query, key)
    assert stored == [x.untyped_storage().data_ptr()] * 2
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        stored.clear()
        torch.matmul(query, key)
    assert x.untyped_storage().data_ptr() not in stored  # autograd's copies


@settings(max_examples=30, deadline=None)
@given(
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=4),
    broadcast=st.lists(st.booleans(), min_size=4, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_uniform_product_node_matches_its_twin_and_the_rule_written_out(
    shape: list[int], broadcast: list[bool], seed: int
) -> None:
    # a * b with b broadcast along some dimensions (a gate of one feature, say).
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=generator, dtype=torch.float64)
    b_shape = [1 if flag else size for size, flag in zip(shape, broadcast)]
    b = torch.randn(b_shape, generator=generator, dtype=torch.float64)
    relevance = torch.randn(shape, generator=generator, dtype=torch.float64)
    _check_uniform_node("lrp_uniform_product_node", torch.mul, a, b, relevance, twin_rtol=0.0)


def test_uniform_product_node_keeps_the_product_alone() -> None:
    a, b = (torch.randn(3, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    stored: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        stored.append(tensor.untyped_storage().data_ptr())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        product = ops.lrp_uniform_product_node(a, b)
    assert stored == [product.untyped_storage().data_ptr()]


def test_nodes_compute_the_forward_they_stand_for() -> None:
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    weight = torch.randn(4, dtype=torch.float64)
    torch.testing.assert_close(ops.lrp_softmax_node(x, 1), torch.softmax(x, 1), rtol=0, atol=0)
    scores = torch.randn(2, 5, 4, dtype=torch.float64)
    torch.testing.assert_close(
        ops.lrp_softmax_ratio_node(scores, x, 1, torch.float32, 0.5),
        torch.softmax(x, 1, dtype=torch.float32),
        rtol=0,
        atol=0,
    )
    torch.testing.assert_close(
        ops.lrp_layer_norm_node(x, [4], weight, None, 1e-5, 1e-9),
        torch.nn.functional.layer_norm(x, [4], weight, None, 1e-5),
        rtol=0,
        atol=0,
    )
    shared = ops.lrp_share_node(x, 0.5)
    assert shared.data_ptr() == x.data_ptr()


def test_node_bad_arguments() -> None:
    x = torch.randn(2, 3)
    for backend in ("compiled", "reference"):
        with use_backend(backend):
            with pytest.raises(ValueError, match="share"):
                ops.lrp_share_node(x, -0.5)
            with pytest.raises(ValueError, match="epsilon"):
                ops.lrp_layer_norm_node(x, [3], None, None, 1e-5, float("nan"))
            with pytest.raises(ValueError, match="two dimensions"):
                ops.lrp_uniform_matmul_node(x, x[0])
            with pytest.raises(TypeError, match="dtype"):
                ops.lrp_uniform_matmul_node(x, x.double().mT)
            with pytest.raises(TypeError, match="floating"):
                ops.lrp_uniform_matmul_node(x.long(), x.long().mT)
            with pytest.raises(ValueError, match="broadcast"):
                ops.lrp_uniform_product_node(x, x.mT)
            with pytest.raises(TypeError, match="dtype"):
                ops.lrp_uniform_product_node(x, x.double())
            with pytest.raises(TypeError, match="floating"):
                ops.lrp_uniform_product_node(x.long(), x.long())
            with pytest.raises(ValueError, match="inputs"):
                ops.lrp_softmax_ratio_node(x, x.mT, -1, None, 1.0)
            with pytest.raises(TypeError, match="inputs"):
                ops.lrp_softmax_ratio_node(x, x.double(), -1, None, 1.0)
            with pytest.raises(ValueError, match="scale"):
                ops.lrp_softmax_ratio_node(x, x, -1, None, float("nan"))
            with pytest.raises(ValueError, match="dim"):
                ops.lrp_softmax_ratio_node(x, x, 2, None, 1.0)


@pytest.mark.cuda
def test_cuda_matches_twin() -> None:
    generator = torch.Generator().manual_seed(2)
    for dtype in DTYPES:
        x = _randn([5, 3, 33], generator, dtype)
        x[0, 0, 0] = float("-inf")
        probs = torch.softmax(x.double(), -1).to(dtype)
        relevance = _randn([5, 3, 33], generator, dtype)
        expected = ops.reference.softmax_relevance(x, probs, relevance, -1)
        result = torch.ops.fastattr.softmax_relevance(x.cuda(), probs.cuda(), relevance.cuda(), -1)
        _close(result.cpu(), expected)
        inputs, relevance, outputs, rstd, weight, _, _ = _layer_norm_operands(
            [4, 7, 300], 1, dtype, 3
        )
        expected = ops.reference.layer_norm_relevance(
            inputs, relevance, outputs, rstd, weight, 1e-9
        )
        operands = (t.cuda() for t in (inputs, relevance, outputs, rstd, weight))
        _close(torch.ops.fastattr.layer_norm_relevance(*operands, 1e-9).cpu(), expected)
        expected = ops.reference.relevance_share(x, relevance, 0.25)
        result = torch.ops.fastattr.relevance_share(x.cuda(), relevance.cuda(), 0.25)
        torch.testing.assert_close(result.cpu(), expected, rtol=0, atol=0, equal_nan=True)
        expected = ops.reference.softmax_contribution(probs, relevance, 1, 0.125)
        result = torch.ops.fastattr.softmax_contribution(probs.cuda(), relevance.cuda(), 1, 0.125)
        _close(result.cpu(), expected)


@pytest.mark.cuda
def test_product_and_linear_nodes_on_cuda_match_their_twins() -> None:
    generator = torch.Generator().manual_seed(4)
    for dtype in (torch.float32, torch.float64):
        a, b, relevance = (_randn([4, 6, 8], generator, dtype) for _ in range(3))
        relevance[:, 1:] = 0  # rows without relevance: every row is multiplied on a GPU
        weight = _randn([8, 8], generator, dtype)
        for device in ("cuda", "cpu"):
            leaves = [t.to(device).requires_grad_() for t in (a, b)]
            with use_backend("compiled" if device == "cuda" else "reference"):
                product = ops.lrp_uniform_product_node(*leaves)
                shown = (leaves[0] @ weight.to(device).T).detach()
                linear = ops.lrp_linear_node(leaves[0], weight.to(device), shown)
            grads = torch.autograd.grad(product, leaves, relevance.to(device))
            to_x = torch.autograd.grad(linear, leaves[0], relevance.to(device))[0]
            if device == "cuda":
                on_cuda = (product.cpu(), *(g.cpu() for g in grads), to_x.cpu())
        _close(on_cuda[0], product.detach())
        for result, expected in zip(on_cuda[1:3], grads):
            _close(result, expected)
        torch.testing.assert_close(on_cuda[3], to_x)
