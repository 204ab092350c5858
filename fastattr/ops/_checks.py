"""The ops' argument checks, each message stated here once, and the layout and precision rules
the ops share with the kernels.

[fastattr.ops][]' functions run ``check_<op>`` before either backend; the twins of
[fastattr.ops.reference][] run it too, and so do the fake (meta) implementations of
``fastattr.ops._fake``, with ``read_values=False`` since fake tensors have no data to read.
The compiled kernels (csrc/) only guard against what would make them crash, with terse
errors of the same types (``IndexError`` for bounds, ``TypeError`` for dtypes, ``ValueError``
for shapes and devices); what cannot crash a kernel (finite alphas and weights, a finite
non-negative epsilon, a positive share) is checked here alone.

The checks read tensor values (rows in range, finite tables) where the tables are: on the
CPU, as the engine plans them, this costs no GPU synchronization.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision the kernels compute in for data of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_floating(tensor: Tensor, name: str) -> None:
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


def _check_table(
    table: Tensor, name: str, dtype: torch.dtype, data: Tensor, data_name: str
) -> None:
    """A point table: 1-D, of ``dtype``, on the CPU or on ``data``'s device."""
    if table.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {list(table.shape)}")
    if table.dtype != dtype:
        raise TypeError(f"{name} must be {str(dtype).removeprefix('torch.')}, got {table.dtype}")
    if table.device.type != "cpu" and table.device != data.device:
        raise ValueError(
            f"{name} must be on the CPU or on the device of {data_name} ({data.device}), "
            f"got {table.device}"
        )


def _check_coefficients(
    coefficients: Tensor, name: str, data: Tensor, data_name: str, *, read_values: bool
) -> None:
    _check_table(coefficients, name, torch.float64, data, data_name)
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


def _check_rows(
    rows: Tensor, count: int, count_name: str, data: Tensor, data_name: str, *, read_values: bool
) -> None:
    _check_table(rows, "rows", torch.int64, data, data_name)
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


def check_interpolate_points(
    inputs: Tensor, baselines: Tensor, rows: Tensor, alphas: Tensor, *, read_values: bool = True
) -> None:
    _check_batched(inputs, "inputs")
    check_floating(inputs, "inputs")
    _check_baselines(baselines, inputs)
    _check_rows(rows, inputs.shape[0], "inputs", inputs, "inputs", read_values=read_values)
    _check_coefficients(alphas, "alphas", inputs, "inputs", read_values=read_values)
    _check_table_length(alphas, "alphas", rows)


def check_accumulate_points(
    accumulator: Tensor, grads: Tensor, rows: Tensor, weights: Tensor, *, read_values: bool = True
) -> None:
    _check_accumulator(accumulator)
    _check_batched(grads, "grads")
    check_floating(grads, "grads")
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


def check_point_slopes(
    grads: Tensor, rows: Tensor, inputs: Tensor, baselines: Tensor, *, read_values: bool = True
) -> None:
    _check_batched(grads, "grads")
    check_floating(grads, "grads")
    _check_batched(inputs, "inputs")
    _check_same(inputs, "inputs", grads, "grads", shape=False)
    _check_baselines(baselines, inputs)
    _check_rows(rows, inputs.shape[0], "inputs", inputs, "inputs", read_values=read_values)
    if grads.shape[1:] != inputs.shape[1:] or grads.shape[0] != rows.numel():
        raise ValueError(
            f"grads must have shape ({rows.numel()}, ...) matching the rows and the inputs of "
            f"shape {list(inputs.shape)}, got {list(grads.shape)}"
        )


def check_quadrature_finish(accumulator: Tensor, inputs: Tensor, baselines: Tensor) -> None:
    _check_accumulator(accumulator)
    check_floating(inputs, "inputs")
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


def check_epsilon(epsilon: float) -> None:
    if not (math.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"epsilon must be finite and non-negative, got {epsilon}")


def check_epsilon_ratio(relevance: Tensor, z: Tensor, epsilon: float) -> None:
    check_epsilon(epsilon)
    check_floating(relevance, "relevance")
    _check_same(z, "z", relevance, "relevance", shape=True)


def check_input_relevance(activations: Tensor, contributions: Tensor) -> None:
    check_floating(activations, "activations")
    _check_same(contributions, "contributions", activations, "activations", shape=True)


def check_epsilon_ratio_of_product(
    activations: Tensor, contributions: Tensor, z: Tensor, epsilon: float
) -> None:
    check_epsilon(epsilon)
    check_input_relevance(activations, contributions)
    _check_same(z, "z", activations, "activations", shape=True)


def check_kink_flips(
    values: Tensor, tolerance: Tensor, ends_a: Tensor, ends_b: Tensor, *, read_values: bool
) -> None:
    check_floating(values, "values")
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


def _check_same_shape(tensor: Tensor, name: str, ref: Tensor, ref_name: str) -> None:
    _check_same(tensor, name, ref, ref_name, shape=True)


def check_dim(dim: int, tensor: Tensor, name: str) -> int:
    if tensor.dim() == 0:
        raise ValueError(f"{name} must have at least one dimension, got a 0-dim tensor")
    if not -tensor.dim() <= dim < tensor.dim():
        raise ValueError(f"dim must be in [{-tensor.dim()}, {tensor.dim() - 1}], got {dim}")
    return dim % tensor.dim()


def check_softmax_relevance(inputs: Tensor, probs: Tensor, relevance: Tensor, dim: int) -> None:
    check_floating(inputs, "inputs")
    _check_same_shape(probs, "probs", inputs, "inputs")
    _check_same_shape(relevance, "relevance", inputs, "inputs")
    check_dim(dim, inputs, "inputs")


def check_softmax_contribution(probs: Tensor, relevance: Tensor, dim: int, scale: float) -> None:
    check_floating(probs, "probs")
    _check_same_shape(relevance, "relevance", probs, "probs")
    check_dim(dim, probs, "probs")
    _check_scale(scale)


def _check_scale(scale: float) -> None:
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")


def check_layer_norm_relevance(
    inputs: Tensor,
    relevance: Tensor,
    outputs: Tensor,
    rstd: Tensor,
    weight: Tensor | None,
    epsilon: float,
) -> int:
    """Checks the arguments; returns the length of a normalized row."""
    check_epsilon(epsilon)
    check_floating(inputs, "inputs")
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


def check_relevance_share(activations: Tensor, contributions: Tensor, share: float) -> None:
    if not (math.isfinite(share) and share > 0):
        raise ValueError(f"share must be finite and positive, got {share}")
    check_input_relevance(activations, contributions)


def check_lrp_linear_node(x: Tensor, weight: Tensor, shown: Tensor) -> None:
    check_floating(x, "x")
    _check_same(weight, "weight", x, "x", shape=False)
    _check_same(shown, "shown", x, "x", shape=False)
    if x.dim() < 1 or weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"weight must be (out_features, in_features) with in_features the last dimension of "
            f"x {list(x.shape)}, got {list(weight.shape)}"
        )
    expected = [*x.shape[:-1], weight.shape[0]]
    if list(shown.shape) != expected:
        raise ValueError(f"shown must have the shape {expected}, got {list(shown.shape)}")


def check_lrp_share_node(activation: Tensor, share: float) -> None:
    check_relevance_share(activation, activation, share)


def check_lrp_uniform_matmul_node(a: Tensor, b: Tensor) -> None:
    check_floating(a, "a")
    _check_same(b, "b", a, "a", shape=False)
    if a.dim() < 2 or b.dim() < 2:
        raise ValueError(f"a and b must have at least two dimensions, got {a.dim()} and {b.dim()}")


def check_lrp_uniform_product_node(a: Tensor, b: Tensor) -> None:
    check_floating(a, "a")
    _check_same(b, "b", a, "a", shape=False)
    # Checked by hand: torch.broadcast_shapes costs more than the node's own dispatch.
    if any(m != n and m != 1 and n != 1 for m, n in zip(reversed(a.shape), reversed(b.shape))):
        raise ValueError(f"a {list(a.shape)} and b {list(b.shape)} must broadcast to one shape")


def check_lrp_softmax_node(inputs: Tensor, dim: int) -> None:
    check_floating(inputs, "inputs")
    check_dim(dim, inputs, "inputs")


def check_lrp_softmax_ratio_node(scores: Tensor, inputs: Tensor, dim: int, scale: float) -> None:
    check_floating(scores, "scores")
    _check_same_shape(inputs, "inputs", scores, "scores")
    check_dim(dim, scores, "scores")
    _check_scale(scale)


def check_lrp_layer_norm_node(inputs: Tensor, epsilon: float) -> None:
    check_epsilon(epsilon)
    check_floating(inputs, "inputs")
