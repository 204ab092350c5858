"""IntegratedGradients: captum's API, streamed through the compiled path and quadrature ops."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from fastattr._formatting import (
    BaselineType,
    ColumnIndices,
    TargetType,
    TensorOrTuple,
    as_tensor_tuple,
    check_floating,
    check_target,
    format_additional_args,
    format_baselines,
    format_output,
    repeat_additional_args,
    repeat_target,
    run_forward,
)
from fastattr._model_state import kept_buffers
from fastattr._path_integral import PathIntegral
from fastattr._quadrature import check_steps
from fastattr.attr._base import (
    PathAttribution,
    convergence_delta,
    forward_row_sums,
    integrate_as_captum,
)


def path_delta(
    result: PathIntegral,
    forward_func: Any,
    ends: tuple[Tensor, ...],
    starts: tuple[Tensor, ...],
    target: TargetType | ColumnIndices,
    args: tuple[Any, ...] | None,
) -> Tensor:
    """Captum's delta, reusing the path's own outputs at its ends where the quadrature
    evaluated the model there."""
    start_out, end_out = result.start_output, result.end_output
    if start_out is None:
        starts = tuple(start.expand_as(end).contiguous() for start, end in zip(starts, ends))
        start_out = forward_row_sums(forward_func, starts, target, args)
    if end_out is None:
        end_out = forward_row_sums(forward_func, ends, target, args)
    return convergence_delta(result.row_sums, end_out, start_out)


class IntegratedGradients(PathAttribution, captum_class="IntegratedGradients"):
    """Integrated Gradients (Sundararajan et al., 2017), as ``captum.attr.IntegratedGradients``.

    The attribution of each input feature is the path integral of the model's gradient along
    the straight line from a baseline to the input, approximated by a quadrature rule and, by
    default, multiplied by ``inputs - baselines``.

    Unlike captum, the steps are streamed: the path is built and the gradients are reduced
    chunk by chunk by fastattr's kernels, with one backward pass per chunk, so memory is
    bounded by a chunk rather than by ``n_steps``. Results equal captum's up to float64
    rounding (captum's quadrature tables are used bit for bit).

    Args:
        forward_func: the model or any callable returning its output for the inputs
            (followed by ``additional_forward_args``).
        multiply_by_inputs: multiply the integrated gradients by ``inputs - baselines``
            (global attributions) or not (local attributions). Default: True.
    """

    def attribute(
        self,
        inputs: TensorOrTuple,
        baselines: BaselineType = None,
        target: TargetType = None,
        additional_forward_args: Any = None,
        n_steps: int = 50,
        method: str = "gausslegendre",
        internal_batch_size: int | None = None,
        return_convergence_delta: bool = False,
    ) -> TensorOrTuple | tuple[TensorOrTuple, Tensor]:
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
                step of the path, whatever their first dimension, as captum repeats them;
                anything else is passed as it is.
            n_steps: the number of quadrature nodes. Default: 50.
            method: ``"gausslegendre"`` (default), ``"riemann_left"``, ``"riemann_right"``,
                ``"riemann_middle"`` or ``"riemann_trapezoid"``.
            internal_batch_size: at most how many path points (steps times examples) to run
                at once, as in captum; None (default) sizes the chunks from free memory.
            return_convergence_delta: also return captum's convergence delta per example.

        Returns:
            The attributions, shaped as the inputs (a tensor for a tensor, a tuple for a
            tuple), in float32 for float16/bfloat16 inputs as in captum; with
            ``return_convergence_delta``, the pair ``(attributions, delta)``.
        """
        is_tuple = isinstance(inputs, tuple)
        ends = as_tensor_tuple(inputs)
        check_floating(
            ends,
            "inputs",
            "; integer inputs such as token ids are attributed through their embedding with "
            "LayerIntegratedGradients",
        )
        starts = format_baselines(baselines, ends)
        check_steps(method, n_steps)
        batch = ends[0].shape[0]
        target = check_target(target, batch)
        args = format_additional_args(additional_forward_args)

        def evaluate(paths: tuple[Tensor, ...], steps: int) -> Tensor:
            return run_forward(
                self.forward_func,
                paths,
                repeat_target(target, steps),
                repeat_additional_args(args, steps),
            )

        with kept_buffers(self.forward_func):
            result = integrate_as_captum(
                ends,
                starts,
                evaluate,
                batch=batch,
                forward_func=self.forward_func,
                n_steps=n_steps,
                internal_batch_size=internal_batch_size,
                method=method,
                multiply_by_inputs=self.multiplies_by_inputs,
                step_costs=self._step_costs,
            )
            attributions = format_output(is_tuple, result.attributions)
            if not return_convergence_delta:
                return attributions
            delta = path_delta(result, self.forward_func, ends, starts, target, args)
        return attributions, delta
