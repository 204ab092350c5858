"""The attribution protocol every public fastattr class follows (captum's), and what the
integrated-gradients methods share beyond the path: the forward function, the
multiply-by-inputs switch and captum's convergence delta."""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fastattr import _captum
from fastattr._formatting import (
    BaselineType,
    ColumnIndices,
    RowsCoupled,
    TargetType,
    TensorOrTuple,
    as_int,
    as_tensor_tuple,
    check_target,
    format_additional_args,
    format_baselines,
    path_output,
    row_sums,
    run_forward,
)
from fastattr._model_state import uses_batch_statistics
from fastattr._path_integral import Evaluate, PathIntegral, integrate_path, steps_per_chunk_for


def _entry_point(attribute: Callable[..., Any]) -> Callable[..., Any]:
    """``attribute`` behind a wrapper whose ``__wrapped__`` is the method itself: captum's
    wrappers (NoiseTunnel) call ``method.attribute.__wrapped__(method, ...)``, since captum's
    own ``attribute`` methods carry a logging decorator."""

    @functools.wraps(attribute)
    def entry_point(self: Any, *args: Any, **kwargs: Any) -> Any:
        return attribute(self, *args, **kwargs)

    return entry_point


class Attribution:
    """Base of every public fastattr attribution class: captum's attribution protocol.

    It gives ``forward_func``, ``attribute.__wrapped__`` (each subclass's ``attribute`` is
    wrapped once, at class creation), ``attribute_future``, ``get_name``,
    ``has_convergence_delta`` and ``multiplies_by_inputs``, with captum's meanings. A subclass
    that names the captum class it replaces (``captum_class="IntegratedGradients"`` in its
    class statement) also becomes a subclass of that class once ``captum.attr`` is imported,
    before or after fastattr, so that captum's ``isinstance`` checks accept it (see
    ``fastattr._captum``).

    Args:
        forward_func: the model, or any callable returning its output.

    Raises:
        TypeError: ``forward_func`` is not callable.

    Examples:
        >>> import torch
        >>> from fastattr import IntegratedGradients
        >>> ig = IntegratedGradients(torch.nn.Linear(3, 1))
        >>> ig.get_name(), ig.has_convergence_delta(), ig.multiplies_by_inputs
        ('Integrated Gradients', True, True)
    """

    def __init_subclass__(cls, captum_class: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        attribute = cls.__dict__.get("attribute")
        if callable(attribute):
            cls.attribute = _entry_point(attribute)  # type: ignore[method-assign]
        if captum_class is not None:
            _captum.register(cls, captum_class)

    def __init__(self, forward_func: Callable[..., Any]) -> None:
        if not callable(forward_func):
            raise TypeError(f"forward_func must be callable, got {type(forward_func).__name__}")
        self.forward_func = forward_func

    @property
    def multiplies_by_inputs(self) -> bool:
        """Whether the attributions are multiplied by the inputs (or by their difference from
        the baselines): "global" attributions. False unless a method says otherwise."""
        return False

    def has_convergence_delta(self) -> bool:
        """Whether the method gives a convergence delta (``compute_convergence_delta``).

        Returns:
            False unless a method says otherwise.
        """
        return False

    def attribute_future(self, *args: Any, **kwargs: Any) -> Any:
        """Not implemented, as in captum's classes that fastattr replaces.

        Raises:
            NotImplementedError: always.
        """
        raise NotImplementedError(f"attribute_future is not implemented for {type(self).__name__}")

    @classmethod
    def get_name(cls) -> str:
        """The class name made readable as captum makes it: a space before every character
        after the first that is not a lower-case letter.

        Returns:
            The readable name, e.g. ``"Integrated Gradients"`` (and ``"L R P"`` for ``LRP``,
            as in captum).
        """
        name = cls.__name__
        return name[:1] + "".join(c if c.islower() else f" {c}" for c in name[1:])


class LayerAttribution(Attribution):
    """Base of the layer methods: captum's ``LayerAttribution`` protocol (``interpolate``)."""

    @staticmethod
    def interpolate(
        layer_attribution: Tensor,
        interpolate_dims: int | tuple[int, ...],
        interpolate_mode: str = "nearest",
    ) -> Tensor:
        """Resize a layer's attributions (examples, channels, then 1 to 3 spatial dimensions)
        to new spatial dimensions, e.g. a convolution's to the input image's size.

        Args:
            layer_attribution: a 3-D, 4-D or 5-D tensor of attributions.
            interpolate_dims: the new spatial size: an int, or one int per spatial dimension.
            interpolate_mode: a mode of ``torch.nn.functional.interpolate`` ("nearest",
                "area", "linear", "bilinear", "bicubic", "trilinear"). Default: "nearest".

        Returns:
            The resized attributions, with the first two dimensions unchanged.

        Examples:
            >>> import torch
            >>> from fastattr import LayerIntegratedGradients
            >>> LayerIntegratedGradients.interpolate(torch.ones(1, 2, 4, 4), (8, 8)).shape
            torch.Size([1, 2, 8, 8])
        """
        return F.interpolate(layer_attribution, interpolate_dims, mode=interpolate_mode)


def forward_row_sums(
    forward_func: Callable[..., Any],
    inputs: tuple[Tensor, ...],
    target: TargetType | ColumnIndices,
    args: tuple[Any, ...] | None,
) -> Tensor:
    """The selected output summed over all but its first dimension, without a graph (captum's
    delta convention)."""
    with torch.no_grad():
        return row_sums(run_forward(forward_func, inputs, target, args))


def convergence_delta(attribution_sums: Tensor, end_out: Tensor, start_out: Tensor) -> Tensor:
    """Captum's delta: the attributions' sum per example minus the output's change, whose rows
    (one per example, or one for all, as captum broadcasts them) come from the forward."""
    change = end_out - start_out
    if change.shape[0] not in (1, attribution_sums.shape[0]):
        raise ValueError(
            f"the convergence delta needs one output row per example ({attribution_sums.shape[0]})"
            f" or one in all, got {change.shape[0]} rows from forward_func"
        )
    return attribution_sums - change


def integrate_as_captum(
    ends: tuple[Tensor, ...],
    starts: tuple[Tensor, ...],
    evaluate: Evaluate,
    *,
    batch: int,
    forward_func: Callable[..., Any],
    n_steps: int,
    internal_batch_size: int | None,
    what: str = "forward_func",
    **options: Any,
) -> PathIntegral:
    """:func:`integrate_path` over the model's selected output, chunked as captum chunks the
    path wherever the result depends on the chunking.

    Rows of the path are independent for most models, and then any chunking gives captum's
    numbers. They are not when the model normalizes with batch statistics, or when the selected
    output is not one value per row (captum differentiates the sum of what the forward
    returns, e.g. ``model(x)[0].unsqueeze(0)`` or a neuron selector that sums over the batch).
    Then each forward gets the rows captum's forward gets: all steps at once, or
    ``internal_batch_size // batch`` steps at a time when it is given (captum's chunks).
    """
    chosen = steps_per_chunk_for(internal_batch_size, batch)

    def rows_of(paths: tuple[Tensor, ...], steps: int) -> Tensor:
        whole = chosen is not None or steps == n_steps
        return path_output(evaluate(paths, steps), steps * batch, whole, what)

    if chosen is None and uses_batch_statistics(forward_func):
        chosen = as_int(n_steps, "n_steps")
    run = functools.partial(
        integrate_path, ends, starts, rows_of, n_steps=n_steps, model=forward_func, **options
    )
    try:
        return run(steps_per_chunk=chosen)
    except RowsCoupled:
        # Found at the first chunk: the whole path again, in one chunk as captum runs it.
        return run(steps_per_chunk=as_int(n_steps, "n_steps"))


class PathAttribution(Attribution):
    """Base of the integrated-gradients methods."""

    def __init__(self, forward_func: Callable[..., Any], multiply_by_inputs: bool = True) -> None:
        super().__init__(forward_func)
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
        start_out = forward_row_sums(self.forward_func, starts, target, args)
        end_out = forward_row_sums(self.forward_func, ends, target, args)
        attribution_sum = sum(a.reshape(batch, -1).sum(1) for a in attribution_tuple)
        return convergence_delta(attribution_sum, end_out, start_out)
