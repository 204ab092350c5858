"""NeuronIntegratedGradients: captum's API; the forward pass stops at the neuron's layer, so
the rest of the model never runs, forward or backward."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Union

import torch
from torch import Tensor, nn

from fastattr._formatting import (
    BaselineType,
    TensorOrTuple,
    as_tensor_tuple,
    check_target_sequence,
    format_additional_args,
    format_baselines,
    format_output,
    note_integer_inputs,
    path_inputs,
)
from fastattr._forward import OutputShapeError, path_output
from fastattr._model_state import draws_dropout, kept_buffers
from fastattr._path_integral import (
    PathOptions,
    PointRows,
    args_for_points,
    integrate,
    needs_whole_steps,
    steps_per_chunk_for,
    with_extras,
)
from fastattr.attr._base import PathAttribution
from fastattr.attr._layers import (
    LayerValues,
    capture_layers,
    check_layers_in_model,
    tensors_of,
)

NeuronSelector = Union[int, tuple[Union[int, slice], ...], Callable[..., Tensor]]


def select_neuron(values: LayerValues, selector: NeuronSelector, rows: int) -> Tensor:
    """The selected neuron's value per row (slices select a region, summed per row), or what a
    callable selector returns. Nones the layer takes or returns beside its tensors are left
    out: an index selects from its one tensor, a callable gets its tensor (or a tuple of its
    tensors)."""
    tensors = tensors_of(values)
    if callable(selector):
        selected = selector(tensors if len(tensors) > 1 else tensors[0])
        if not isinstance(selected, Tensor):
            raise TypeError(
                f"a callable neuron_selector must return a tensor, got {type(selected).__name__}"
            )
    else:
        if len(tensors) > 1:
            raise ValueError(
                f"the layer gives {len(tensors)} tensors: neuron_selector must be a callable "
                "that picks the neuron from the tuple"
            )
        layer_value = tensors[0]
        index = (selector,) if isinstance(selector, int) else selector
        if isinstance(index, list):  # captum indexes with a list as with a tuple
            index = tuple(index)
        if not isinstance(index, tuple) or not all(isinstance(i, (int, slice)) for i in index):
            raise TypeError(
                "neuron_selector must be an int, a tuple of ints and slices, or a callable, "
                f"got {selector!r}"
            )
        if len(index) > layer_value.dim() - 1:
            raise OutputShapeError(
                f"neuron_selector {selector!r} has more indices than the layer's values of "
                f"shape {list(layer_value.shape)} have dimensions after the batch"
            )
        for dim, i in enumerate(index, start=1):
            size = layer_value.shape[dim]
            if isinstance(i, int) and not -size <= i < size:
                raise IndexError(
                    f"neuron_selector index {i} is out of range for dimension {dim} of the "
                    f"layer's values of shape {list(layer_value.shape)}"
                )
        selected = layer_value[(slice(None), *index)]
        if any(isinstance(i, slice) for i in index):
            selected = selected.reshape(rows, -1).sum(1)
    # A single value (a selector that sums over the batch too) is differentiated as it is.
    return selected.reshape(1) if selected.numel() == 1 and selected.dim() != 1 else selected


class NeuronIntegratedGradients(PathAttribution, captum_class="NeuronIntegratedGradients"):
    """Integrated Gradients of one neuron of a layer with respect to the model's inputs, as
    ``captum.attr.NeuronIntegratedGradients``.

    Along the path, only the part of the model up to the layer runs: the forward passes stop
    there. One pass over the inputs, without a graph, first checks that the layer runs only
    once (a layer that runs more than once is taken at its last call, as captum takes it).

    Args:
        forward_func: the model or any callable returning its output.
        layer: the module whose output (or input) holds the neuron.
        device_ids: accepted for captum compatibility; the forward function runs as given.
        multiply_by_inputs: multiply by ``inputs - baselines``. Default: True.
    """

    def __init__(
        self,
        forward_func: Any,
        layer: nn.Module,
        device_ids: list[int] | None = None,
        multiply_by_inputs: bool = True,
    ) -> None:
        super().__init__(forward_func, multiply_by_inputs)
        if not isinstance(layer, nn.Module):
            raise TypeError(f"layer must be a torch.nn.Module, got {type(layer).__name__}")
        self.layer = layer
        self.device_ids = device_ids

    def has_convergence_delta(self) -> bool:
        """A neuron's integrated gradients come without a convergence delta: False."""
        return False

    def attribute(
        self,
        inputs: TensorOrTuple,
        neuron_selector: NeuronSelector,
        baselines: BaselineType = None,
        additional_forward_args: Any = None,
        n_steps: int | str = 50,
        method: str = "gausslegendre",
        internal_batch_size: int | None = None,
        attribute_to_neuron_input: bool = False,
        return_n_steps: bool = False,
        tolerance: float | None = None,
        max_steps: int | None = None,
    ) -> Any:
        """Attribute one neuron of the layer to ``inputs``.

        Args:
            inputs: a tensor or a tuple of floating point tensors, examples along dimension 0.
            neuron_selector: the neuron: an int or a tuple of ints indexing the layer's values
                after the batch dimension (a list is taken as a tuple, as in captum); slices
                in the tuple select a region whose values are summed; or a callable taking
                the layer's values (a tensor, or a tuple for a layer with several) and
                returning one value per example, or, as captum allows, one value in all or
                per entry of a 1-D result (e.g. a sum over the batch:
                ``lambda v: v[:, 2:].sum()``), differentiated as their sum.
            baselines: where each path starts, as in ``IntegratedGradients.attribute``.
            additional_forward_args: further arguments of ``forward_func``.
            n_steps: the number of quadrature nodes (default: 50), or ``"auto"``, as in
                ``IntegratedGradients.attribute`` (the completeness it reaches is the
                neuron's: its change between the baselines and the inputs).
            method: the quadrature rule, as in ``IntegratedGradients.attribute``; ``"exact"``
                where the model up to the layer is piecewise linear.
            internal_batch_size: at most how many path points to run at once (captum's
                meaning); None sizes the chunks from free memory.
            attribute_to_neuron_input: take the neuron from the layer's input instead of its
                output.
            return_n_steps: also return the gradient evaluations each example's path took
                (``n_steps``, the points ``"auto"`` chose or the pieces ``"exact"`` found), as
                in ``IntegratedGradients.attribute``. Not in captum.
            tolerance: with ``n_steps="auto"``, as in ``IntegratedGradients.attribute``.
            max_steps: with ``n_steps="auto"``, as in ``IntegratedGradients.attribute``.

        Returns:
            The attributions, shaped as the inputs (a tensor for a tensor, a tuple for a
            tuple); with ``return_n_steps``, the pair ``(attributions, steps)``.
        """
        (result,) = self._attribute_targets(
            inputs,
            [neuron_selector],
            baselines,
            additional_forward_args,
            PathOptions(n_steps, method, internal_batch_size, tolerance, max_steps),
            attribute_to_neuron_input,
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
        attribute_to_neuron_input: bool = False,
        return_n_steps: bool = False,
        tolerance: float | None = None,
        max_steps: int | None = None,
    ) -> list[Any]:
        """Attribute several neurons of the layer at once, each as
        [attribute][fastattr.NeuronIntegratedGradients.attribute] would.

        One forward pass (up to the layer) per chunk of the path serves all neurons, then one
        backward pass per neuron.

        Args:
            inputs: as in ``attribute``.
            targets: K neuron selectors, a list or a tuple, each in any form
                ``attribute``'s ``neuron_selector`` takes.
            baselines: as in ``attribute``.
            additional_forward_args: as in ``attribute``.
            n_steps: as in ``attribute``.
            method: as in ``attribute``.
            internal_batch_size: as in ``attribute`` (for all neurons together).
            attribute_to_neuron_input: as in ``attribute``.
            return_n_steps: as in ``attribute``.
            tolerance: as in ``attribute``.
            max_steps: as in ``attribute``.

        Returns:
            A list of K results; result ``k`` equals (to float rounding)
            ``attribute(inputs, neuron_selector=targets[k], ...)`` with the same other
            arguments.

        Raises:
            ValueError: ``targets`` is empty.
            TypeError: ``targets`` is not a list or a tuple.

        Examples:
            >>> import torch
            >>> from torch import nn
            >>> from fastattr import NeuronIntegratedGradients
            >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
            >>> nig = NeuronIntegratedGradients(model, model[1])
            >>> per_neuron = nig.attribute_targets(torch.randn(2, 4), [0, 5, 7])
            >>> len(per_neuron), per_neuron[2].shape
            (3, torch.Size([2, 4]))
        """
        if isinstance(targets, Tensor):
            raise TypeError("targets must be a list or tuple of neuron selectors, got a tensor")
        selectors = check_target_sequence(targets, 0, lambda selector, _: selector)
        return self._attribute_targets(
            inputs,
            selectors,
            baselines,
            additional_forward_args,
            PathOptions(n_steps, method, internal_batch_size, tolerance, max_steps),
            attribute_to_neuron_input,
            return_n_steps,
        )

    def _attribute_targets(
        self,
        inputs: TensorOrTuple,
        selectors: list[NeuronSelector],
        baselines: BaselineType,
        additional_forward_args: Any,
        options: PathOptions,
        attribute_to_neuron_input: bool,
        return_n_steps: bool,
    ) -> list[Any]:
        check_layers_in_model(self.forward_func, [self.layer], "layer")
        is_tuple = isinstance(inputs, tuple)
        given = as_tensor_tuple(inputs)
        ends = path_inputs(given)
        starts = format_baselines(baselines, ends)
        adaptive = options.check()
        args = format_additional_args(additional_forward_args)
        try:
            with kept_buffers(self.forward_func):
                return self._integrate(
                    ends,
                    starts,
                    selectors,
                    args,
                    options,
                    adaptive,
                    attribute_to_neuron_input,
                    is_tuple,
                    return_n_steps,
                )
        except Exception as error:
            note_integer_inputs(error, given)
            raise

    def _integrate(
        self,
        ends: tuple[Tensor, ...],
        starts: tuple[Tensor, ...],
        selectors: list[NeuronSelector],
        args: tuple[Any, ...] | None,
        options: PathOptions,
        adaptive: tuple[float, int] | None,
        attribute_to_neuron_input: bool,
        is_tuple: bool,
        return_n_steps: bool,
    ) -> list[Any]:
        batch = ends[0].shape[0]

        # Captum takes a layer that runs more than once at its last call. One pass over the
        # inputs, without a graph, counts the calls; unless the layer runs again, the passes
        # over the path stop at the layer. (Dropout in training mode: full passes, which draw
        # captum's random numbers.)
        steps_per_chunk = steps_per_chunk_for(options.internal_batch_size, batch)
        runs_again = draws_dropout(self.forward_func)
        if not runs_again and batch > 0:
            calls = [0]
            # On copies: a forward that writes into its inputs (a clamp_ under no_grad) must
            # not change the caller's tensors, which are also the path's ends.
            copies = tuple(end.clone() for end in ends)
            with torch.no_grad():
                capture_layers(
                    lambda: self.forward_func(*copies, *(args or ())),
                    [self.layer],
                    attribute_to_neuron_input,
                    last=True,
                    calls=calls,
                )
            runs_again = calls[0] > 1

        def evaluate(paths: tuple[Tensor, ...], rows: PointRows) -> list[Tensor]:
            point_args = args_for_points(args, rows)
            (values,) = capture_layers(
                lambda: self.forward_func(*paths, *point_args),
                [self.layer],
                attribute_to_neuron_input,
                detach=False,
                last=runs_again,
            )
            return [
                path_output(
                    select_neuron(values, selector, len(rows)),
                    len(rows),
                    rows.as_captum,
                    "neuron_selector",
                )
                for selector in selectors
            ]

        with torch.enable_grad():
            result, steps = integrate(
                ends,
                starts,
                evaluate,
                batch=batch,
                method=options.method,
                n_steps=options.n_steps,
                adaptive=adaptive,
                targets=len(selectors),
                steps_per_chunk=steps_per_chunk,
                multiply_by_inputs=self.multiplies_by_inputs,
                model=self.forward_func,
                whole_steps=needs_whole_steps(args, batch),
                step_costs=self._step_costs,
                cost_key=attribute_to_neuron_input,
            )
        return [
            with_extras(format_output(is_tuple, attributions), None, s if return_n_steps else None)
            for attributions, s in zip(result.attributions, steps)
        ]
