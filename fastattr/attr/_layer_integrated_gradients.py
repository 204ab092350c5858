"""LayerIntegratedGradients: captum's API; the layer's values come from a pass over the inputs
and one over the baselines, each stopping at the layer, and the path through them streams
through the compiled ops."""

from __future__ import annotations

import functools
from typing import Any, Union

import torch
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
    LayerAttribution,
    PathAttribution,
    convergence_delta,
    forward_row_sums,
    integrate_as_captum,
)
from fastattr.attr._layers import (
    LayerCalledAgain,
    LayerValues,
    ModuleOrList,
    as_layer_list,
    capture_layers,
    check_layers_in_model,
    replaced_layers,
)

LayerAttributions = Union[TensorOrTuple, list[TensorOrTuple]]


def _group(flat: tuple[Tensor, ...], counts: list[int]) -> list[LayerValues]:
    groups, start = [], 0
    for count in counts:
        groups.append(flat[start : start + count])
        start += count
    return groups


class LayerIntegratedGradients(
    PathAttribution, LayerAttribution, captum_class="LayerIntegratedGradients"
):
    """Integrated Gradients of a layer's output (or input), as
    ``captum.attr.LayerIntegratedGradients``.

    The path runs from the layer's values at the baselines to its values at the inputs; the
    model runs on the inputs with the layer's values replaced by each point of the path. For
    integer inputs such as token ids, attribute the embedding layer with baselines of token
    ids.

    Args:
        forward_func: the model or any callable returning its output.
        layer: a module of the model, or a list of modules (then a list of results).
        device_ids: accepted for captum compatibility; the forward function runs as given.
        multiply_by_inputs: multiply by the difference of the layer's values at the inputs
            and the baselines. Default: True.
    """

    def __init__(
        self,
        forward_func: Any,
        layer: ModuleOrList,
        device_ids: list[int] | None = None,
        multiply_by_inputs: bool = True,
    ) -> None:
        super().__init__(forward_func, multiply_by_inputs)
        as_layer_list(layer)
        self.layer = layer
        self.device_ids = device_ids

    def _layer_values(
        self,
        inputs: tuple[Tensor, ...],
        starts: tuple[Tensor, ...],
        args: tuple[Any, ...] | None,
        on_input: bool,
        last: bool = False,
    ) -> tuple[list[LayerValues], list[LayerValues]]:
        """The layers' values at the inputs and at the baselines, from a pass over each (as
        captum takes them: one pass over both would let a model that mixes the examples of a
        batch mix inputs and baselines) that stops at the last layer needed (with ``last``: that
        runs to the end and takes each layer's last call)."""
        layers = as_layer_list(self.layer)
        with torch.no_grad():
            return tuple(  # type: ignore[return-value]
                capture_layers(
                    lambda points=points: self.forward_func(*points, *(args or ())),
                    layers,
                    on_input,
                    last=last,
                )
                for points in (inputs, starts)
            )

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
        attribute_to_layer_input: bool = False,
        grad_kwargs: dict[str, Any] | None = None,
    ) -> LayerAttributions | tuple[LayerAttributions, Tensor]:
        """Attribute the selected output of ``forward_func`` to the layer's values.

        Args:
            inputs: the model's inputs: a tensor or a tuple of tensors (integers allowed,
                e.g. token ids), with the examples along dimension 0.
            baselines: the model's inputs at the start of the path, in the forms
                ``IntegratedGradients.attribute`` accepts (None: zeros).
            target: which output to attribute, as in ``IntegratedGradients.attribute``.
            additional_forward_args: further arguments of ``forward_func``, as in
                ``IntegratedGradients.attribute``.
            n_steps: the number of quadrature nodes. Default: 50.
            method: the quadrature rule, as in ``IntegratedGradients.attribute``.
            internal_batch_size: at most how many path points to run at once (captum's
                meaning); None sizes the chunks from free memory.
            return_convergence_delta: also return captum's convergence delta per example
                (the sum of all layers' attributions against the model's output change).
            attribute_to_layer_input: attribute the layer's input instead of its output.
            grad_kwargs: extra keyword arguments of ``torch.autograd.grad``.

        Returns:
            For one layer, a tensor shaped as its output (or input), or a tuple when it has
            several; for a list of layers, a list of those. With
            ``return_convergence_delta``, the pair ``(attributions, delta)``.
        """
        layers = as_layer_list(self.layer)
        check_layers_in_model(self.forward_func, layers, "layer")
        model_inputs = as_tensor_tuple(inputs)
        baseline_tuple = format_baselines(baselines, model_inputs)
        starts = tuple(b.expand_as(x).contiguous() for b, x in zip(baseline_tuple, model_inputs))
        check_steps(method, n_steps)
        batch = model_inputs[0].shape[0]
        target = check_target(target, batch)
        args = format_additional_args(additional_forward_args)
        integrate = functools.partial(
            self._integrate,
            model_inputs,
            starts,
            target,
            args,
            n_steps,
            method,
            internal_batch_size,
            attribute_to_layer_input,
            grad_kwargs,
            return_convergence_delta,
        )
        with kept_buffers(self.forward_func):
            # A layer that runs more than once is replaced at every call, so only its last
            # call reaches the output: its path must run between its last call's values
            # (captum's convention). The first chunk tells; then the values come from a full
            # pass.
            try:
                result, counts = integrate(last=False)
            except LayerCalledAgain:
                result, counts = integrate(last=True)
            per_layer = [
                format_output(len(group) > 1, group)
                for group in _group(result.attributions, counts)
            ]
            attributions = per_layer if isinstance(self.layer, list) else per_layer[0]
            if not return_convergence_delta:
                return attributions
            # The path's own outputs can't stand in for the model's at the inputs and
            # baselines: branches that bypass the layer saw the inputs all along the path.
            start_out = forward_row_sums(self.forward_func, starts, target, args)
            end_out = forward_row_sums(self.forward_func, model_inputs, target, args)
        return attributions, convergence_delta(result.row_sums, end_out, start_out)

    def _integrate(
        self,
        model_inputs: tuple[Tensor, ...],
        starts: tuple[Tensor, ...],
        target: TargetType | ColumnIndices,
        args: tuple[Any, ...] | None,
        n_steps: int,
        method: str,
        internal_batch_size: int | None,
        on_input: bool,
        grad_kwargs: dict[str, Any] | None,
        with_delta: bool,
        last: bool,
    ) -> tuple[PathIntegral, list[int]]:
        """The path between the layers' values (with ``last``, those of each layer's last
        call); and how many tensors each layer gives."""
        layers = as_layer_list(self.layer)
        batch = model_inputs[0].shape[0]
        at_inputs, at_starts = self._layer_values(model_inputs, starts, args, on_input, last)
        counts = [len(values) for values in at_inputs]
        ends = tuple(v for values in at_inputs for v in values)
        path_starts = tuple(v for values in at_starts for v in values)
        check_floating(ends, "the values of layer", "; choose a layer with floating point values")
        if with_delta and any(v.shape[0] != batch for v in ends):
            raise ValueError(
                "return_convergence_delta needs the values of layer to hold the examples "
                f"along dimension 0 ({batch}), got shapes {[list(v.shape) for v in ends]}"
            )

        def evaluate(paths: tuple[Tensor, ...], steps: int) -> Tensor:
            calls = [0] * len(layers)
            with replaced_layers(layers, _group(paths, counts), on_input, calls=calls):
                output = run_forward(
                    self.forward_func,
                    repeat_additional_args(model_inputs, steps),
                    repeat_target(target, steps),
                    repeat_additional_args(args, steps),
                )
            if not last and max(calls) > 1:
                raise LayerCalledAgain
            return output

        result = integrate_as_captum(
            ends,
            path_starts,
            evaluate,
            batch=batch,
            forward_func=self.forward_func,
            n_steps=n_steps,
            internal_batch_size=internal_batch_size,
            method=method,
            multiply_by_inputs=self.multiplies_by_inputs,
            step_costs=self._step_costs,
            cost_key=(tuple(x.shape for x in model_inputs), on_input),
            grad_kwargs=grad_kwargs,
        )
        return result, counts
