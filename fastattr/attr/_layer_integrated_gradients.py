"""LayerIntegratedGradients: captum's API; the layer's values come from one pass that stops at
the layer, and the path through them streams through the compiled ops."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Union

import torch
from torch import Tensor

from fastattr._exact import (
    argument_rows,
    check_method,
    integrate_exact,
    steps_taken,
    target_rows,
)
from fastattr._formatting import (
    BaselineType,
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
    integrate_path,
    module_of,
    steps_per_chunk_for,
)
from fastattr.attr._base import LayerAttribution, PathAttribution, forward_per_example
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
        """The layers' values at the inputs and at the baselines, from one pass over both
        that stops at the last layer needed (with ``last``: that runs to the end and takes
        each layer's last call)."""
        layers = as_layer_list(self.layer)
        batch = inputs[0].shape[0]
        model = module_of(self.forward_func)
        with torch.no_grad():
            # Only a model known to be in eval mode may see inputs and baselines together:
            # behind a plain function there may be one in training mode.
            if model is not None and not any(m.training for m in model.modules()):
                both = tuple(torch.cat([x, s]) for x, s in zip(inputs, starts))
                captured = capture_layers(
                    lambda: self.forward_func(*both, *repeat_additional_args(args, 2)),
                    layers,
                    on_input,
                    last=last,
                )
                if all(v.shape[0] == 2 * batch for values in captured for v in values):
                    return (
                        [tuple(v[:batch] for v in values) for values in captured],
                        [tuple(v[batch:] for v in values) for values in captured],
                    )
            # Batch statistics (training mode, or not known) or values not batched along
            # dimension 0: the inputs and the baselines need passes of their own.
            at_inputs = capture_layers(
                lambda: self.forward_func(*inputs, *(args or ())), layers, on_input, last=last
            )
            at_starts = capture_layers(
                lambda: self.forward_func(*starts, *(args or ())), layers, on_input, last=last
            )
        return at_inputs, at_starts

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
        return_n_steps: bool = False,
    ) -> LayerAttributions | tuple[LayerAttributions, Tensor] | tuple[LayerAttributions, ...]:
        """Attribute the selected output of ``forward_func`` to the layer's values.

        Args:
            inputs: the model's inputs: a tensor or a tuple of tensors (integers allowed,
                e.g. token ids), with the examples along dimension 0.
            baselines: the model's inputs at the start of the path, in the forms
                ``IntegratedGradients.attribute`` accepts (None: zeros).
            target: which output to attribute, as in ``IntegratedGradients.attribute``.
            additional_forward_args: further arguments of ``forward_func``, as in
                ``IntegratedGradients.attribute``.
            n_steps: the number of quadrature nodes. Default: 50. Not used by ``"exact"``.
            method: the quadrature rule, as in ``IntegratedGradients.attribute``; ``"exact"``
                where the model after the layer is piecewise linear.
            internal_batch_size: at most how many path points to run at once (captum's
                meaning); None sizes the chunks from free memory.
            return_convergence_delta: also return captum's convergence delta per example
                (the sum of all layers' attributions against the model's output change).
            attribute_to_layer_input: attribute the layer's input instead of its output.
            grad_kwargs: extra keyword arguments of ``torch.autograd.grad``.
            return_n_steps: also return the gradient evaluations each example's path took,
                as in ``IntegratedGradients.attribute``. Not in captum.

        Returns:
            For one layer, a tensor shaped as its output (or input), or a tuple when it has
            several; for a list of layers, a list of those. With
            ``return_convergence_delta``, the pair ``(attributions, delta)``; with
            ``return_n_steps``, the steps come last.
        """
        layers = as_layer_list(self.layer)
        check_layers_in_model(self.forward_func, layers, "layer")
        model_inputs = as_tensor_tuple(inputs)
        baseline_tuple = format_baselines(baselines, model_inputs)
        starts = tuple(b.expand_as(x).contiguous() for b, x in zip(baseline_tuple, model_inputs))
        exact = check_method(method, n_steps)
        batch = model_inputs[0].shape[0]
        target = check_target(target, batch)
        args = format_additional_args(additional_forward_args)
        check_additional_args(args, batch)
        steps_per_chunk = steps_per_chunk_for(internal_batch_size, batch)

        # A layer that runs more than once is replaced at every call, so only its last call
        # reaches the output: its path must run between its last call's values (captum's
        # convention). The first chunk tells; then the values come from a full pass.
        for last in (False, True):
            at_inputs, at_starts = self._layer_values(
                model_inputs, starts, args, attribute_to_layer_input, last
            )
            counts = [len(values) for values in at_inputs]
            ends = tuple(v for values in at_inputs for v in values)
            path_starts = tuple(v for values in at_starts for v in values)
            check_floating(
                ends, "the values of layer", "; choose a layer with floating point values"
            )
            if (return_convergence_delta or exact) and any(v.shape[0] != batch for v in ends):
                raise ValueError(
                    f"{'method=exact' if exact else 'return_convergence_delta'} needs the "
                    f"values of layer to hold the examples along dimension 0 ({batch}), got "
                    f"shapes {[list(v.shape) for v in ends]}"
                )

            def run(
                paths: tuple[Tensor, ...],
                rows_of: Callable[[Any], tuple[Any, ...]],
                row_target: Any,
                rows: int,
                counts=counts,
                last=last,
            ) -> Tensor:
                """The model's ``rows`` outputs with the layers' values replaced by ``paths``;
                ``rows_of`` takes the rows of the per-example arguments."""
                calls = [0] * len(layers)
                with replaced_layers(
                    layers, _group(paths, counts), attribute_to_layer_input, calls=calls
                ):
                    output = run_forward(
                        self.forward_func, rows_of(model_inputs), row_target, rows_of(args)
                    )
                if not last and max(calls) > 1:
                    raise LayerCalledAgain
                return per_example(output, rows)

            def evaluate(paths: tuple[Tensor, ...], steps: int, run=run) -> Tensor:
                return run(
                    paths,
                    lambda tensors: repeat_additional_args(tensors, steps),
                    repeat_target(target, steps),
                    steps * batch,
                )

            def evaluate_points(paths: tuple[Tensor, ...], examples: Tensor, run=run) -> Tensor:
                return run(
                    paths,
                    lambda tensors: argument_rows(tensors, examples),
                    target_rows(target, examples),
                    examples.numel(),
                )

            try:
                if exact:
                    result = integrate_exact(
                        ends,
                        path_starts,
                        evaluate_points,
                        multiply_by_inputs=self.multiplies_by_inputs,
                        internal_batch_size=internal_batch_size,
                        model=self.forward_func,
                        grad_kwargs=grad_kwargs,
                    )
                    break
                result = integrate_path(
                    ends,
                    path_starts,
                    evaluate,
                    method=method,
                    n_steps=n_steps,
                    steps_per_chunk=steps_per_chunk,
                    multiply_by_inputs=self.multiplies_by_inputs,
                    model=self.forward_func,
                    step_costs=self._step_costs,
                    cost_key=(tuple(x.shape for x in model_inputs), attribute_to_layer_input),
                    grad_kwargs=grad_kwargs,
                )
                break
            except LayerCalledAgain:
                continue
        per_layer = [
            format_output(len(group) > 1, group) for group in _group(result.attributions, counts)
        ]
        attributions = per_layer if isinstance(self.layer, list) else per_layer[0]
        extras = []
        if return_convergence_delta:
            # The path's own outputs can't stand in for the model's at the inputs and
            # baselines: branches that bypass the layer saw the inputs all along the path.
            start_out = forward_per_example(self.forward_func, starts, target, args)
            end_out = forward_per_example(self.forward_func, model_inputs, target, args)
            extras.append(result.row_sums - (end_out - start_out))
        if return_n_steps:
            extras.append(steps_taken(result, n_steps, batch, model_inputs[0].device))
        return (attributions, *extras) if extras else attributions
