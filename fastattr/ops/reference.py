"""Pure-PyTorch twins of the compiled kernels.

Each function computes what its kernel computes, in the same precision (float32 for float16
and bfloat16 data), after the argument checks [fastattr.ops][] runs before the kernels (one
set of messages, in ``fastattr.ops._checks``). They are the oracle of the tests and the
fallback when ``fastattr._C`` is not built.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastattr.ops._checks import (
    check_accumulate_points,
    check_epsilon,
    check_epsilon_ratio,
    check_epsilon_ratio_of_product,
    check_input_relevance,
    check_interpolate_points,
    check_kink_flips,
    check_layer_norm_relevance,
    check_lrp_layer_norm_node,
    check_lrp_linear_node,
    check_lrp_share_node,
    check_lrp_softmax_node,
    check_lrp_softmax_ratio_node,
    check_lrp_uniform_matmul_node,
    check_lrp_uniform_product_node,
    check_point_slopes,
    check_quadrature_finish,
    check_relevance_share,
    check_softmax_contribution,
    check_softmax_relevance,
    opmath_dtype,
    row_layout,
)


def _row_sums(values: Tensor) -> Tensor:
    """Per-example sums in ``values``' dtype, accumulated in float64 as the kernels do."""
    rows = values.reshape(values.shape[0], math.prod(values.shape[1:]))
    return rows.sum(1, dtype=torch.float64).to(values.dtype)


def _table_on(table: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A point table in ``dtype`` on ``device``; from the host through pinned memory, which
    spares a GPU stream the synchronization of a copy from pageable memory."""
    table = table.to(dtype)
    if table.device.type == "cpu" and device.type == "cuda":
        return table.pin_memory().to(device, non_blocking=True)
    return table.to(device)


def interpolate_points(inputs: Tensor, baselines: Tensor, rows: Tensor, alphas: Tensor) -> Tensor:
    """Twin of [fastattr.ops.interpolate_points][].

    Row ``p`` is ``baselines_r + alphas_p * (inputs_r - baselines_r)`` with ``r = rows_p``."""
    check_interpolate_points(inputs, baselines, rows, alphas)
    compute = opmath_dtype(inputs.dtype)
    index = _table_on(rows, inputs.device, torch.int64)
    x = inputs.to(compute).index_select(0, index)
    base = baselines.to(compute).expand_as(inputs).index_select(0, index)
    steps = _table_on(alphas, inputs.device, compute).view(-1, *([1] * (inputs.dim() - 1)))
    path = base + steps * (x - base)
    return path.to(inputs.dtype).contiguous(memory_format=row_layout(inputs))


def accumulate_points(accumulator: Tensor, grads: Tensor, rows: Tensor, weights: Tensor) -> None:
    """Twin of [fastattr.ops.accumulate_points][].

    ``accumulator_{rows_p} += weights_p * grads_p``, in place, each row's points in order."""
    check_accumulate_points(accumulator, grads, rows, weights)
    # Level k holds each row's k-th point: one index_add per level adds them to distinct rows,
    # each row's points in order, as the kernels do.
    levels: list[list[int]] = []
    seen: dict[int, int] = {}
    for p, row in enumerate(rows.tolist()):
        level = seen.get(row, 0)
        seen[row] = level + 1
        if level == len(levels):
            levels.append([])
        levels[level].append(p)
    device = accumulator.device
    w = _table_on(weights, device, accumulator.dtype).view(-1, *([1] * (grads.dim() - 1)))
    index_rows = _table_on(rows, device, torch.int64)
    for points in levels:
        index = _table_on(torch.tensor(points), device, torch.int64)
        terms = w.index_select(0, index) * grads.index_select(0, index).to(accumulator.dtype)
        accumulator.index_add_(0, index_rows.index_select(0, index), terms)


def point_slopes(grads: Tensor, rows: Tensor, inputs: Tensor, baselines: Tensor) -> Tensor:
    """Twin of [fastattr.ops.point_slopes][].

    Point ``p``'s ``sum_j grads_pj * (inputs_rj - baselines_rj)`` with ``r = rows_p``, in
    float64."""
    check_point_slopes(grads, rows, inputs, baselines)
    index = _table_on(rows, inputs.device, torch.int64)
    diff = inputs.double() - baselines.double().expand_as(inputs)
    terms = grads.double() * diff.index_select(0, index)
    return terms.reshape(rows.numel(), math.prod(inputs.shape[1:])).sum(1)


def quadrature_finish(
    accumulator: Tensor, inputs: Tensor, baselines: Tensor, multiply_by_inputs: bool
) -> tuple[Tensor, Tensor]:
    """Twin of [fastattr.ops.quadrature_finish][].

    The attributions (the accumulator, times ``inputs - baselines`` if asked) in the
    accumulator's dtype, and their per-example sums."""
    check_quadrature_finish(accumulator, inputs, baselines)
    if multiply_by_inputs:
        dtype = accumulator.dtype
        attributions = accumulator * (inputs.to(dtype) - baselines.to(dtype))
    else:
        attributions = accumulator.clone()
    return attributions, _row_sums(attributions)


def _stabilized_ratio(relevance: Tensor, z: Tensor, epsilon: float) -> Tensor:
    """``relevance / (z + epsilon * sign(z))`` with ``sign(0) = +1``, in ``z``'s dtype
    (``stabilized_ratio`` in csrc/lrp_formula.h)."""
    return relevance / (z + torch.where(z < 0, -1.0, 1.0).to(z.dtype) * epsilon)


def epsilon_ratio(relevance: Tensor, z: Tensor, epsilon: float) -> Tensor:
    """Twin of [fastattr.ops.epsilon_ratio][].

    ``relevance / (z + epsilon * sign(z))`` with ``sign(0) = +1``."""
    check_epsilon_ratio(relevance, z, epsilon)
    compute = opmath_dtype(relevance.dtype)
    return _stabilized_ratio(relevance.to(compute), z.to(compute), epsilon).to(relevance.dtype)


def input_relevance(activations: Tensor, contributions: Tensor) -> Tensor:
    """Twin of [fastattr.ops.input_relevance][].

    ``activations * contributions`` (computed in float32 or float64)."""
    check_input_relevance(activations, contributions)
    compute = opmath_dtype(activations.dtype)
    return (activations.to(compute) * contributions.to(compute)).to(activations.dtype)


def epsilon_ratio_of_product(
    activations: Tensor, contributions: Tensor, z: Tensor, epsilon: float
) -> Tensor:
    """Twin of [fastattr.ops.epsilon_ratio_of_product][].

    [epsilon_ratio][fastattr.ops.reference.epsilon_ratio] of
    [input_relevance][fastattr.ops.reference.input_relevance]: the product at a module's input
    and the ratio at the previous module's output, with the product rounded to the dtype in
    between."""
    check_epsilon_ratio_of_product(activations, contributions, z, epsilon)
    return epsilon_ratio(input_relevance(activations, contributions), z, epsilon)


# LRP's autograd nodes. Each forward returns a view of the tensor the model continues with (made
# inside the Function, so autograd refuses in-place changes to it); each backward applies one
# step of a rule.


class _ProductNode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, activation: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(activation)
        return activation.view_as(activation)

    @staticmethod
    def backward(ctx, contribution: Tensor) -> Tensor:  # type: ignore[override]
        (activation,) = ctx.saved_tensors
        return input_relevance(activation, contribution.to(activation.dtype))


class _ProductRatioNode(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx, z: Tensor, activation: Tensor, epsilon: float
    ) -> Tensor:
        ctx.save_for_backward(z, activation)
        ctx.epsilon = epsilon
        return activation.view_as(activation)

    @staticmethod
    def backward(ctx, relevance: Tensor):  # type: ignore[override]
        z, activation = ctx.saved_tensors
        ratio = epsilon_ratio_of_product(activation, relevance.to(activation.dtype), z, ctx.epsilon)
        return ratio, None, None


class _RatioNode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, shown: Tensor, epsilon: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(z)
        ctx.epsilon = epsilon
        return shown.view_as(shown)

    @staticmethod
    def backward(ctx, relevance: Tensor):  # type: ignore[override]
        (z,) = ctx.saved_tensors
        return epsilon_ratio(relevance.to(z.dtype), z, ctx.epsilon), None, None


class _PassNode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, source: Tensor, shown: Tensor) -> Tensor:  # type: ignore[override]
        return shown.view_as(shown)

    @staticmethod
    def backward(ctx, relevance: Tensor):  # type: ignore[override]
        return relevance, None


class _LinearNode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, shown: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(weight)
        return shown.view_as(shown)

    @staticmethod
    def backward(ctx, contribution: Tensor):  # type: ignore[override]
        (weight,) = ctx.saved_tensors
        return contribution.to(weight.dtype) @ weight, None, None


def lrp_product_node(activation: Tensor) -> Tensor:
    """Twin of [fastattr.ops.lrp_product_node][].

    A view of ``activation``; backward ``activation * contribution``
    ([input_relevance][fastattr.ops.reference.input_relevance])."""
    return _ProductNode.apply(activation)


def lrp_product_ratio_node(z: Tensor, activation: Tensor, epsilon: float) -> Tensor:
    """Twin of [fastattr.ops.lrp_product_ratio_node][].

    A view of ``activation``; backward
    [epsilon_ratio_of_product][fastattr.ops.reference.epsilon_ratio_of_product] of it, the
    relevance and ``z``, into ``z``: the product node at a module's input, the pass nodes
    before it and the ratio node at the previous module's output, in one."""
    check_epsilon(epsilon)
    return _ProductRatioNode.apply(z, activation, epsilon)


def lrp_ratio_node(z: Tensor, epsilon: float) -> Tensor:
    """Twin of [fastattr.ops.lrp_ratio_node][].

    A view of ``z``; backward [epsilon_ratio][fastattr.ops.reference.epsilon_ratio] of the
    relevance and ``z``, into ``z``."""
    check_epsilon(epsilon)
    return _RatioNode.apply(z, z, epsilon)


def lrp_ratio_shown_node(z: Tensor, shown: Tensor, epsilon: float) -> Tensor:
    """Twin of [fastattr.ops.lrp_ratio_shown_node][].

    A view of ``shown``; backward [epsilon_ratio][fastattr.ops.reference.epsilon_ratio] of the
    relevance and ``z``, into ``z``."""
    check_epsilon(epsilon)
    return _RatioNode.apply(z, shown, epsilon)


def lrp_pass_node(source: Tensor, shown: Tensor) -> Tensor:
    """Twin of [fastattr.ops.lrp_pass_node][].

    A view of ``shown``; backward the relevance, unchanged, into ``source``."""
    return _PassNode.apply(source, shown)


def lrp_linear_node(x: Tensor, weight: Tensor, shown: Tensor) -> Tensor:
    """Twin of [fastattr.ops.lrp_linear_node][].

    A view of ``shown``; backward ``contribution @ weight`` over every row, into ``x``."""
    check_lrp_linear_node(x, weight, shown)
    return _LinearNode.apply(x, weight, shown)


def kink_flips(values: Tensor, tolerance: Tensor, ends_a: Tensor, ends_b: Tensor) -> Tensor:
    """Twin of [fastattr.ops.kink_flips][].

    Compared in float32 (float64 for float64 values), as the kernels compare."""
    check_kink_flips(values, tolerance, ends_a, ends_b, read_values=True)
    compute = opmath_dtype(values.dtype)
    band = tolerance.to(compute).unsqueeze(1)
    above = values.to(compute) > band
    below = values.to(compute) < -band
    return (above[ends_a] & below[ends_b]) | (below[ends_a] & above[ends_b])


# Transformer rules (AttnLRP): the softmax and layer-norm relevance, and the share of a product's
# relevance that one factor receives.


def softmax_relevance(inputs: Tensor, probs: Tensor, relevance: Tensor, dim: int) -> Tensor:
    """Twin of [fastattr.ops.softmax_relevance][].

    ``inputs * (relevance - probs * relevance.sum(dim))``, the input times the gradient of
    ``sum(probs * relevance / probs)`` without dividing by ``probs``; zero where an input is
    ``-inf``."""
    check_softmax_relevance(inputs, probs, relevance, dim)
    compute = opmath_dtype(inputs.dtype)
    x = inputs.to(compute)
    total = relevance.sum(dim, keepdim=True, dtype=torch.float64).to(compute)
    result = x * (relevance.to(compute) - probs.to(compute) * total)
    return torch.where(torch.isneginf(x), 0.0, result).to(inputs.dtype)


def softmax_contribution(probs: Tensor, relevance: Tensor, dim: int, scale: float) -> Tensor:
    """Twin of [fastattr.ops.softmax_contribution][].

    ``scale * (relevance - probs * relevance.sum(dim))``, the row sum taken in float64."""
    check_softmax_contribution(probs, relevance, dim, scale)
    compute = opmath_dtype(probs.dtype)
    total = relevance.sum(dim, keepdim=True, dtype=torch.float64).to(compute)
    result = scale * (relevance.to(compute) - probs.to(compute) * total)
    return result.to(probs.dtype)


def layer_norm_relevance(
    inputs: Tensor,
    relevance: Tensor,
    outputs: Tensor,
    rstd: Tensor,
    weight: Tensor | None,
    epsilon: float,
) -> Tensor:
    """Twin of [fastattr.ops.layer_norm_relevance][].

    With ``v = weight * relevance / (outputs + epsilon * sign(outputs))``, ``inputs * (v -
    mean(v)) * rstd`` over each normalized row (``rstd`` held fixed)."""
    row = check_layer_norm_relevance(inputs, relevance, outputs, rstd, weight, epsilon)
    compute = opmath_dtype(inputs.dtype)
    shape = (-1, row) if inputs.numel() else (0, max(row, 1))
    y = outputs.reshape(shape).to(compute)
    v = _stabilized_ratio(relevance.reshape(shape).to(compute), y, epsilon)
    if weight is not None:
        v = v * weight.reshape(1, -1).to(compute)
    mean = (v.sum(-1, keepdim=True, dtype=torch.float64) / row).to(compute)
    scale = rstd.reshape(-1, 1).to(compute)
    result = inputs.reshape(shape).to(compute) * ((v - mean) * scale)
    return result.to(inputs.dtype).reshape(inputs.shape)


def relevance_share(activations: Tensor, contributions: Tensor, share: float) -> Tensor:
    """Twin of [fastattr.ops.relevance_share][].

    ``activations * contributions * share``, computed in float32 or float64."""
    check_relevance_share(activations, contributions, share)
    compute = opmath_dtype(activations.dtype)
    product = activations.to(compute) * contributions.to(compute)
    return (product * share).to(activations.dtype)


class _ShareNode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, activation: Tensor, share: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(activation)
        ctx.share = share
        return activation.view_as(activation)

    @staticmethod
    def backward(ctx, contribution: Tensor):  # type: ignore[override]
        (activation,) = ctx.saved_tensors
        return relevance_share(activation, contribution.to(activation.dtype), ctx.share), None


class _UniformMatmulNode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(a, b)
        return torch.matmul(a, b)

    @staticmethod
    def backward(ctx, contribution: Tensor):  # type: ignore[override]
        a, b = ctx.saved_tensors
        contribution = contribution.to(a.dtype)
        to_a = torch.matmul(contribution, b.mT).sum_to_size(a.shape)
        to_b = torch.matmul(a.mT, contribution).sum_to_size(b.shape)
        return relevance_share(a, to_a, 0.5), relevance_share(b, to_b, 0.5)


class _UniformProductNode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:  # type: ignore[override]
        product = a * b
        ctx.save_for_backward(product)
        ctx.shapes = (a.shape, b.shape)
        return product

    @staticmethod
    def backward(ctx, contribution: Tensor):  # type: ignore[override]
        (product,) = ctx.saved_tensors
        half = relevance_share(product, contribution.to(product.dtype), 0.5)
        return tuple(half.sum_to_size(shape) for shape in ctx.shapes)


class _SoftmaxNode(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx, inputs: Tensor, dim: int, dtype: torch.dtype | None
    ) -> Tensor:
        probs = torch.softmax(inputs, dim, dtype=dtype)
        ctx.save_for_backward(inputs, probs)
        ctx.dim = dim
        return probs

    @staticmethod
    def backward(ctx, relevance: Tensor):  # type: ignore[override]
        inputs, probs = ctx.saved_tensors
        dtype = inputs.dtype
        result = softmax_relevance(inputs, probs.to(dtype), relevance.to(dtype), ctx.dim)
        return result, None, None


class _SoftmaxRatioNode(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx, scores: Tensor, inputs: Tensor, dim: int, dtype: torch.dtype | None, scale: float
    ) -> Tensor:
        probs = torch.softmax(inputs, dim, dtype=dtype)
        ctx.save_for_backward(probs)
        ctx.dim, ctx.scale, ctx.dtype = dim, scale, scores.dtype
        return probs

    @staticmethod
    def backward(ctx, relevance: Tensor):  # type: ignore[override]
        (probs,) = ctx.saved_tensors
        result = softmax_contribution(
            probs.to(ctx.dtype), relevance.to(ctx.dtype), ctx.dim, ctx.scale
        )
        return result, None, None, None, None


class _LayerNormNode(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        inputs: Tensor,
        normalized_shape: list[int],
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        epsilon: float,
    ) -> Tensor:
        outputs, _, rstd = torch.native_layer_norm(inputs, normalized_shape, weight, bias, eps)
        ctx.save_for_backward(inputs, outputs, rstd.to(opmath_dtype(inputs.dtype)), weight)
        ctx.epsilon = epsilon
        return outputs

    @staticmethod
    def backward(ctx, relevance: Tensor):  # type: ignore[override]
        inputs, outputs, rstd, weight = ctx.saved_tensors
        result = layer_norm_relevance(
            inputs, relevance.to(inputs.dtype), outputs, rstd, weight, ctx.epsilon
        )
        return result, None, None, None, None, None


def lrp_share_node(activation: Tensor, share: float) -> Tensor:
    """Twin of [fastattr.ops.lrp_share_node][].

    ``activation``; backward [relevance_share][fastattr.ops.reference.relevance_share] of it
    and the contribution."""
    check_lrp_share_node(activation, share)
    return _ShareNode.apply(activation, share)


def lrp_uniform_matmul_node(a: Tensor, b: Tensor) -> Tensor:
    """Twin of [fastattr.ops.lrp_uniform_matmul_node][].

    ``a @ b``; backward [relevance_share][fastattr.ops.reference.relevance_share] with share
    0.5 of each factor and its gradient of the product."""
    check_lrp_uniform_matmul_node(a, b)
    return _UniformMatmulNode.apply(a, b)


def lrp_uniform_product_node(a: Tensor, b: Tensor) -> Tensor:
    """Twin of [fastattr.ops.lrp_uniform_product_node][].

    ``a * b``; backward [relevance_share][fastattr.ops.reference.relevance_share] with share
    0.5 of the product and the contribution, summed to each factor's shape."""
    check_lrp_uniform_product_node(a, b)
    return _UniformProductNode.apply(a, b)


def lrp_softmax_node(inputs: Tensor, dim: int, dtype: torch.dtype | None) -> Tensor:
    """Twin of [fastattr.ops.lrp_softmax_node][].

    ``softmax(inputs, dim, dtype)``; backward
    [softmax_relevance][fastattr.ops.reference.softmax_relevance] into ``inputs``."""
    check_lrp_softmax_node(inputs, dim)
    return _SoftmaxNode.apply(inputs, dim, dtype)


def lrp_softmax_ratio_node(
    scores: Tensor, inputs: Tensor, dim: int, dtype: torch.dtype | None, scale: float
) -> Tensor:
    """Twin of [fastattr.ops.lrp_softmax_ratio_node][].

    ``softmax(inputs, dim, dtype)``; backward
    [softmax_contribution][fastattr.ops.reference.softmax_contribution] into ``scores``."""
    check_lrp_softmax_ratio_node(scores, inputs, dim, scale)
    return _SoftmaxRatioNode.apply(scores, inputs, dim, dtype, scale)


def lrp_layer_norm_node(
    inputs: Tensor,
    normalized_shape: list[int],
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    epsilon: float,
) -> Tensor:
    """Twin of [fastattr.ops.lrp_layer_norm_node][].

    ``layer_norm(inputs, ...)``; backward
    [layer_norm_relevance][fastattr.ops.reference.layer_norm_relevance] into ``inputs``."""
    check_lrp_layer_norm_node(inputs, epsilon)
    return _LayerNormNode.apply(inputs, list(normalized_shape), weight, bias, eps, epsilon)


# The public names: the twins.
__all__ = [
    "accumulate_points",
    "epsilon_ratio",
    "epsilon_ratio_of_product",
    "input_relevance",
    "interpolate_points",
    "kink_flips",
    "layer_norm_relevance",
    "lrp_layer_norm_node",
    "lrp_linear_node",
    "lrp_pass_node",
    "lrp_product_node",
    "lrp_product_ratio_node",
    "lrp_ratio_node",
    "lrp_ratio_shown_node",
    "lrp_share_node",
    "lrp_softmax_node",
    "lrp_softmax_ratio_node",
    "lrp_uniform_matmul_node",
    "lrp_uniform_product_node",
    "point_slopes",
    "quadrature_finish",
    "relevance_share",
    "softmax_contribution",
    "softmax_relevance",
]
