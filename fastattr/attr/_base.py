"""What the integrated-gradients methods share beyond the path: the forward function, the
multiply-by-inputs switch and captum's convergence delta."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import Tensor

from fastattr._formatting import (
    BaselineType,
    ColumnIndices,
    TargetType,
    TensorOrTuple,
    as_tensor_tuple,
    check_additional_args,
    check_target,
    format_additional_args,
    format_baselines,
    run_forward,
)


def forward_per_example(
    forward_func: Callable[..., Any],
    inputs: tuple[Tensor, ...],
    target: TargetType | ColumnIndices,
    args: tuple[Any, ...] | None,
) -> Tensor:
    """The selected output summed per example, without a graph (captum's delta convention)."""
    batch = inputs[0].shape[0]
    with torch.no_grad():
        output = run_forward(forward_func, inputs, target, args)
    # An explicit width: reshape(0, -1) is ambiguous for an empty batch.
    return output.reshape(batch, output.numel() // max(batch, 1)).sum(1)


class PathAttribution:
    """Base of the integrated-gradients methods."""

    def __init__(self, forward_func: Callable[..., Any], multiply_by_inputs: bool = True) -> None:
        if not callable(forward_func):
            raise TypeError(f"forward_func must be callable, got {type(forward_func).__name__}")
        self.forward_func = forward_func
        self._multiply_by_inputs = bool(multiply_by_inputs)
        # Bytes one step of the path takes, per input signature: measured once, so later
        # calls size their chunks without a measuring chunk.
        self._step_costs: dict[Hashable, int] = {}

    @property
    def multiplies_by_inputs(self) -> bool:
        """Whether attributions are the integrated gradients times ``inputs - baselines``."""
        return self._multiply_by_inputs

    def has_convergence_delta(self) -> bool:
        """Integrated gradients have a convergence delta: always True."""
        return True

    def compute_convergence_delta(
        self,
        attributions: TensorOrTuple,
        start_point: BaselineType,
        end_point: TensorOrTuple,
        target: TargetType = None,
        additional_forward_args: Any = None,
    ) -> Tensor:
        """Per example, the sum of the attributions minus the change of the model's output
        between ``start_point`` and ``end_point`` (zero for an exact integral).

        Args:
            attributions: attributions of the examples, a tensor or a tuple of tensors, each
                with the examples along dimension 0.
            start_point: where the path starts (the baselines), in any form ``attribute``
                accepts for baselines.
            end_point: where the path ends (the inputs).
            target: the output to attribute, as in ``attribute``.
            additional_forward_args: further arguments of ``forward_func``, as in ``attribute``.

        Returns:
            A (B,) tensor of deltas.
        """
        ends = as_tensor_tuple(end_point, "end_point")
        starts = tuple(
            start.expand_as(end).contiguous()
            for start, end in zip(format_baselines(start_point, ends), ends)
        )
        attribution_tuple = as_tensor_tuple(attributions, "attributions")
        batch = ends[0].shape[0]
        if attribution_tuple[0].shape[0] != batch:
            raise ValueError(
                f"attributions and end_point must have the same number of examples, got "
                f"{attribution_tuple[0].shape[0]} and {batch}"
            )
        target = check_target(target, batch)
        args = format_additional_args(additional_forward_args)
        check_additional_args(args, batch)
        start_out = forward_per_example(self.forward_func, starts, target, args)
        end_out = forward_per_example(self.forward_func, ends, target, args)
        attribution_sum = sum(a.reshape(batch, -1).sum(1) for a in attribution_tuple)
        return attribution_sum - (end_out - start_out)
