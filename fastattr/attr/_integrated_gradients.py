"""IntegratedGradients: captum's API, streamed through the compiled path and quadrature ops."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from fastattr._formatting import (
    BaselineType,
    TargetType,
    TensorOrTuple,
    as_tensor_tuple,
    check_target,
    check_target_sequence,
    format_additional_args,
    format_baselines,
    format_output,
    note_integer_inputs,
    path_inputs,
)
from fastattr._forward import path_output, select_targets
from fastattr._model_state import kept_buffers
from fastattr._path_integral import (
    PathIntegral,
    PathOptions,
    PointRows,
    args_for_points,
    convergence_deltas,
    integrate,
    needs_whole_steps,
    outputs_per_example,
    steps_per_chunk_for,
    targets_for_points,
    with_extras,
)
from fastattr.attr._base import PathAttribution


def path_deltas(
    result: PathIntegral,
    forward_func: Any,
    ends: tuple[Tensor, ...],
    starts: tuple[Tensor, ...],
    targets: list[Any],
    args: tuple[Any, ...] | None,
) -> list[Tensor]:
    """Captum's delta per target, reusing the path's own outputs at its ends where the
    quadrature evaluated the model there for every example."""
    start_outs, end_outs = result.start_outputs, result.end_outputs
    if start_outs is None:
        starts = tuple(start.expand_as(end).contiguous() for start, end in zip(starts, ends))
        start_outs = outputs_per_example(forward_func, starts, targets, args)
    if end_outs is None:
        end_outs = outputs_per_example(forward_func, ends, targets, args)
    return convergence_deltas(result.row_sums, end_outs, start_outs)


class IntegratedGradients(PathAttribution, captum_class="IntegratedGradients"):
    """Integrated Gradients (Sundararajan et al., 2017), as ``captum.attr.IntegratedGradients``.

    The attribution of each input feature is the path integral of the model's gradient along
    the straight line from a baseline to the input, approximated by a quadrature rule and, by
    default, multiplied by ``inputs - baselines``.

    Unlike captum, the path is streamed: its points are built and their gradients reduced
    chunk by chunk by fastattr's kernels, with one backward pass per chunk, so memory is
    bounded by a chunk rather than by ``n_steps`` or the batch. Results equal captum's up to
    float64 rounding (captum's quadrature tables are used bit for bit).

    Args:
        forward_func: the model or any callable returning its output for the inputs
            (followed by ``additional_forward_args``).
        multiply_by_inputs: multiply the integrated gradients by ``inputs - baselines``
            (global attributions) or not (local attributions). Default: True.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from fastattr import IntegratedGradients
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
        >>> inputs = torch.randn(2, 4)
        >>> attributions, delta = IntegratedGradients(model).attribute(
        ...     inputs, target=1, return_convergence_delta=True
        ... )
        >>> attributions.shape, delta.shape
        (torch.Size([2, 4]), torch.Size([2]))
    """

    def attribute(
        self,
        inputs: TensorOrTuple,
        baselines: BaselineType = None,
        target: TargetType = None,
        additional_forward_args: Any = None,
        n_steps: int | str = 50,
        method: str = "gausslegendre",
        internal_batch_size: int | None = None,
        return_convergence_delta: bool = False,
        return_n_steps: bool = False,
        tolerance: float | None = None,
        max_steps: int | None = None,
    ) -> Any:
        """Attribute the selected output of ``forward_func`` to ``inputs``.

        Args:
            inputs: a tensor, or a tuple of tensors, with the examples along dimension 0
                (the same number in each) and floating point values.
            baselines: where each path starts: None (zeros), a number, a tensor of the input's
                shape or with a first dimension of 1 (or any shape that broadcasts to the
                input), or a tuple of those, one per input tensor.
            target: which output to attribute when the output has more than one value per
                example: an int or a tuple of ints (the same for every example), a list or a
                1-D tensor with one index per example, or a list of tuples. As in captum, a
                selected output that is not one value per example but one value per entry of
                its first dimension (``model(x)[0].unsqueeze(0)``) is differentiated as the
                sum of its values; each forward then sees the rows captum's forward sees.
            additional_forward_args: further arguments of ``forward_func``, after the inputs.
                Tensors with at least one dimension are repeated along dimension 0 once per
                step that a forward holds, whatever their first dimension, as captum repeats
                them (a forward that sums or measures one whose first dimension is not the
                batch needs captum's ``internal_batch_size``: see ``docs/captum.md``);
                anything else is passed as it is.
            n_steps: the number of quadrature nodes (default: 50), or ``"auto"``: each
                example gets the points its path needs to reach ``tolerance`` (see
                ``docs/methods/integrated-gradients.md``). Not in captum. Not used by
                ``method="exact"``.
            method: ``"gausslegendre"`` (default), ``"riemann_left"``, ``"riemann_right"``,
                ``"riemann_middle"`` or ``"riemann_trapezoid"``. With ``n_steps="auto"``,
                ``"gausslegendre"`` (nested Gauss-Patterson levels, then bisection where the
                path has kinks) or ``"riemann_trapezoid"`` (bisection). Or ``"exact"`` for a
                piecewise-linear model (ReLU, max pooling, ...): the path is split where the
                model's kinks are crossed and the integral is a finite sum, complete to float
                rounding (see ``docs/methods/exact.md``). Not in captum.
            internal_batch_size: at most how many path points (steps times examples) to run
                at once, as in captum; None (default) sizes the chunks from free memory.
            return_convergence_delta: also return captum's convergence delta per example.
            return_n_steps: also return how many path points (gradient evaluations) each
                example took, a (B,) int64 tensor: ``n_steps`` for a fixed rule, the points
                ``"auto"`` chose, the affine pieces of the path for ``"exact"``. Not in
                captum.
            tolerance: with ``n_steps="auto"``, the completeness error each example must reach:
                ``|sum(attributions) - (f(inputs) - f(baselines))|`` at most ``tolerance *
                max(|f(inputs) - f(baselines)|, 1)``. Default: 1e-3.
            max_steps: with ``n_steps="auto"``, at most this many points (gradient evaluations) per
                example, at least 2; the two forwards at the ends come on top. Default: 128.

        Returns:
            The attributions, shaped as the inputs (a tensor for a tensor, a tuple for a
            tuple), in float32 for float16/bfloat16 inputs as in captum; followed, when asked,
            by the delta and then the steps: ``(attributions, delta)``, ``(attributions,
            steps)`` or ``(attributions, delta, steps)``.

        Raises:
            ValueError: an argument is out of range (each error names it), e.g. ``tolerance``
                or ``max_steps`` without ``n_steps="auto"``, or ``"auto"`` with a method whose
                nodes do not nest; with ``method="exact"``, the model applies an operation
                that is not piecewise linear to values that depend on the input (the message
                names the module and the source line), or runs batch norm or dropout in
                training mode.
            TypeError: an argument has the wrong type.

        Examples:
            >>> import torch
            >>> from torch import nn
            >>> from fastattr import IntegratedGradients
            >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
            >>> inputs = torch.randn(2, 4)
            >>> attributions, delta, steps = IntegratedGradients(model).attribute(
            ...     inputs, target=1, n_steps="auto", tolerance=1e-4,
            ...     return_convergence_delta=True, return_n_steps=True,
            ... )
            >>> bool((delta.abs() <= 1e-4 * (1 + delta.abs().max())).all()), steps.shape
            (True, torch.Size([2]))
            >>> attributions, delta, pieces = IntegratedGradients(model).attribute(
            ...     inputs, target=1, method="exact", return_convergence_delta=True,
            ...     return_n_steps=True,
            ... )
            >>> bool(delta.abs().max() < 1e-5), pieces.shape
            (True, torch.Size([2]))
        """
        (result,) = self._attribute_targets(
            inputs,
            baselines,
            lambda batch: [check_target(target, batch)],
            additional_forward_args,
            PathOptions(n_steps, method, internal_batch_size, tolerance, max_steps),
            return_convergence_delta,
            return_n_steps,
        )
        return result

    def attribute_targets(
        self,
        inputs: TensorOrTuple,
        targets: Any,
        baselines: BaselineType = None,
        additional_forward_args: Any = None,
        n_steps: int | str = 50,
        method: str = "gausslegendre",
        internal_batch_size: int | None = None,
        return_convergence_delta: bool = False,
        return_n_steps: bool = False,
        tolerance: float | None = None,
        max_steps: int | None = None,
    ) -> list[Any]:
        """Attribute several targets at once, each as
        [attribute][fastattr.IntegratedGradients.attribute] would.

        One forward pass per chunk of the path serves all targets, then one backward pass
        per target.

        Args:
            inputs: as in ``attribute``.
            targets: K targets, a list or a tuple (or a tensor: one target per entry of its
                first dimension), each in any form ``attribute``'s ``target`` takes.
            baselines: as in ``attribute``.
            additional_forward_args: as in ``attribute``.
            n_steps: as in ``attribute``. With ``"auto"`` each target's paths get their
                own points, so the targets no longer share forward passes.
            method: as in ``attribute``.
            internal_batch_size: as in ``attribute``: path points per chunk (for all
                targets together).
            return_convergence_delta: as in ``attribute``.
            return_n_steps: as in ``attribute``.
            tolerance: as in ``attribute``.
            max_steps: as in ``attribute``.

        Returns:
            A list of K results; result ``k`` equals (to float rounding)
            ``attribute(inputs, target=targets[k], ...)`` with the same other arguments.

        Raises:
            ValueError: ``targets`` is empty, or mixes None with indexing targets.
            TypeError: ``targets`` is not a sequence.

        Examples:
            >>> import torch
            >>> from torch import nn
            >>> from fastattr import IntegratedGradients
            >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
            >>> inputs = torch.randn(2, 4)
            >>> per_class = IntegratedGradients(model).attribute_targets(inputs, [0, 1, 2])
            >>> len(per_class), per_class[0].shape
            (3, torch.Size([2, 4]))
        """
        return self._attribute_targets(
            inputs,
            baselines,
            lambda batch: check_target_sequence(targets, batch, check_target),
            additional_forward_args,
            PathOptions(n_steps, method, internal_batch_size, tolerance, max_steps),
            return_convergence_delta,
            return_n_steps,
        )

    def _attribute_targets(
        self,
        inputs: TensorOrTuple,
        baselines: BaselineType,
        checked_targets: Callable[[int], list[Any]],
        additional_forward_args: Any,
        options: PathOptions,
        return_convergence_delta: bool,
        return_n_steps: bool,
    ) -> list[Any]:
        is_tuple = isinstance(inputs, tuple)
        given = as_tensor_tuple(inputs)
        ends = path_inputs(given)
        starts = format_baselines(baselines, ends)
        adaptive = options.check()
        batch = ends[0].shape[0]
        targets = checked_targets(batch)
        args = format_additional_args(additional_forward_args)

        def evaluate(paths: tuple[Tensor, ...], rows: PointRows) -> list[Tensor]:
            output = self.forward_func(*paths, *args_for_points(args, rows))
            return [
                path_output(
                    select_targets(output, targets_for_points(t, rows)), len(rows), rows.as_captum
                )
                for t in targets
            ]

        try:
            with kept_buffers(self.forward_func):
                result, steps = integrate(
                    ends,
                    starts,
                    evaluate,
                    batch=batch,
                    method=options.method,
                    n_steps=options.n_steps,
                    adaptive=adaptive,
                    targets=len(targets),
                    steps_per_chunk=steps_per_chunk_for(options.internal_batch_size, batch),
                    multiply_by_inputs=self.multiplies_by_inputs,
                    model=self.forward_func,
                    whole_steps=needs_whole_steps(args, batch),
                    step_costs=self._step_costs,
                )
                deltas: list[Any] = [None] * len(targets)
                if return_convergence_delta:
                    deltas = path_deltas(result, self.forward_func, ends, starts, targets, args)
        except Exception as error:
            note_integer_inputs(error, given)
            raise
        attributions = [format_output(is_tuple, a) for a in result.attributions]
        return [
            with_extras(a, delta, s if return_n_steps else None)
            for a, delta, s in zip(attributions, deltas, steps)
        ]
