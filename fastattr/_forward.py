"""Running the model and reading its output: captum's target selection, and the selected
output as the value per example (or per path row) to differentiate."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from fastattr._formatting import ColumnIndices, TargetType, check_target


def _check_index(index: int, size: int, what: str) -> None:
    if not -size <= index < size:
        raise IndexError(f"target {what} {index} is out of range for an output dimension of {size}")


def _check_tuple_list(target: list[tuple], output: Tensor) -> None:
    """A list of per-example index tuples (all of one length, see check_target) against the
    output, so that a bad one is named rather than failing inside the indexing."""
    depth = len(target[0])
    if depth > output.dim() - 1:
        raise IndexError(
            f"target tuples hold {depth} indices, more than the output of shape "
            f"{list(output.shape)} has dimensions after the batch"
        )
    for position in range(depth):
        size = output.shape[position + 1]
        values = [index[position] for index in target if isinstance(index[position], int)]
        if values and (min(values) < -size or max(values) >= size):
            bad = min(values) if min(values) < -size else max(values)
            raise IndexError(
                f"target holds index {bad} at position {position} of its tuples, out of range "
                f"for an output dimension of {size}"
            )


def select_targets(output: Tensor, target: TargetType | ColumnIndices) -> Tensor:
    """The per-example value to attribute: captum's target semantics, with range checks."""
    if not isinstance(output, Tensor):
        hint = ""
        if isinstance(getattr(output, "logits", None), Tensor):
            # HuggingFace's models return a ModelOutput (as captum, fastattr takes a tensor).
            hint = (
                ": it holds .logits, so attribute a function returning them, such as "
                "`lambda *args: model(*args).logits`"
            )
        raise TypeError(f"forward_func must return a tensor, got {type(output).__name__}{hint}")
    if target is None:
        return output
    if output.dim() < 2:
        raise ValueError(
            f"target {target!r} needs an output with a dimension to select from; the output "
            f"has shape {list(output.shape)}"
        )
    if isinstance(target, Tensor):  # not through check_target
        target = check_target(target, output.shape[0])
    if isinstance(target, (int, tuple)):
        index = (target,) if isinstance(target, int) else target
        if len(index) > output.dim() - 1:
            raise OutputShapeError(
                f"target {target!r} has more indices than the output of shape "
                f"{list(output.shape)} has dimensions after the batch"
            )
        for dim, i in enumerate(index, start=1):
            if isinstance(i, int):
                _check_index(i, output.shape[dim], "index")
        return output[(slice(None), *index)]
    if isinstance(target, list) and target and isinstance(target[0], tuple):
        _check_tuple_list(target, output)
        return torch.stack([output[(row, *index)] for row, index in enumerate(target)])
    if isinstance(target, ColumnIndices):
        indices, low, high = target.indices, target.low, target.high
    else:
        indices = torch.tensor(target, dtype=torch.long, device=output.device)
        low, high = (min(target), max(target)) if target else (0, -1)
    if output.dim() != 2:
        raise ValueError(
            f"per-example integer targets need a 2-D output, got shape {list(output.shape)}"
        )
    if low <= high and (low < -output.shape[1] or high >= output.shape[1]):
        raise IndexError(
            f"target holds indices in [{low}, {high}], out of range for an output with "
            f"{output.shape[1]} columns"
        )
    indices = indices.to(output.device).reshape(-1, 1)
    if low < 0:  # negative indices count from the end, as in captum
        indices = indices % output.shape[1]
    return output.gather(1, indices).squeeze(1)


def run_forward(
    forward_func: Callable[..., Any],
    inputs: tuple[Tensor, ...],
    target: TargetType | ColumnIndices,
    additional_args: tuple[Any, ...] | None,
) -> Tensor:
    output = forward_func(*inputs, *(additional_args or ()))
    return select_targets(output, target)


def check_differentiable(output: Tensor) -> None:
    """Refuses a selected output without a graph before the backward, whose own error
    ("element 0 of tensors does not require grad") names neither the argument nor the cause."""
    if not output.requires_grad:
        raise RuntimeError(
            f"the output to attribute (the target's, or the neuron's) has no gradient: a "
            f"{output.dtype} tensor outside autograd's graph. forward_func (the model) must "
            "compute it with gradients on: not under torch.no_grad(), not detached, not from "
            "integers (argmax, a comparison)"
        )


class OutputShapeError(ValueError, AssertionError):
    """The output (or a layer's values) can't be selected or differentiated as captum does:
    a target or neuron selector with more indices than there are dimensions after the batch,
    no target for an output with several values per example. A ValueError, and an
    AssertionError too, which is what captum raises there, so that code catching captum's
    error catches fastattr's."""


class RowsCoupled(Exception):
    """The selected output is not one value per row of the path: its gradient then depends on
    which rows each forward sees, so the path must be chunked as captum chunks it."""


def path_output(output: Tensor, rows: int, whole: bool, what: str = "forward_func") -> Tensor:
    """The selected output of a forward over ``rows`` rows of the path, to be differentiated.

    One value per row; or, as captum allows, any output holding one value per entry of its
    first dimension (its gradient is that of their sum), when the forward saw the rows
    captum's forward sees (``whole``; otherwise `RowsCoupled` is raised).
    """
    if output.dim() > 0 and output.numel() == output.shape[0]:
        if output.shape[0] == rows:
            # (A reshape to its own shape would still add a node to the graph.)
            return output if output.dim() == 1 else output.reshape(rows)
        if whole:
            return output.reshape(-1)
        raise RowsCoupled
    hint = (
        ": pass a target that selects one output per example"
        if what == "forward_func"
        else ": index every dimension after the batch, or use slices to sum a region"
    )
    raise OutputShapeError(
        f"{what} must give one value per example ({rows} values), or one value per entry of "
        f"its first dimension, got shape {list(output.shape)}{hint}"
    )


def row_sums(output: Tensor) -> Tensor:
    """The output summed over all but its first dimension (captum's convention for deltas)."""
    if output.dim() == 0:
        raise ValueError("forward_func must return an output with a first dimension, got a scalar")
    return output if output.dim() == 1 else output.flatten(1).sum(1)
