"""fastattr's kernels, each on the backend chosen by :func:`fastattr.use_backend`.

Every op exists twice: compiled (``torch.ops.fastattr.<name>``, CPU and CUDA) and as a
PyTorch twin in :mod:`fastattr.ops.reference`. Both check their arguments and raise
``ValueError`` / ``TypeError`` naming the argument at fault.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastattr._backend import current_backend, is_compiled
from fastattr.ops import reference

if is_compiled():
    from fastattr.ops import _fake  # noqa: F401  (registers the fake implementations)


def _compiled() -> bool:
    return current_backend() == "compiled"


def interpolate_path(inputs: Tensor, baselines: Tensor, alphas: Tensor) -> Tensor:
    """The straight-line path from ``baselines`` to ``inputs``, step-major.

    ``inputs`` is (B, ...), ``baselines`` broadcasts to it (a scalar tensor, (1, ...) or
    (B, ...)), ``alphas`` is a float64 (K,) table on the CPU or the inputs' device. Row
    ``k * B + b`` of the (K * B, ...) result is ``baselines_b + alphas_k * (inputs_b -
    baselines_b)``, computed in float32 for float16/bfloat16 inputs.
    """
    if _compiled():
        return torch.ops.fastattr.interpolate_path(inputs, baselines, alphas)
    return reference.interpolate_path(inputs, baselines, alphas)


def quadrature_accumulate(accumulator: Tensor, grads: Tensor, weights: Tensor) -> None:
    """``accumulator_b += sum_k weights_k * grads_{k * B + b}`` in place.

    ``grads`` is (K * B, ...) in the layout :func:`interpolate_path` produces, ``weights`` a
    float64 (K,) table, ``accumulator`` a float32 or float64 (B, ...) tensor (float64 for
    float64 grads). Calling it once per chunk of steps streams a whole path into one
    accumulator.
    """
    if _compiled():
        torch.ops.fastattr.quadrature_accumulate(accumulator, grads, weights)
    else:
        reference.quadrature_accumulate(accumulator, grads, weights)


def quadrature_finish(
    accumulator: Tensor, inputs: Tensor, baselines: Tensor, multiply_by_inputs: bool
) -> tuple[Tensor, Tensor]:
    """Attributions from a full accumulator, and their per-example sums, in one pass.

    Returns ``accumulator * (inputs - baselines)`` (or the accumulator itself when
    ``multiply_by_inputs`` is false) in the accumulator's dtype, and its (B,) row sums.
    """
    if _compiled():
        return torch.ops.fastattr.quadrature_finish(
            accumulator, inputs, baselines, multiply_by_inputs
        )
    return reference.quadrature_finish(accumulator, inputs, baselines, multiply_by_inputs)


def epsilon_ratio(relevance: Tensor, z: Tensor, epsilon: float) -> Tensor:
    """The LRP epsilon rule's stabilized ratio ``relevance / (z + epsilon * sign(z))``, with
    ``sign(0) = +1``."""
    if _compiled():
        return torch.ops.fastattr.epsilon_ratio(relevance, z, epsilon)
    return reference.epsilon_ratio(relevance, z, epsilon)


def epsilon_ratio_of_product(
    activations: Tensor, contributions: Tensor, z: Tensor, epsilon: float
) -> Tensor:
    """``epsilon_ratio(input_relevance(activations, contributions), z, epsilon)`` in one pass:
    LRP's product at a module's input and ratio at the previous module's output."""
    if _compiled():
        return torch.ops.fastattr.epsilon_ratio_of_product(activations, contributions, z, epsilon)
    return reference.epsilon_ratio_of_product(activations, contributions, z, epsilon)


def relevance_product(activations: Tensor, contributions: Tensor) -> tuple[Tensor, Tensor]:
    """The relevance ``activations * contributions`` and its per-example sums."""
    if _compiled():
        return torch.ops.fastattr.relevance_product(activations, contributions)
    return reference.relevance_product(activations, contributions)


def input_relevance(activations: Tensor, contributions: Tensor) -> Tensor:
    """``activations * contributions``: LRP's relevance at a module's input, without the row
    sums of :func:`relevance_product` (which cost more than the product on the CPU)."""
    if _compiled():
        return torch.ops.fastattr.input_relevance(activations, contributions)
    return reference.input_relevance(activations, contributions)


def lrp_product_node(activation: Tensor) -> Tensor:
    """LRP's node at a module's input: ``activation`` itself, whose backward turns the
    contribution arriving into the relevance ``activation * contribution``."""
    if _compiled():
        return torch.ops.fastattr.lrp_product_node(activation)
    return reference.lrp_product_node(activation)


def lrp_ratio_node(z: Tensor, shown: Tensor | None, epsilon: float, copy: bool) -> Tensor:
    """LRP's node at a module's output: ``shown`` (``z`` when None; a copy if ``copy``), whose
    backward sends ``relevance / (z + epsilon * sign(z))`` into ``z``'s graph."""
    if _compiled():
        return torch.ops.fastattr.lrp_ratio_node(z, shown, epsilon, copy)
    return reference.lrp_ratio_node(z, shown, epsilon, copy)


def lrp_pass_node(source: Tensor, shown: Tensor, copy: bool) -> Tensor:
    """LRP's pass-through node: ``shown`` (a copy if ``copy``), whose backward hands the
    relevance to ``source`` unchanged."""
    if _compiled():
        return torch.ops.fastattr.lrp_pass_node(source, shown, copy)
    return reference.lrp_pass_node(source, shown, copy)


def lrp_product_ratio_node(z: Tensor, activation: Tensor, epsilon: float) -> Tensor:
    """LRP's product node at a module's input fused with the ratio node at the previous
    module's output, when only pass-through modules lie between: ``activation`` itself, whose
    backward sends ``activation * relevance / (z + epsilon * sign(z))`` into ``z``'s graph."""
    if _compiled():
        return torch.ops.fastattr.lrp_product_ratio_node(z, activation, epsilon)
    return reference.lrp_product_ratio_node(z, activation, epsilon)


__all__ = [
    "epsilon_ratio",
    "epsilon_ratio_of_product",
    "input_relevance",
    "interpolate_path",
    "lrp_pass_node",
    "lrp_product_node",
    "lrp_product_ratio_node",
    "lrp_ratio_node",
    "quadrature_accumulate",
    "quadrature_finish",
    "reference",
    "relevance_product",
]
