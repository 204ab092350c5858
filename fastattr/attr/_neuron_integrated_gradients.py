"""NeuronIntegratedGradients: captum's API; the forward pass stops at the neuron's layer, so
the rest of the model never runs, forward or backward."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Union

import torch
from torch import Tensor, nn

from fastattr._exact import argument_rows, check_method, integrate_exact, steps_taken
from fastattr._formatting import (
    BaselineType,
    TensorOrTuple,
    as_tensor_tuple,
    check_additional_args,
    check_floating,
    format_additional_args,
    format_baselines,
    format_output,
    per_example,
    repeat_additional_args,
)
from fastattr._path_integral import integrate_path, steps_per_chunk_for
from fastattr.attr._base import PathAttribution
from fastattr.attr._layers import LayerValues, capture_layers, check_layers_in_model

NeuronSelector = Union[int, tuple[Union[int, slice], ...], Callable[..., Tensor]]


def select_neuron(values: LayerValues, selector: NeuronSelector, rows: int) -> Tensor:
    """The selected neuron's value per row; slices select a region, summed per row."""
    if callable(selector):
        selected = selector(values if len(values) > 1 else values[0])
        if not isinstance(selected, Tensor):
            raise TypeError(
                f"a callable neuron_selector must return a tensor, got {type(selected).__name__}"
            )
    else:
        if len(values) > 1:
            raise ValueError(
                f"the layer gives {len(values)} tensors: neuron_selector must be a callable "
                "that picks the neuron from the tuple"
            )
        layer_value = values[0]
        index = (selector,) if isinstance(selector, int) else selector
        if not isinstance(index, tuple) or not all(isinstance(i, (int, slice)) for i in index):
            raise TypeError(
                "neuron_selector must be an int, a tuple of ints and slices, or a callable, "
                f"got {selector!r}"
            )
        if len(index) > layer_value.dim() - 1:
            raise ValueError(
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
    if selected.numel() != rows:
        raise ValueError(
            "neuron_selector must select one value per example, got shape "
            f"{list(selected.shape)} for {rows} rows: index every dimension after the batch, "
            "or use slices to sum a region"
        )
    return selected.reshape(rows)


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
        n_steps: int = 50,
        method: str = "gausslegendre",
        internal_batch_size: int | None = None,
        attribute_to_neuron_input: bool = False,
        return_n_steps: bool = False,
    ) -> TensorOrTuple | tuple[TensorOrTuple, Tensor]:
        """Attribute one neuron of the layer to ``inputs``.

        Args:
            inputs: a tensor or a tuple of floating point tensors, examples along dimension 0.
            neuron_selector: the neuron: an int or a tuple of ints indexing the layer's values
                after the batch dimension; slices in the tuple select a region whose values
                are summed; or a callable taking the layer's values (a tensor, or a tuple for
                a layer with several) and returning one value per example.
            baselines: where each path starts, as in ``IntegratedGradients.attribute``.
            additional_forward_args: further arguments of ``forward_func``.
            n_steps: the number of quadrature nodes. Default: 50. Not used by ``"exact"``.
            method: the quadrature rule, as in ``IntegratedGradients.attribute``; ``"exact"``
                where the model up to the layer is piecewise linear.
            internal_batch_size: at most how many path points to run at once (captum's
                meaning); None sizes the chunks from free memory.
            attribute_to_neuron_input: take the neuron from the layer's input instead of its
                output.
            return_n_steps: also return the gradient evaluations each example's path took,
                as in ``IntegratedGradients.attribute``. Not in captum.

        Returns:
            The attributions, shaped as the inputs (a tensor for a tensor, a tuple for a
            tuple); with ``return_n_steps``, the pair ``(attributions, steps)``.
        """
        check_layers_in_model(self.forward_func, [self.layer], "layer")
        is_tuple = isinstance(inputs, tuple)
        ends = as_tensor_tuple(inputs)
        check_floating(ends, "inputs")
        starts = format_baselines(baselines, ends)
        exact = check_method(method, n_steps)
        batch = ends[0].shape[0]
        args = format_additional_args(additional_forward_args)
        check_additional_args(args, batch)

        # Captum takes a layer that runs more than once at its last call. One pass over the
        # inputs, without a graph, counts the calls; unless the layer runs again, the passes
        # over the path stop at the layer.
        steps_per_chunk = steps_per_chunk_for(internal_batch_size, batch)
        calls = [0]
        with torch.no_grad():
            if batch > 0:
                capture_layers(
                    lambda: self.forward_func(*ends, *(args or ())),
                    [self.layer],
                    attribute_to_neuron_input,
                    last=True,
                    calls=calls,
                )
        runs_again = calls[0] > 1

        def neuron(paths: tuple[Tensor, ...], point_args: tuple[Any, ...], rows: int) -> Tensor:
            (values,) = capture_layers(
                lambda: self.forward_func(*paths, *point_args),
                [self.layer],
                attribute_to_neuron_input,
                detach=False,
                last=runs_again,
            )
            return per_example(select_neuron(values, neuron_selector, rows), rows)

        def evaluate(paths: tuple[Tensor, ...], steps: int) -> Tensor:
            return neuron(paths, repeat_additional_args(args, steps), steps * batch)

        def evaluate_points(paths: tuple[Tensor, ...], examples: Tensor) -> Tensor:
            return neuron(paths, argument_rows(args, examples), examples.numel())

        if exact:
            result = integrate_exact(
                ends,
                starts,
                evaluate_points,
                multiply_by_inputs=self.multiplies_by_inputs,
                internal_batch_size=internal_batch_size,
                model=self.forward_func,
            )
        else:
            with torch.enable_grad():
                result = integrate_path(
                    ends,
                    starts,
                    evaluate,
                    method=method,
                    n_steps=n_steps,
                    steps_per_chunk=steps_per_chunk,
                    multiply_by_inputs=self.multiplies_by_inputs,
                    model=self.forward_func,
                    step_costs=self._step_costs,
                    cost_key=attribute_to_neuron_input,
                )
        attributions = format_output(is_tuple, result.attributions)
        if return_n_steps:
            return attributions, steps_taken(result, n_steps, batch, ends[0].device)
        return attributions
