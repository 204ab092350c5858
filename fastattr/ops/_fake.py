"""Fake (meta) implementations, so the compiled ops trace under torch.compile.

They run the ops' checks (``fastattr.ops._checks``), without reading values: the dispatcher
also routes here any call that mixes a meta tensor with real ones, which must fail rather
than return an empty tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastattr.ops import _checks
from fastattr.ops._checks import row_layout


@torch.library.register_fake("fastattr::interpolate_points")
def _(inputs: Tensor, baselines: Tensor, rows: Tensor, alphas: Tensor) -> Tensor:
    _checks.check_interpolate_points(inputs, baselines, rows, alphas, read_values=False)
    size = (rows.shape[0], *inputs.shape[1:])
    return inputs.new_empty(size).contiguous(memory_format=row_layout(inputs))


@torch.library.register_fake("fastattr::accumulate_points")
def _(accumulator: Tensor, grads: Tensor, rows: Tensor, weights: Tensor) -> None:
    _checks.check_accumulate_points(accumulator, grads, rows, weights, read_values=False)


@torch.library.register_fake("fastattr::point_slopes")
def _(grads: Tensor, rows: Tensor, inputs: Tensor, baselines: Tensor) -> Tensor:
    _checks.check_point_slopes(grads, rows, inputs, baselines, read_values=False)
    return inputs.new_empty(rows.shape[0], dtype=torch.float64)


@torch.library.register_fake("fastattr::quadrature_finish")
def _(
    accumulator: Tensor, inputs: Tensor, baselines: Tensor, multiply_by_inputs: bool
) -> tuple[Tensor, Tensor]:
    _checks.check_quadrature_finish(accumulator, inputs, baselines)
    attributions = torch.empty_like(accumulator, memory_format=row_layout(accumulator))
    return attributions, accumulator.new_empty(accumulator.shape[0])


@torch.library.register_fake("fastattr::epsilon_ratio")
def _(relevance: Tensor, z: Tensor, epsilon: float) -> Tensor:
    _checks.check_epsilon_ratio(relevance, z, epsilon)
    return torch.empty_like(relevance)  # as dense_leading lays it out


@torch.library.register_fake("fastattr::epsilon_ratio_of_product")
def _(activations: Tensor, contributions: Tensor, z: Tensor, epsilon: float) -> Tensor:
    _checks.check_epsilon_ratio_of_product(activations, contributions, z, epsilon)
    return torch.empty_like(activations)  # as dense_leading lays it out


@torch.library.register_fake("fastattr::input_relevance")
def _(activations: Tensor, contributions: Tensor) -> Tensor:
    _checks.check_input_relevance(activations, contributions)
    return torch.empty_like(activations)  # as dense_leading lays it out


@torch.library.register_fake("fastattr::kink_flips")
def _(values: Tensor, tolerance: Tensor, ends_a: Tensor, ends_b: Tensor) -> Tensor:
    _checks.check_kink_flips(values, tolerance, ends_a, ends_b, read_values=False)
    return values.new_empty((ends_a.shape[0], values.shape[1]), dtype=torch.bool)


@torch.library.register_fake("fastattr::softmax_relevance")
def _(inputs: Tensor, probs: Tensor, relevance: Tensor, dim: int) -> Tensor:
    _checks.check_softmax_relevance(inputs, probs, relevance, dim)
    return torch.empty_like(inputs, memory_format=torch.contiguous_format)


@torch.library.register_fake("fastattr::softmax_contribution")
def _(probs: Tensor, relevance: Tensor, dim: int, scale: float) -> Tensor:
    _checks.check_softmax_contribution(probs, relevance, dim, scale)
    return torch.empty_like(probs, memory_format=torch.contiguous_format)


@torch.library.register_fake("fastattr::layer_norm_relevance")
def _(
    inputs: Tensor,
    relevance: Tensor,
    outputs: Tensor,
    rstd: Tensor,
    weight: Tensor | None,
    epsilon: float,
) -> Tensor:
    _checks.check_layer_norm_relevance(inputs, relevance, outputs, rstd, weight, epsilon)
    return torch.empty_like(inputs, memory_format=torch.contiguous_format)


@torch.library.register_fake("fastattr::relevance_share")
def _(activations: Tensor, contributions: Tensor, share: float) -> Tensor:
    _checks.check_relevance_share(activations, contributions, share)
    return torch.empty_like(activations)  # as dense_leading lays it out
