"""The attribution protocol every public fastattr class follows (captum's), and what the
integrated-gradients methods share beyond the path: the forward function, the
multiply-by-inputs switch and captum's convergence delta."""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from fastattr import _captum
from fastattr._formatting import (
    BaselineType,
    TargetType,
    TensorOrTuple,
    as_tensor_tuple,
    check_target,
    format_additional_args,
    format_baselines,
)
from fastattr._forward import row_sums
from fastattr._path_integral import convergence_deltas, outputs_per_example


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
        start_outs = outputs_per_example(self.forward_func, starts, [target], args)
        end_outs = outputs_per_example(self.forward_func, ends, [target], args)
        attribution_sum = sum(row_sums(a) for a in attribution_tuple)
        (delta,) = convergence_deltas([attribution_sum], end_outs, start_outs)
        return delta
