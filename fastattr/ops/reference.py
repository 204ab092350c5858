"""Pure-PyTorch twins of the compiled kernels.

Each function computes what its kernel computes, in the same precision (float32 for float16
and bfloat16 data), and checks its arguments with the same errors. They are the oracle of the
tests and the fallback when ``fastattr._C`` is not built.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision the kernels compute in for data of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_floating(tensor: Tensor, name: str) -> None:
    if tensor.dtype not in _FLOATING:
        raise TypeError(
            f"{name} must be a floating point tensor (float16, bfloat16, float32 or float64), "
            f"got {tensor.dtype}"
        )


def _check_batched(tensor: Tensor, name: str) -> None:
    if tensor.dim() < 1:
        raise ValueError(f"{name} must have a batch dimension, got a 0-dim tensor")


def _check_same(tensor: Tensor, name: str, ref: Tensor, ref_name: str, *, shape: bool) -> None:
    if tensor.device != ref.device:
        raise ValueError(
            f"{name} must be on the same device as {ref_name} ({ref.device}), got {tensor.device}"
        )
    if tensor.dtype != ref.dtype:
        raise TypeError(
            f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {tensor.dtype}"
        )
    if shape and tensor.shape != ref.shape:
        raise ValueError(
            f"{name} must have the shape of {ref_name} {list(ref.shape)}, got {list(tensor.shape)}"
        )


def _check_coefficients(
    coefficients: Tensor, name: str, data: Tensor, data_name: str, *, read_values: bool
) -> None:
    if coefficients.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {list(coefficients.shape)}")
    if coefficients.dtype != torch.float64:
        raise TypeError(f"{name} must be float64, got {coefficients.dtype}")
    if coefficients.device.type != "cpu" and coefficients.device != data.device:
        raise ValueError(
            f"{name} must be on the CPU or on the device of {data_name} ({data.device}), "
            f"got {coefficients.device}"
        )
    if not read_values:
        return
    finite = torch.isfinite(coefficients)
    if not bool(finite.all()):
        index = int((~finite).nonzero()[0, 0])
        raise ValueError(
            f"{name} must be finite, got {float(coefficients[index])} at index {index}"
        )


def _check_baselines(baselines: Tensor, inputs: Tensor) -> None:
    _check_same(baselines, "baselines", inputs, "inputs", shape=False)
    offset = inputs.dim() - baselines.dim()
    if offset < 0 or any(
        size not in (1, inputs.shape[d + offset]) for d, size in enumerate(baselines.shape)
    ):
        raise ValueError(
            f"baselines of shape {list(baselines.shape)} do not broadcast to inputs of shape "
            f"{list(inputs.shape)}"
        )


def row_layout(tensor: Tensor) -> torch.memory_format:
    """The layout the kernels walk ``tensor`` in, and give their outputs: channels_last (3d)
    where ``tensor`` is dense that way, else contiguous (``row_layout`` in csrc/operands.h).
    Both keep each example's values in one block."""
    if not tensor.is_contiguous():
        if tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last):
            return torch.channels_last
        if tensor.dim() == 5 and tensor.is_contiguous(memory_format=torch.channels_last_3d):
            return torch.channels_last_3d
    return torch.contiguous_format


def _check_accumulator(accumulator: Tensor) -> None:
    _check_batched(accumulator, "accumulator")
    if accumulator.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"accumulator must be float32 or float64, got {accumulator.dtype}")
    if not accumulator.is_contiguous(memory_format=row_layout(accumulator)):
        raise ValueError(
            "accumulator must be contiguous (or channels_last), got strides "
            f"{list(accumulator.stride())}"
        )


def _row_sums(values: Tensor) -> Tensor:
    """Per-example sums in ``values``' dtype, accumulated in float64 as the kernels do."""
    rows = values.reshape(values.shape[0], math.prod(values.shape[1:]))
    return rows.sum(1, dtype=torch.float64).to(values.dtype)


def _check_rows(
    rows: Tensor, count: int, count_name: str, data: Tensor, data_name: str, *, read_values: bool
) -> None:
    if rows.dim() != 1:
        raise ValueError(f"rows must be 1-D, got shape {list(rows.shape)}")
    if rows.dtype != torch.int64:
        raise TypeError(f"rows must be int64, got {rows.dtype}")
    if rows.device.type != "cpu" and rows.device != data.device:
        raise ValueError(
            f"rows must be on the CPU or on the device of {data_name} ({data.device}), "
            f"got {rows.device}"
        )
    if not read_values:
        return
    outside = (rows < 0) | (rows >= count)
    if bool(outside.any()):
        index = int(outside.nonzero()[0, 0])
        raise IndexError(
            f"rows must index the {count} rows of {count_name}, got {int(rows[index])} at "
            f"index {index}"
        )


def _check_table_length(table: Tensor, name: str, rows: Tensor) -> None:
    if table.numel() != rows.numel():
        raise ValueError(
            f"{name} must have one entry per point ({rows.numel()} rows), got {table.numel()}"
        )


# The check_* functions raise what the kernels raise for bad arguments. The fake (meta)
# implementations run them too, with read_values=False: fake tensors have no data to read.


def check_interpolate_points(
    inputs: Tensor, baselines: Tensor, rows: Tensor, alphas: Tensor, *, read_values: bool = True
) -> None:
    _check_batched(inputs, "inputs")
    _check_floating(inputs, "inputs")
    _check_baselines(baselines, inputs)
    _check_rows(rows, inputs.shape[0], "inputs", inputs, "inputs", read_values=read_values)
    _check_coefficients(alphas, "alphas", inputs, "inputs", read_values=read_values)
    _check_table_length(alphas, "alphas", rows)


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


def check_accumulate_points(
    accumulator: Tensor, grads: Tensor, rows: Tensor, weights: Tensor, *, read_values: bool = True
) -> None:
    _check_accumulator(accumulator)
    _check_batched(grads, "grads")
    _check_floating(grads, "grads")
    if grads.device != accumulator.device:
        raise ValueError(
            f"grads must be on the same device as accumulator ({accumulator.device}), "
            f"got {grads.device}"
        )
    if grads.dtype == torch.float64 and accumulator.dtype != torch.float64:
        raise TypeError(f"accumulator must be float64 for float64 grads, got {accumulator.dtype}")
    _check_rows(
        rows,
        accumulator.shape[0],
        "accumulator",
        accumulator,
        "accumulator",
        read_values=read_values,
    )
    _check_coefficients(weights, "weights", grads, "grads", read_values=read_values)
    _check_table_length(weights, "weights", rows)
    if grads.shape[1:] != accumulator.shape[1:] or grads.shape[0] != rows.numel():
        raise ValueError(
            f"grads must have shape ({rows.numel()}, ...) matching the rows and the "
            f"accumulator of shape {list(accumulator.shape)}, got {list(grads.shape)}"
        )


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


def check_point_slopes(
    grads: Tensor, rows: Tensor, inputs: Tensor, baselines: Tensor, *, read_values: bool = True
) -> None:
    _check_batched(grads, "grads")
    _check_floating(grads, "grads")
    _check_batched(inputs, "inputs")
    _check_same(inputs, "inputs", grads, "grads", shape=False)
    _check_baselines(baselines, inputs)
    _check_rows(rows, inputs.shape[0], "inputs", inputs, "inputs", read_values=read_values)
    if grads.shape[1:] != inputs.shape[1:] or grads.shape[0] != rows.numel():
        raise ValueError(
            f"grads must have shape ({rows.numel()}, ...) matching the rows and the inputs of "
            f"shape {list(inputs.shape)}, got {list(grads.shape)}"
        )


def point_slopes(grads: Tensor, rows: Tensor, inputs: Tensor, baselines: Tensor) -> Tensor:
    """Twin of [fastattr.ops.point_slopes][].

    Point ``p``'s ``sum_j grads_pj * (inputs_rj - baselines_rj)`` with ``r = rows_p``, in
    float64."""
    check_point_slopes(grads, rows, inputs, baselines)
    index = _table_on(rows, inputs.device, torch.int64)
    diff = inputs.double() - baselines.double().expand_as(inputs)
    terms = grads.double() * diff.index_select(0, index)
    return terms.reshape(rows.numel(), math.prod(inputs.shape[1:])).sum(1)


def check_quadrature_finish(accumulator: Tensor, inputs: Tensor, baselines: Tensor) -> None:
    _check_accumulator(accumulator)
    _check_floating(inputs, "inputs")
    if inputs.device != accumulator.device:
        raise ValueError(
            f"inputs must be on the same device as accumulator ({accumulator.device}), "
            f"got {inputs.device}"
        )
    if inputs.shape != accumulator.shape:
        raise ValueError(
            f"inputs must have the shape of accumulator {list(accumulator.shape)}, "
            f"got {list(inputs.shape)}"
        )
    _check_baselines(baselines, inputs)


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


def check_epsilon_ratio(relevance: Tensor, z: Tensor, epsilon: float) -> None:
    if not (math.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"epsilon must be finite and non-negative, got {epsilon}")
    _check_floating(relevance, "relevance")
    _check_same(z, "z", relevance, "relevance", shape=True)


def epsilon_ratio(relevance: Tensor, z: Tensor, epsilon: float) -> Tensor:
    """Twin of [fastattr.ops.epsilon_ratio][].

    ``relevance / (z + epsilon * sign(z))`` with ``sign(0) = +1``."""
    check_epsilon_ratio(relevance, z, epsilon)
    compute = opmath_dtype(relevance.dtype)
    zc = z.to(compute)
    sign = torch.where(zc < 0, -1.0, 1.0).to(compute)
    return (relevance.to(compute) / (zc + sign * epsilon)).to(relevance.dtype)


def check_input_relevance(activations: Tensor, contributions: Tensor) -> None:
    _check_floating(activations, "activations")
    _check_same(contributions, "contributions", activations, "activations", shape=True)


def input_relevance(activations: Tensor, contributions: Tensor) -> Tensor:
    """Twin of [fastattr.ops.input_relevance][].

    ``activations * contributions`` (computed in float32 or float64)."""
    check_input_relevance(activations, contributions)
    compute = opmath_dtype(activations.dtype)
    return (activations.to(compute) * contributions.to(compute)).to(activations.dtype)


def check_epsilon_ratio_of_product(
    activations: Tensor, contributions: Tensor, z: Tensor, epsilon: float
) -> None:
    if not (math.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"epsilon must be finite and non-negative, got {epsilon}")
    check_input_relevance(activations, contributions)
    _check_same(z, "z", activations, "activations", shape=True)


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
    return _ProductRatioNode.apply(z, activation, epsilon)


def lrp_ratio_node(z: Tensor, epsilon: float) -> Tensor:
    """Twin of [fastattr.ops.lrp_ratio_node][].

    A view of ``z``; backward [epsilon_ratio][fastattr.ops.reference.epsilon_ratio] of the
    relevance and ``z``, into ``z``."""
    return _RatioNode.apply(z, z, epsilon)


def lrp_ratio_shown_node(z: Tensor, shown: Tensor, epsilon: float) -> Tensor:
    """Twin of [fastattr.ops.lrp_ratio_shown_node][].

    A view of ``shown``; backward [epsilon_ratio][fastattr.ops.reference.epsilon_ratio] of the
    relevance and ``z``, into ``z``."""
    return _RatioNode.apply(z, shown, epsilon)


def lrp_pass_node(source: Tensor, shown: Tensor) -> Tensor:
    """Twin of [fastattr.ops.lrp_pass_node][].

    A view of ``shown``; backward the relevance, unchanged, into ``source``."""
    return _PassNode.apply(source, shown)


def check_kink_flips(
    values: Tensor, tolerance: Tensor, ends_a: Tensor, ends_b: Tensor, *, read_values: bool
) -> None:
    _check_floating(values, "values")
    if values.dim() != 2:
        raise ValueError(f"values must be 2-D (points, units), got shape {list(values.shape)}")
    _check_same(tolerance, "tolerance", values, "values", shape=False)
    if tolerance.shape != (values.shape[0],):
        raise ValueError(
            f"tolerance must hold one entry per row of values ({values.shape[0]}), got shape "
            f"{list(tolerance.shape)}"
        )
    if ends_a.shape != ends_b.shape:
        raise ValueError(
            f"ends_a and ends_b must have the same shape, got {list(ends_a.shape)} and "
            f"{list(ends_b.shape)}"
        )
    for ends, name in ((ends_a, "ends_a"), (ends_b, "ends_b")):
        if ends.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {list(ends.shape)}")
        if ends.dtype != torch.int64:
            raise TypeError(f"{name} must be int64, got {ends.dtype}")
        if ends.device != values.device:
            raise ValueError(
                f"{name} must be on the same device as values ({values.device}), got {ends.device}"
            )
        if read_values and ends.numel():
            low, high = int(ends.min()), int(ends.max())
            bad = low if low < 0 else high
            if low < 0 or high >= values.shape[0]:
                raise IndexError(
                    f"{name} must index the {values.shape[0]} rows of values, got {bad}"
                )


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


def _check_same_shape(tensor: Tensor, name: str, ref: Tensor, ref_name: str) -> None:
    _check_same(tensor, name, ref, ref_name, shape=True)


def _check_dim(dim: int, tensor: Tensor, name: str) -> int:
    if tensor.dim() == 0:
        raise ValueError(f"{name} must have at least one dimension, got a 0-dim tensor")
    if not -tensor.dim() <= dim < tensor.dim():
        raise ValueError(f"dim must be in [{-tensor.dim()}, {tensor.dim() - 1}], got {dim}")
    return dim % tensor.dim()


def check_softmax_relevance(inputs: Tensor, probs: Tensor, relevance: Tensor, dim: int) -> None:
    _check_floating(inputs, "inputs")
    _check_same_shape(probs, "probs", inputs, "inputs")
    _check_same_shape(relevance, "relevance", inputs, "inputs")
    _check_dim(dim, inputs, "inputs")


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


def _check_epsilon(epsilon: float) -> None:
    if not (math.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"epsilon must be finite and non-negative, got {epsilon}")


def check_layer_norm_relevance(
    inputs: Tensor,
    relevance: Tensor,
    outputs: Tensor,
    rstd: Tensor,
    weight: Tensor | None,
    epsilon: float,
) -> int:
    """Checks the arguments; returns the length of a normalized row."""
    _check_epsilon(epsilon)
    _check_floating(inputs, "inputs")
    _check_same_shape(relevance, "relevance", inputs, "inputs")
    _check_same_shape(outputs, "outputs", inputs, "inputs")
    if rstd.device != inputs.device:
        raise ValueError(
            f"rstd must be on the same device as inputs ({inputs.device}), got {rstd.device}"
        )
    if rstd.dtype != opmath_dtype(inputs.dtype):
        raise TypeError(
            f"rstd must be {opmath_dtype(inputs.dtype)} for {inputs.dtype} inputs, got {rstd.dtype}"
        )
    kept = 0  # the leading dimensions rstd shares with inputs; the rest are normalized
    while kept < rstd.dim() and kept < inputs.dim() and rstd.shape[kept] == inputs.shape[kept]:
        kept += 1
    if rstd.dim() != inputs.dim() or inputs.dim() == 0 or any(r != 1 for r in rstd.shape[kept:]):
        raise ValueError(
            f"rstd must have the shape of inputs {list(inputs.shape)} with the normalized "
            f"(trailing) dimensions set to 1, got {list(rstd.shape)}"
        )
    row = math.prod(inputs.shape[kept:])
    if weight is not None:
        _check_same(weight, "weight", inputs, "inputs", shape=False)
        if weight.numel() != row:
            raise ValueError(
                f"weight must have the {row} elements of a normalized row, got shape "
                f"{list(weight.shape)}"
            )
    return row


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
    v = relevance.reshape(shape).to(compute) / (y + torch.where(y < 0, -epsilon, epsilon))
    if weight is not None:
        v = v * weight.reshape(1, -1).to(compute)
    mean = (v.sum(-1, keepdim=True, dtype=torch.float64) / row).to(compute)
    scale = rstd.reshape(-1, 1).to(compute)
    result = inputs.reshape(shape).to(compute) * ((v - mean) * scale)
    return result.to(inputs.dtype).reshape(inputs.shape)


def check_relevance_share(activations: Tensor, contributions: Tensor, share: float) -> None:
    if not (math.isfinite(share) and share > 0):
        raise ValueError(f"share must be finite and positive, got {share}")
    check_input_relevance(activations, contributions)


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
    check_relevance_share(activation, activation, share)
    return _ShareNode.apply(activation, share)


def lrp_softmax_node(inputs: Tensor, dim: int, dtype: torch.dtype | None) -> Tensor:
    """Twin of [fastattr.ops.lrp_softmax_node][].

    ``softmax(inputs, dim, dtype)``; backward
    [softmax_relevance][fastattr.ops.reference.softmax_relevance] into ``inputs``."""
    _check_floating(inputs, "inputs")
    _check_dim(dim, inputs, "inputs")
    return _SoftmaxNode.apply(inputs, dim, dtype)


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
    _check_epsilon(epsilon)
    _check_floating(inputs, "inputs")
    return _LayerNormNode.apply(inputs, list(normalized_shape), weight, bias, eps, epsilon)


# The public names: the twins. (The check_* functions and layout helpers serve the ops,
# their fakes and the accumulators.)
__all__ = [
    "accumulate_points",
    "epsilon_ratio",
    "epsilon_ratio_of_product",
    "input_relevance",
    "interpolate_points",
    "kink_flips",
    "layer_norm_relevance",
    "lrp_layer_norm_node",
    "lrp_pass_node",
    "lrp_product_node",
    "lrp_product_ratio_node",
    "lrp_ratio_node",
    "lrp_ratio_shown_node",
    "lrp_share_node",
    "lrp_softmax_node",
    "point_slopes",
    "quadrature_finish",
    "relevance_share",
    "softmax_relevance",
]
