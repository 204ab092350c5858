"""fastattr's kernels, each on the backend chosen by [fastattr.use_backend][].

Every op exists twice: compiled (``torch.ops.fastattr.<name>``, CPU and CUDA) and as a
PyTorch twin in [fastattr.ops.reference][]. Each function here checks its arguments once, in
Python, before either backend runs, and raises ``ValueError``, ``TypeError`` or ``IndexError``
naming the argument at fault: the same error on both backends. The twins and the fake (meta)
kernels run the same checks; the compiled kernels only guard, tersely, against what would make
them crash (out-of-range rows, mismatched shapes, devices or dtypes), so a call to
``torch.ops.fastattr.<name>`` skips the checks that cannot crash a kernel, such as finite
alphas or a non-negative epsilon.

fastattr's engines, which build their own (valid) point tables, call the kernels through the
``_unchecked_*`` functions here, sparing the hot path the checks' cost.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from fastattr._backend import backend_in_context, is_compiled
from fastattr.ops import _checks, reference

if is_compiled():
    from fastattr.ops import _fake  # noqa: F401  (registers the fake implementations)


def _run(name: str, *args: Any) -> Any:
    """Op ``name`` on the backend in context, without the public function's check (on the
    reference backend the twin checks its arguments itself)."""
    if backend_in_context() == "compiled":
        return getattr(torch.ops.fastattr, name).default(*args)
    return getattr(reference, name)(*args)


# fastattr's engines build their own (valid) point tables: they call these, which skip the
# public functions' checks.
_unchecked_interpolate_points = functools.partial(_run, "interpolate_points")
_unchecked_accumulate_points = functools.partial(_run, "accumulate_points")
_unchecked_point_slopes = functools.partial(_run, "point_slopes")
_unchecked_quadrature_finish = functools.partial(_run, "quadrature_finish")
_unchecked_kink_flips = functools.partial(_run, "kink_flips")


def interpolate_points(inputs: Tensor, baselines: Tensor, rows: Tensor, alphas: Tensor) -> Tensor:
    """Points on the straight-line paths from ``baselines`` to ``inputs``.

    Row ``p`` of the (P, ...) result is ``baselines_r + alphas_p * (inputs_r - baselines_r)``
    with ``r = rows_p``, computed in float32 for float16/bfloat16 inputs.

    Args:
        inputs: (B, ...) floating tensor, the paths' ends.
        baselines: The paths' starts, broadcasting to ``inputs``: a scalar tensor, (1, ...) or
            (B, ...).
        rows: int64 (P,) table of the example each point belongs to, each in [0, B), on the
            CPU or the inputs' device.
        alphas: float64 (P,) table of the points' positions on their paths, on the CPU or the
            inputs' device.

    Returns:
        The (P, ...) path rows, in the dtype and row layout of ``inputs``.

    Raises:
        ValueError: The shapes do not fit, a table is not 1-D of one entry per point, or an
            alpha is not finite.
        IndexError: A row is outside ``inputs``.
        TypeError: A dtype is not floating, ``rows`` not int64 or ``alphas`` not float64.
    """
    if backend_in_context() == "compiled":
        _checks.check_interpolate_points(inputs, baselines, rows, alphas)
    return _run("interpolate_points", inputs, baselines, rows, alphas)


def accumulate_points(accumulator: Tensor, grads: Tensor, rows: Tensor, weights: Tensor) -> None:
    """``accumulator_r += weights_p * grads_p`` with ``r = rows_p``, for every point ``p``, in
    place.

    Each row adds its points in their order, so the result does not depend on how a path is
    split into calls.

    Args:
        accumulator: float32 or float64 (B, ...) tensor (float64 for float64 grads), updated
            in place.
        grads: (P, ...) gradients, one row per point.
        rows: int64 (P,) table of the accumulator row each point adds to, on the CPU or the
            grads' device.
        weights: float64 (P,) table of the points' quadrature weights.

    Raises:
        ValueError: The shapes do not fit, or a weight is not finite.
        IndexError: A row is outside the accumulator.
        TypeError: A dtype is not accepted.
    """
    if backend_in_context() == "compiled":
        _checks.check_accumulate_points(accumulator, grads, rows, weights)
    _run("accumulate_points", accumulator, grads, rows, weights)


def point_slopes(grads: Tensor, rows: Tensor, inputs: Tensor, baselines: Tensor) -> Tensor:
    """The directional derivative of the model along each point's path, from its gradient:
    ``sum_j grads_pj * (inputs_rj - baselines_rj)`` with ``r = rows_p``, accumulated in
    float64.

    Args:
        grads: (P, ...) gradients at the points, in the dtype of ``inputs``.
        rows: int64 (P,) table of the example each point belongs to, each in [0, B), on the
            CPU or the inputs' device.
        inputs: (B, ...) floating tensor, the paths' ends.
        baselines: The paths' starts, broadcasting to ``inputs``.

    Returns:
        The (P,) float64 slopes.

    Raises:
        ValueError: The shapes do not fit.
        IndexError: A row is outside ``inputs``.
        TypeError: A dtype is not floating, or ``grads`` and ``inputs`` differ in dtype.
    """
    if backend_in_context() == "compiled":
        _checks.check_point_slopes(grads, rows, inputs, baselines)
    return _run("point_slopes", grads, rows, inputs, baselines)


def quadrature_finish(
    accumulator: Tensor, inputs: Tensor, baselines: Tensor, multiply_by_inputs: bool
) -> tuple[Tensor, Tensor]:
    """Attributions from a full accumulator, and their per-example sums, in one pass.

    Args:
        accumulator: (B, ...) accumulated gradients.
        inputs: (B, ...) inputs.
        baselines: Baselines broadcasting to ``inputs``.
        multiply_by_inputs: Multiply by ``inputs - baselines``; otherwise the accumulator is
            the attribution.

    Returns:
        ``accumulator * (inputs - baselines)`` (or the accumulator itself when
        ``multiply_by_inputs`` is false) in the accumulator's dtype, and its (B,) row sums.
    """
    if backend_in_context() == "compiled":
        _checks.check_quadrature_finish(accumulator, inputs, baselines)
    return _run("quadrature_finish", accumulator, inputs, baselines, multiply_by_inputs)


def epsilon_ratio(relevance: Tensor, z: Tensor, epsilon: float) -> Tensor:
    """The LRP epsilon rule's stabilized ratio ``relevance / (z + epsilon * sign(z))``, with
    ``sign(0) = +1``.

    Args:
        relevance: The relevance at a module's output.
        z: The module's output (or its recomputation), of the same shape.
        epsilon: The stabilizer, non-negative.

    Returns:
        The ratio, in the dtype of ``z``.
    """
    if backend_in_context() == "compiled":
        _checks.check_epsilon_ratio(relevance, z, epsilon)
    return _run("epsilon_ratio", relevance, z, epsilon)


def epsilon_ratio_of_product(
    activations: Tensor, contributions: Tensor, z: Tensor, epsilon: float
) -> Tensor:
    """``epsilon_ratio(input_relevance(activations, contributions), z, epsilon)`` in one pass:
    LRP's product at a module's input and ratio at the previous module's output.

    Args:
        activations: The module's input.
        contributions: The contributions arriving at that input, of the same shape.
        z: The previous module's output, of the same shape.
        epsilon: The stabilizer, non-negative.

    Returns:
        The ratio, in the dtype of ``z``.
    """
    if backend_in_context() == "compiled":
        _checks.check_epsilon_ratio_of_product(activations, contributions, z, epsilon)
    return _run("epsilon_ratio_of_product", activations, contributions, z, epsilon)


def input_relevance(activations: Tensor, contributions: Tensor) -> Tensor:
    """``activations * contributions``: LRP's relevance at a module's input.

    Args:
        activations: (B, ...) values at a module's input.
        contributions: (B, ...) contributions arriving there.
    """
    if backend_in_context() == "compiled":
        _checks.check_input_relevance(activations, contributions)
    return _run("input_relevance", activations, contributions)


def lrp_product_node(activation: Tensor) -> Tensor:
    """LRP's node at a module's input: a view of ``activation``, whose backward turns the
    contribution arriving into the relevance ``activation * contribution``.

    Args:
        activation: The module's input.

    Returns:
        A view of ``activation`` that autograd keeps from being changed in place.
    """
    return _run("lrp_product_node", activation)


def lrp_product_ratio_node(z: Tensor, activation: Tensor, epsilon: float) -> Tensor:
    """LRP's product node at a module's input fused with the ratio node at the previous
    module's output, when only pass-through rules lie between: a view of ``activation``, whose
    backward sends ``activation * relevance / (z + epsilon * sign(z))`` into ``z``'s graph.

    Args:
        z: The previous module's output (or its recomputation).
        activation: The module's input, detached.
        epsilon: The stabilizer, non-negative.

    Returns:
        A view of ``activation`` that autograd keeps from being changed in place.
    """
    if backend_in_context() == "compiled":
        _checks.check_epsilon(epsilon)
    return _run("lrp_product_ratio_node", z, activation, epsilon)


def lrp_ratio_node(z: Tensor, epsilon: float) -> Tensor:
    """LRP's node at a module's output: a view of ``z``, whose backward sends ``relevance /
    (z + epsilon * sign(z))`` into ``z``'s graph.

    Args:
        z: The module's output.
        epsilon: The stabilizer, non-negative.

    Returns:
        A view of ``z`` that autograd keeps from being changed in place.
    """
    if backend_in_context() == "compiled":
        _checks.check_epsilon(epsilon)
    return _run("lrp_ratio_node", z, epsilon)


def lrp_ratio_shown_node(z: Tensor, shown: Tensor, epsilon: float) -> Tensor:
    """[fastattr.ops.lrp_ratio_node][] for a ``z`` recomputed with modified weights: a view of
    the module's true output ``shown``, whose backward sends ``relevance / (z + epsilon *
    sign(z))`` into ``z``'s graph.

    Args:
        z: The recomputed output, whose graph receives the relevance.
        shown: The module's output, detached: what the model continues with.
        epsilon: The stabilizer, non-negative.

    Returns:
        A view of ``shown`` that autograd keeps from being changed in place.
    """
    if backend_in_context() == "compiled":
        _checks.check_epsilon(epsilon)
    return _run("lrp_ratio_shown_node", z, shown, epsilon)


def lrp_pass_node(source: Tensor, shown: Tensor) -> Tensor:
    """LRP's pass-through node: a view of ``shown``, whose backward hands the relevance to
    ``source`` unchanged.

    Args:
        source: The tensor that receives the relevance.
        shown: The value the model continues with, detached.

    Returns:
        A view of ``shown`` that autograd keeps from being changed in place.
    """
    return _run("lrp_pass_node", source, shown)


def lrp_linear_node(x: Tensor, weight: Tensor, shown: Tensor) -> Tensor:
    """LRP's node in place of a linear layer's own backward: a view of the layer's output
    ``shown`` (``x @ weight^T + bias``), whose backward sends ``contribution @ weight`` into
    ``x``'s graph. On the CPU it multiplies only the rows of the contribution that are not all
    zero (its other rows give zero): where a model reads some positions of a sequence only (a
    classifier on the first token, a language model's last position), the layers after the last
    attention get relevance at those positions alone.

    Args:
        x: The layer's input, (..., in_features).
        weight: Its weight, (out_features, in_features), of ``x``'s dtype and device.
        shown: Its output, detached, (..., out_features): what the model continues with.

    Returns:
        A view of ``shown`` that autograd keeps from being changed in place.

    Raises:
        ValueError: The shapes do not fit, or the devices differ.
        TypeError: A dtype is not floating, or the dtypes differ.
    """
    if backend_in_context() == "compiled":
        _checks.check_lrp_linear_node(x, weight, shown)
    return _run("lrp_linear_node", x, weight, shown)


def kink_flips(values: Tensor, tolerance: Tensor, ends_a: Tensor, ends_b: Tensor) -> Tensor:
    """Where a kink's switch values change sign strictly between the ends of path segments
    (``method="exact"``): for each segment ``p`` and unit ``u``, whether
    ``values[ends_a[p], u]`` and ``values[ends_b[p], u]`` lie beyond their rows' tolerances
    of zero with opposite signs.

    Args:
        values: (points, units) floating point: a kink's switch value (an input minus its
            threshold, say) per path point.
        tolerance: (points,) in the dtype of ``values``: how close to zero counts as zero at
            each point.
        ends_a: (segments,) int64 on the device of ``values``: the row of each segment's
            first end.
        ends_b: (segments,) int64: the row of each segment's other end.

    Returns:
        A (segments, units) bool tensor: the units whose kink each segment crosses.

    Examples:
        >>> import torch
        >>> from fastattr import ops
        >>> values = torch.tensor([[-1.0, 2.0, 0.0], [3.0, 1.0, -1.0]])
        >>> ops.kink_flips(values, torch.zeros(2), torch.tensor([0]), torch.tensor([1]))
        tensor([[ True, False, False]])
    """
    if backend_in_context() == "compiled":
        _checks.check_kink_flips(values, tolerance, ends_a, ends_b, read_values=True)
    return _run("kink_flips", values, tolerance, ends_a, ends_b)


def softmax_relevance(inputs: Tensor, probs: Tensor, relevance: Tensor, dim: int) -> Tensor:
    """AttnLRP's softmax rule along ``dim``: ``inputs * (relevance - probs *
    relevance.sum(dim))``, zero where an input is ``-inf`` (a masked attention score).

    Args:
        inputs: The softmax's input.
        probs: ``softmax(inputs, dim)``, of the same shape, dtype and device.
        relevance: The relevance at the softmax's output, of the same shape.
        dim: The softmax's dimension.

    Returns:
        The relevance at ``inputs``, contiguous, in their dtype.

    Raises:
        ValueError: The shapes or devices differ, or ``dim`` is out of range.
        TypeError: A dtype is not floating, or the dtypes differ.
    """
    if backend_in_context() == "compiled":
        _checks.check_softmax_relevance(inputs, probs, relevance, dim)
    return _run("softmax_relevance", inputs, probs, relevance, dim)


def softmax_contribution(probs: Tensor, relevance: Tensor, dim: int, scale: float) -> Tensor:
    """AttnLRP's softmax rule in the ratio form, along ``dim``: ``scale * (relevance - probs *
    relevance.sum(dim))``. Where the softmax read ``scale * z``, masked or not, this is
    [fastattr.ops.softmax_relevance][]'s relevance divided by ``z`` where nothing is masked
    (where something is, the softmax is zero, and with it the relevance AttnLRP's rules give
    it, and both results): the contribution the epsilon ratio at ``z`` would pass on, but for
    its stabilizer, computed without ``z`` or the softmax's input.

    Args:
        probs: The softmax's output.
        relevance: The relevance at it, of the same shape, dtype and device.
        dim: The softmax's dimension.
        scale: The factor from ``z`` to the softmax's input, finite.

    Returns:
        The contribution at ``z``, contiguous, in ``probs``' dtype.

    Raises:
        ValueError: The shapes or devices differ, ``dim`` is out of range or ``scale`` is not
            finite.
        TypeError: A dtype is not floating, or the dtypes differ.
    """
    if backend_in_context() == "compiled":
        _checks.check_softmax_contribution(probs, relevance, dim, scale)
    return _run("softmax_contribution", probs, relevance, dim, scale)


def layer_norm_relevance(
    inputs: Tensor,
    relevance: Tensor,
    outputs: Tensor,
    rstd: Tensor,
    weight: Tensor | None,
    epsilon: float,
) -> Tensor:
    """AttnLRP's layer-norm rule, the normalization treated as linear: with ``v = weight *
    relevance / (outputs + epsilon * sign(outputs))``, ``inputs * (v - mean(v)) * rstd`` over
    each normalized row.

    Args:
        inputs: The layer norm's input.
        relevance: The relevance at its output, of the same shape.
        outputs: Its output (bias included), of the same shape.
        rstd: The reciprocal standard deviation of each row, as ``torch.native_layer_norm``
            returns it: the shape of ``inputs`` with the normalized (trailing) dimensions set
            to 1, float32 (float64 for float64 inputs).
        weight: The affine weight (a normalized row's elements), or None.
        epsilon: The stabilizer, non-negative.

    Returns:
        The relevance at ``inputs``, contiguous, in their dtype.

    Raises:
        ValueError: A shape or device does not fit, or ``epsilon`` is negative or not finite.
        TypeError: A dtype is not floating, or the dtypes differ.
    """
    if backend_in_context() == "compiled":
        _checks.check_layer_norm_relevance(inputs, relevance, outputs, rstd, weight, epsilon)
    return _run("layer_norm_relevance", inputs, relevance, outputs, rstd, weight, epsilon)


def relevance_share(activations: Tensor, contributions: Tensor, share: float) -> Tensor:
    """``activations * contributions * share``: the part of a product's relevance one factor
    receives under the uniform rule (1/2 for each factor of ``a * b`` or ``a @ b``).

    Args:
        activations: The factor.
        contributions: The contributions arriving at it, of the same shape.
        share: The factor's share, positive.

    Returns:
        The relevance at the factor, in its dtype and layout.

    Raises:
        ValueError: The shapes or devices differ, or ``share`` is not positive and finite.
        TypeError: A dtype is not floating, or the dtypes differ.
    """
    if backend_in_context() == "compiled":
        _checks.check_relevance_share(activations, contributions, share)
    return _run("relevance_share", activations, contributions, share)


def lrp_share_node(activation: Tensor, share: float) -> Tensor:
    """LRP's node at one factor of a product: ``activation`` itself, whose backward turns the
    contribution arriving into [fastattr.ops.relevance_share][] of it.

    Args:
        activation: The factor.
        share: The factor's share of the product's relevance, positive.
    """
    if backend_in_context() == "compiled":
        _checks.check_lrp_share_node(activation, share)
    return _run("lrp_share_node", activation, share)


def lrp_uniform_matmul_node(a: Tensor, b: Tensor) -> Tensor:
    """LRP's node at a product of two activations ``a @ b`` (``torch.matmul``): the product,
    whose backward sends each factor the uniform rule's half of the relevance,
    [fastattr.ops.relevance_share][] with share 0.5 of the factor and its gradient of the
    product. It saves the factors as they came (views, as a rule), not the contiguous copies a
    matrix product of permuted factors would keep.

    Args:
        a: The first factor, at least 2-D.
        b: The second, at least 2-D, of ``a``'s dtype and device.

    Raises:
        ValueError: A factor has fewer than two dimensions, or the devices differ.
        TypeError: A dtype is not floating, or the dtypes differ.
    """
    if backend_in_context() == "compiled":
        _checks.check_lrp_uniform_matmul_node(a, b)
    return _run("lrp_uniform_matmul_node", a, b)


def lrp_uniform_product_node(a: Tensor, b: Tensor) -> Tensor:
    """LRP's node at an element-wise product of two activations ``a * b`` (a gated MLP's): the
    product, whose backward sends each factor the uniform rule's half of the relevance,
    [fastattr.ops.relevance_share][] with share 0.5 of the product and the contribution,
    summed over the dimensions the factor was broadcast along. It saves the product alone,
    where autograd's multiplication would keep both factors.

    Args:
        a: The first factor.
        b: The second, of ``a``'s dtype and device, broadcastable with it.

    Raises:
        ValueError: The shapes do not broadcast, or the devices differ.
        TypeError: A dtype is not floating, or the dtypes differ.
    """
    if backend_in_context() == "compiled":
        _checks.check_lrp_uniform_product_node(a, b)
    return _run("lrp_uniform_product_node", a, b)


def lrp_softmax_node(inputs: Tensor, dim: int, dtype: torch.dtype | None = None) -> Tensor:
    """``softmax(inputs, dim, dtype=dtype)``, whose backward sends the relevance at the output
    into ``inputs`` by [fastattr.ops.softmax_relevance][].

    Args:
        inputs: The softmax's input.
        dim: The softmax's dimension.
        dtype: The dtype to compute the softmax in, as ``torch.softmax`` takes it.
    """
    if backend_in_context() == "compiled":
        _checks.check_lrp_softmax_node(inputs, dim)
    return _run("lrp_softmax_node", inputs, dim, dtype)


def lrp_softmax_ratio_node(
    scores: Tensor, inputs: Tensor, dim: int, dtype: torch.dtype | None, scale: float
) -> Tensor:
    """``softmax(inputs, dim, dtype=dtype)`` where ``inputs`` holds ``scale * scores``, masked
    or not, whose backward sends [fastattr.ops.softmax_contribution][] of the relevance at the
    output into ``scores``: AttnLRP's softmax rule and the epsilon ratio at the scores in one
    node, which keeps only the softmax's output for the backward.

    Args:
        scores: The attention scores (``q @ k^T``) the relevance goes to.
        inputs: The softmax's input, ``scale * scores`` with a mask added or filled in: of
            ``scores``' shape, dtype and device; its graph is not followed.
        dim: The softmax's dimension.
        dtype: The dtype to compute the softmax in, as ``torch.softmax`` takes it.
        scale: The factor from ``scores`` to ``inputs``, finite.
    """
    if backend_in_context() == "compiled":
        _checks.check_lrp_softmax_ratio_node(scores, inputs, dim, scale)
    return _run("lrp_softmax_ratio_node", scores, inputs, dim, dtype, scale)


def lrp_layer_norm_node(
    inputs: Tensor,
    normalized_shape: list[int],
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    epsilon: float,
) -> Tensor:
    """``layer_norm(inputs, normalized_shape, weight, bias, eps)``, whose backward sends the
    relevance at the output into ``inputs`` by [fastattr.ops.layer_norm_relevance][].

    Args:
        inputs: The layer norm's input.
        normalized_shape: The normalized trailing dimensions.
        weight: The affine weight, or None.
        bias: The affine bias, or None.
        eps: The layer norm's own epsilon, added to the variance.
        epsilon: The rule's stabilizer, non-negative.
    """
    if backend_in_context() == "compiled":
        _checks.check_lrp_layer_norm_node(inputs, epsilon)
    return _run("lrp_layer_norm_node", inputs, list(normalized_shape), weight, bias, eps, epsilon)


class LrpNodes(NamedTuple):
    """One backend's LRP node constructors, without the per-call choice of backend (LRP makes
    one or two nodes per module). The compiled ones skip the epsilon check of
    [fastattr.ops.lrp_ratio_node][] and its kin: LRP checks each epsilon where a rule gives it.

    Attributes:
        product: [fastattr.ops.lrp_product_node][].
        product_ratio: [fastattr.ops.lrp_product_ratio_node][].
        ratio: [fastattr.ops.lrp_ratio_node][].
        ratio_shown: [fastattr.ops.lrp_ratio_shown_node][].
        passing: [fastattr.ops.lrp_pass_node][].
        linear: [fastattr.ops.lrp_linear_node][].
    """

    product: Callable[[Tensor], Tensor]
    product_ratio: Callable[[Tensor, Tensor, float], Tensor]
    ratio: Callable[[Tensor, float], Tensor]
    ratio_shown: Callable[[Tensor, Tensor, float], Tensor]
    passing: Callable[[Tensor, Tensor], Tensor]
    linear: Callable[[Tensor, Tensor, Tensor], Tensor]


_REFERENCE_NODES = LrpNodes(
    reference.lrp_product_node,
    reference.lrp_product_ratio_node,
    reference.lrp_ratio_node,
    reference.lrp_ratio_shown_node,
    reference.lrp_pass_node,
    reference.lrp_linear_node,
)
_COMPILED_NODES = (
    LrpNodes(
        torch.ops.fastattr.lrp_product_node.default,
        torch.ops.fastattr.lrp_product_ratio_node.default,
        torch.ops.fastattr.lrp_ratio_node.default,
        torch.ops.fastattr.lrp_ratio_shown_node.default,
        torch.ops.fastattr.lrp_pass_node.default,
        torch.ops.fastattr.lrp_linear_node.default,
    )
    if is_compiled()
    else _REFERENCE_NODES
)


def lrp_nodes() -> LrpNodes:
    """The LRP nodes of the backend in this context.

    Returns:
        The compiled nodes, or their twins under ``use_backend("reference")``.
    """
    return _COMPILED_NODES if backend_in_context() == "compiled" else _REFERENCE_NODES


# Every op goes by its twin's name.
__all__ = ["LrpNodes", "lrp_nodes", "reference", *reference.__all__]
