"""Captum's argument conventions (inputs, baselines, targets, additional forward arguments),
checked up front so that bad input fails with an error naming the argument."""

from __future__ import annotations

import numbers
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import Tensor

TensorOrTuple = Union[Tensor, tuple[Tensor, ...]]
Baseline = Union[None, int, float, Tensor]
BaselineType = Union[Baseline, tuple[Baseline, ...]]
TargetType = Union[None, int, tuple, Tensor, list]


def as_int(value: Any, name: str, expected: str = "an int") -> int:
    """``value`` as a Python int. Takes what captum takes for counts: ints and integer-likes
    (numpy integers, 0-dim integer tensors); never bools or floats."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError(f"{name} must be {expected}, got {type(value).__name__}")


def as_tensor_tuple(inputs: Any, name: str = "inputs") -> tuple[Tensor, ...]:
    """``inputs`` as a non-empty tuple of tensors sharing a batch size and a device."""
    if isinstance(inputs, Tensor) and inputs.dim() > 0:  # the common case, without the loops
        return (inputs,)
    tensors = inputs if isinstance(inputs, tuple) else (inputs,)
    if not tensors or not all(isinstance(t, Tensor) for t in tensors):
        got = type(inputs).__name__
        if isinstance(inputs, tuple):
            got += f" of {[type(t).__name__ for t in tensors]}"
        raise TypeError(f"{name} must be a tensor or a non-empty tuple of tensors, got {got}")
    for i, tensor in enumerate(tensors):
        if tensor.dim() == 0:
            raise ValueError(f"{name}[{i}] must have a batch dimension, got a 0-dim tensor")
    batch = tensors[0].shape[0]
    if any(t.shape[0] != batch for t in tensors):
        raise ValueError(
            f"every tensor in {name} must have the same batch size (dimension 0), got "
            f"{[t.shape[0] for t in tensors]}"
        )
    if any(t.device != tensors[0].device for t in tensors):
        raise ValueError(
            f"every tensor in {name} must be on one device, got {[str(t.device) for t in tensors]}"
        )
    return tensors


def check_floating(tensors: Sequence[Tensor], name: str, hint: str = "") -> None:
    for i, tensor in enumerate(tensors):
        if not tensor.is_floating_point():
            raise TypeError(
                f"{name}[{i}] must be a floating point tensor to be integrated along a path, "
                f"got {tensor.dtype}{hint}"
            )


def path_inputs(inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """The inputs as a path runs through them: integer ones (pixel values, counts) in the
    default floating dtype, as captum's path makes them (their differences from the baselines
    then taken in that dtype, where captum's wrap around in uint8). Booleans are refused."""
    for i, tensor in enumerate(inputs):
        if tensor.dtype == torch.bool or tensor.is_complex():
            raise TypeError(
                f"inputs[{i}] must be a real number tensor to be integrated along a path, got "
                f"{tensor.dtype}"
            )
    dtype = torch.get_default_dtype()
    return tuple(t if t.is_floating_point() else t.to(dtype) for t in inputs)


def note_integer_inputs(error: BaseException, inputs: tuple[Tensor, ...]) -> None:
    """Adds to an error raised by the model which of its inputs were integers made floating
    point for the path (token ids then fail in the embedding, in captum too), and what to do.
    (Exception notes exist from Python 3.11.)"""
    integers = [
        f"inputs[{i}] ({x.dtype})" for i, x in enumerate(inputs) if not x.is_floating_point()
    ]
    if integers and hasattr(error, "add_note"):
        error.add_note(
            f"{', '.join(integers)} ran through the model along the path in "
            f"{torch.get_default_dtype()}, as captum runs them; integer inputs such as token "
            "ids are attributed through their embedding with LayerIntegratedGradients"
        )


def format_output(is_tuple: bool, tensors: tuple[Tensor, ...]) -> TensorOrTuple:
    return tensors if is_tuple else tensors[0]


def baseline_tuple(baselines: BaselineType, inputs: tuple[Tensor, ...]) -> tuple[Any, ...]:
    """``baselines`` as a tuple with one entry per input (None: zeros), as given otherwise."""
    if baselines is None:
        baselines = (0,) * len(inputs)
    elif not isinstance(baselines, tuple):
        baselines = (baselines,)
    if len(baselines) != len(inputs):
        hint = ""
        if isinstance(baselines[0], list) and len(baselines[0]) == len(inputs):
            hint = " (a list is one baseline, as in captum: give several as a tuple)"
        raise ValueError(
            f"baselines must give one baseline per input tensor: {len(inputs)} inputs, "
            f"{len(baselines)} baselines{hint}"
        )
    return baselines


def format_baselines(baselines: BaselineType, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """One baseline tensor per input, in its dtype and on its device, broadcastable to it.

    Accepts what captum does (None for zeros, a number, a tensor of the input's shape or with
    a first dimension of 1, or a tuple mixing those), and any other broadcastable shape.
    """
    baselines = baseline_tuple(baselines, inputs)
    formatted = []
    for i, (baseline, inp) in enumerate(zip(baselines, inputs)):
        if baseline is None:
            baseline = 0
        integer_input = not (inp.is_floating_point() or inp.is_complex())
        if isinstance(baseline, numbers.Number) and not isinstance(baseline, bool):
            if integer_input and not float(baseline).is_integer():
                # (It would be truncated: a baseline of 0.5 token ids is token 0.)
                raise ValueError(
                    f"baselines[{i}] must be a whole number for integer inputs[{i}] "
                    f"({inp.dtype}), got {baseline}"
                )
            # A fill on the device: torch.tensor would copy from the host and synchronize.
            formatted.append(torch.full((), baseline, dtype=inp.dtype, device=inp.device))
            continue
        if not isinstance(baseline, Tensor):
            raise TypeError(
                f"baselines[{i}] must be a number or a tensor, got {type(baseline).__name__}"
            )
        if baseline.device != inp.device:
            raise ValueError(
                f"baselines[{i}] must be on the device of inputs[{i}] ({inp.device}), "
                f"got {baseline.device}"
            )
        if integer_input and (baseline.is_floating_point() or baseline.is_complex()):
            # Its values would be truncated to integers; captum's forward refuses it.
            raise TypeError(
                f"baselines[{i}] must be an integer tensor for integer inputs[{i}] "
                f"({inp.dtype}), got {baseline.dtype}"
            )
        offset = inp.dim() - baseline.dim()
        fits = offset >= 0 and all(
            size in (1, inp.shape[d + offset]) for d, size in enumerate(baseline.shape)
        )
        if not fits:
            raise ValueError(
                f"baselines[{i}] of shape {list(baseline.shape)} does not broadcast to "
                f"inputs[{i}] of shape {list(inp.shape)}: expected a number, the input's shape, "
                "or the input's shape with a first dimension of 1"
            )
        formatted.append(baseline.to(inp.dtype))
    return tuple(formatted)


def format_additional_args(args: Any) -> tuple[Any, ...] | None:
    if args is None:
        return None
    return args if isinstance(args, tuple) else (args,)


@dataclass(frozen=True)
class ColumnIndices:
    """A tensor target of one column per example, with its smallest and largest index read
    once per call: on a GPU, reading them is a synchronization, which every forward of a
    chunked path would otherwise pay."""

    indices: Tensor
    low: int
    high: int


def check_target(target: TargetType, batch: int) -> TargetType | ColumnIndices:
    """The forms captum accepts, checked against the batch before any work is done.

    Returns the target to pass on: as given, except that a one-element tensor becomes its int
    and a tensor of per-example indices a `ColumnIndices`.
    """
    if target is None or (isinstance(target, int) and not isinstance(target, bool)):
        return target
    if isinstance(target, tuple):
        if not all(isinstance(t, (int, slice)) for t in target):
            raise TypeError(f"a tuple target must hold ints, got {target!r}")
        return target
    if isinstance(target, Tensor):
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TypeError(f"a tensor target must hold integers, got {target.dtype}")
        if target.numel() != 1 and (target.dim() != 1 or target.numel() != batch):
            raise ValueError(
                f"a tensor target must hold one index, or one per example ({batch}), "
                f"got shape {list(target.shape)}"
            )
        if target.numel() == 1:
            return int(target.item())
        if target.dtype not in (torch.int32, torch.int64):  # gather indexes with these alone
            target = target.long()
        if batch == 0:
            return ColumnIndices(target, 0, -1)
        low, high = torch.stack(torch.aminmax(target)).tolist()
        return ColumnIndices(target, low, high)
    if isinstance(target, list):
        if len(target) != batch:
            raise ValueError(
                f"a list target must have one entry per example ({batch}), got {len(target)}"
            )
        if target and not (
            all(isinstance(t, int) and not isinstance(t, bool) for t in target)
            or all(isinstance(t, tuple) for t in target)
        ):
            raise TypeError("a list target must hold ints, or tuples of ints, one per example")
        if target and isinstance(target[0], tuple):
            for i, index in enumerate(target):
                if not all(isinstance(t, (int, slice)) for t in index):
                    raise TypeError(f"target[{i}] must hold ints (or slices), got {index!r}")
            lengths = sorted({len(index) for index in target})
            if len(lengths) > 1:
                raise ValueError(
                    "a list target of tuples must give every example the same number of "
                    f"indices, got tuples of lengths {lengths}"
                )
        return target
    raise TypeError(
        f"target must be None, an int, a tuple, a list or a tensor, got {type(target).__name__}"
    )


def check_target_sequence(
    targets: Any, batch: int, check: Callable[[Any, int], Any], name: str = "targets"
) -> list[Any]:
    """The K targets of ``attribute_targets``: a non-empty list or tuple (or a tensor, one
    target per entry of dimension 0), each checked by ``check`` as ``target=`` would be.

    Args:
        targets: What the user passed.
        batch: The number of examples.
        check: Checks one target for ``batch`` examples and returns it in the form used.
        name: The argument's name, for the errors.

    Returns:
        The checked targets, in order.
    """
    if isinstance(targets, Tensor) and targets.dim() > 0:
        targets = list(targets.unbind(0))
    if not isinstance(targets, (list, tuple)):
        raise TypeError(
            f"{name} must be a list or tuple of targets (or a tensor with one per entry of "
            f"dimension 0), got {type(targets).__name__}"
        )
    if not targets:
        raise ValueError(f"{name} must hold at least one target, got an empty sequence")
    checked = []
    for k, target in enumerate(targets):
        try:
            checked.append(check(target, batch))
        except (TypeError, ValueError, IndexError) as error:
            raise type(error)(f"{name}[{k}]: {error}") from None
    if any(t is None for t in checked) and not all(t is None for t in checked):
        raise ValueError(
            f"{name} mixes None (the output is one value per example) with targets that index "
            "the output: one forward can't serve both"
        )
    return checked
