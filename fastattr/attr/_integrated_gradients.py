"""IntegratedGradients: captum's API, streamed through the compiled path and quadrature ops."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from fastattr._exact import check_method, forward_at_points, integrate_exact, steps_taken
from fastattr._formatting import (
    BaselineType,
    ColumnIndices,
    TargetType,
    TensorOrTuple,
    as_tensor_tuple,
    check_additional_args,
    check_floating,
    check_target,
    format_additional_args,
    format_baselines,
    format_output,
    per_example,
    repeat_additional_args,
    repeat_target,
    run_forward,
)
from fastattr._path_integral import (
    PathIntegral,
    integrate_path,
    steps_per_chunk_for,
)
from fastattr.attr._base import PathAttribution, forward_per_example


def convergence_delta(
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
        start_out = forward_per_example(forward_func, starts, target, args)
    if end_out is None:
        end_out = forward_per_example(forward_func, ends, target, args)
    return result.row_sums - (end_out - start_out)


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
        return_n_steps: bool = False,
    ) -> TensorOrTuple | tuple[TensorOrTuple, Tensor] | tuple[TensorOrTuple, Tensor, Tensor]:
        """Attribute the selected output of ``forward_func`` to ``inputs``.

        Args:
            inputs: a tensor, or a tuple of tensors, with the examples along dimension 0
                (the same number in each) and floating point values.
            baselines: where each path starts: None (zeros), a number, a tensor of the input's
                shape or with a first dimension of 1 (or any shape that broadcasts to the
                input), or a tuple of those, one per input tensor.
            target: which output to attribute when the output has more than one value per
                example: an int or a tuple of ints (the same for every example), a list or a
                1-D tensor with one index per example, or a list of tuples.
            additional_forward_args: further arguments of ``forward_func``, after the inputs.
                Tensors with a batch dimension are repeated along the path with the inputs;
                anything else is passed as it is.
            n_steps: the number of quadrature nodes. Default: 50. Not used by ``"exact"``.
            method: ``"gausslegendre"`` (default), ``"riemann_left"``, ``"riemann_right"``,
                ``"riemann_middle"`` or ``"riemann_trapezoid"``; or ``"exact"`` for a
                piecewise-linear model (ReLU, max pooling, ...): the path is split where the
                model's kinks are crossed and the integral is a finite sum, complete to float
                rounding (see ``docs/methods/exact.md``).
            internal_batch_size: at most how many path points (steps times examples) to run
                at once, as in captum; None (default) sizes the chunks from free memory.
            return_convergence_delta: also return captum's convergence delta per example.
            return_n_steps: also return how many gradient evaluations each example's path
                took: a (B,) int64 tensor, ``n_steps`` for a quadrature rule and the number of
                affine pieces of the path for ``"exact"``. Not in captum.

        Returns:
            The attributions, shaped as the inputs (a tensor for a tensor, a tuple for a
            tuple), in float32 for float16/bfloat16 inputs as in captum; with
            ``return_convergence_delta``, the pair ``(attributions, delta)``; with
            ``return_n_steps``, the steps come last: ``(attributions, [delta,] steps)``.

        Raises:
            ValueError: with ``method="exact"``, the model applies an operation that is not
                piecewise linear to values that depend on the input (the message names the
                module and the source line), or runs batch norm or dropout in training mode.

        Examples:
            >>> import torch
            >>> from torch import nn
            >>> from fastattr import IntegratedGradients
            >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
            >>> inputs = torch.randn(2, 4)
            >>> attributions, delta, pieces = IntegratedGradients(model).attribute(
            ...     inputs, target=1, method="exact", return_convergence_delta=True,
            ...     return_n_steps=True,
            ... )
            >>> bool(delta.abs().max() < 1e-5), pieces.shape
            (True, torch.Size([2]))
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
        exact = check_method(method, n_steps)
        batch = ends[0].shape[0]
        target = check_target(target, batch)
        args = format_additional_args(additional_forward_args)
        check_additional_args(args, batch)

        def evaluate(paths: tuple[Tensor, ...], steps: int) -> Tensor:
            output = run_forward(
                self.forward_func,
                paths,
                repeat_target(target, steps),
                repeat_additional_args(args, steps),
            )
            return per_example(output, steps * batch)

        if exact:
            result = integrate_exact(
                ends,
                starts,
                forward_at_points(self.forward_func, target, args),
                multiply_by_inputs=self.multiplies_by_inputs,
                internal_batch_size=internal_batch_size,
                model=self.forward_func,
            )
        else:
            result = integrate_path(
                ends,
                starts,
                evaluate,
                method=method,
                n_steps=n_steps,
                steps_per_chunk=steps_per_chunk_for(internal_batch_size, batch),
                multiply_by_inputs=self.multiplies_by_inputs,
                model=self.forward_func,
                step_costs=self._step_costs,
            )
        attributions = format_output(is_tuple, result.attributions)
        extras = []
        if return_convergence_delta:
            extras.append(convergence_delta(result, self.forward_func, ends, starts, target, args))
        if return_n_steps:
            extras.append(steps_taken(result, n_steps, batch, ends[0].device))
        return (attributions, *extras) if extras else attributions
