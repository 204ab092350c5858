"""LayerIntegratedGradients: captum's API; the layer's values come from a pass over the inputs
and one over the baselines, each stopping at the layer, and the path through them streams
through the compiled ops."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Union

import torch
from torch import Tensor

from fastattr._formatting import (
    BaselineType,
    TargetType,
    TensorOrTuple,
    as_tensor_tuple,
    check_floating,
    check_target,
    check_target_sequence,
    format_additional_args,
    format_baselines,
    format_output,
)
from fastattr._forward import path_output, select_targets
from fastattr._model_state import draws_dropout, kept_buffers
from fastattr._path_integral import (
    EXACT,
    PathOptions,
    PointRows,
    args_for_points,
    convergence_deltas,
    integrate,
    needs_whole_steps,
    outputs_per_example,
    steps_per_chunk_for,
    targets_for_points,
    with_extras,
)
from fastattr.attr._base import LayerAttribution, PathAttribution
from fastattr.attr._layers import (
    LayerCalledAgain,
    LayerValues,
    ModuleOrList,
    as_layer_list,
    capture_layers,
    check_layers_in_model,
    replaced_layers,
    tensors_of,
    with_nones,
)

LayerAttributions = Union[TensorOrTuple, list[TensorOrTuple]]


def _group(flat: tuple[Tensor, ...], counts: list[int]) -> list[tuple[Tensor, ...]]:
    groups, start = [], 0
    for count in counts:
        groups.append(flat[start : start + count])
        start += count
    return groups


def _check_same_nones(at_inputs: list[LayerValues], at_starts: list[LayerValues]) -> None:
    for index, (end, start) in enumerate(zip(at_inputs, at_starts)):
        if [v is None for v in end] != [v is None for v in start]:
            raise ValueError(
                f"the values of layer[{index}] have None in other places at the inputs "
                f"({[type(v).__name__ for v in end]}) than at the baselines "
                f"({[type(v).__name__ for v in start]}): there is no path between them"
            )


def _check_grad_kwargs(grad_kwargs: Any) -> None:
    """Refuses what the path can't honour, rather than ignoring it: the gradients are summed
    along the path by the kernels, outside autograd, so attributions never carry a graph
    (``create_graph``), and each gradient is one backward pass (``is_grads_batched``)."""
    if grad_kwargs is None:
        return
    if not isinstance(grad_kwargs, Mapping):
        raise TypeError(
            f"grad_kwargs must be a dict of torch.autograd.grad arguments, got "
            f"{type(grad_kwargs).__name__}"
        )
    for key in ("create_graph", "is_grads_batched"):
        if grad_kwargs.get(key):
            raise ValueError(
                f"grad_kwargs[{key!r}]=True is not supported: the path's gradients are summed "
                "outside autograd, so the attributions can't be differentiated"
                if key == "create_graph"
                else f"grad_kwargs[{key!r}]=True is not supported: each gradient of the path "
                "is one backward pass of the selected output"
            )


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
        layer: a module of the model, or a list of modules (then a list of results). None
            (as captum allows): set ``layer`` before calling ``attribute``, as captum's
            ``TCAV`` does with the ``layer_attr_method`` it is given.
        device_ids: accepted for captum compatibility; the forward function runs as given.
        multiply_by_inputs: multiply by the difference of the layer's values at the inputs
            and the baselines. Default: True.
    """

    def __init__(
        self,
        forward_func: Any,
        layer: ModuleOrList | None,
        device_ids: list[int] | None = None,
        multiply_by_inputs: bool = True,
    ) -> None:
        super().__init__(forward_func, multiply_by_inputs)
        if layer is not None:
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
        n_steps: int | str = 50,
        method: str = "gausslegendre",
        internal_batch_size: int | None = None,
        return_convergence_delta: bool = False,
        attribute_to_layer_input: bool = False,
        grad_kwargs: dict[str, Any] | None = None,
        return_n_steps: bool = False,
        tolerance: float | None = None,
        max_steps: int | None = None,
    ) -> Any:
        """Attribute the selected output of ``forward_func`` to the layer's values.

        Args:
            inputs: the model's inputs: a tensor or a tuple of tensors (integers allowed,
                e.g. token ids), with the examples along dimension 0.
            baselines: the model's inputs at the start of the path, in the forms
                ``IntegratedGradients.attribute`` accepts (None: zeros).
            target: which output to attribute, as in ``IntegratedGradients.attribute``.
            additional_forward_args: further arguments of ``forward_func``, as in
                ``IntegratedGradients.attribute``.
            n_steps: the number of quadrature nodes (default: 50), or ``"auto"``, as in
                ``IntegratedGradients.attribute``: the completeness it reaches is that of the
                path through the layer (the model's output with the layer's values on the
                path, the inputs elsewhere).
            method: the quadrature rule, as in ``IntegratedGradients.attribute``; ``"exact"``
                where the model after the layer is piecewise linear.
            internal_batch_size: at most how many path points to run at once (captum's
                meaning); None sizes the chunks from free memory.
            return_convergence_delta: also return captum's convergence delta per example
                (the sum of all layers' attributions against the model's output change).
            attribute_to_layer_input: attribute the layer's input instead of its output.
            grad_kwargs: extra keyword arguments of ``torch.autograd.grad``, but not
                ``create_graph=True`` (the attributions carry no graph: the path's gradients
                are summed outside autograd) or ``is_grads_batched=True``: those are a
                ``ValueError``.
            return_n_steps: also return the gradient evaluations each example's path took
                (``n_steps``, the points ``"auto"`` chose or the pieces ``"exact"`` found), as
                in ``IntegratedGradients.attribute``. Not in captum.
            tolerance: with ``n_steps="auto"``, as in ``IntegratedGradients.attribute``.
            max_steps: with ``n_steps="auto"``, as in ``IntegratedGradients.attribute``.

        Returns:
            For one layer, a tensor shaped as its output (or input), or a tuple when it has
            several (a None the layer returns or takes beside its tensors, such as attention
            weights not asked for, is left out); for a list of layers, a list of those;
            followed, when asked, by the delta and then the steps.
        """
        (result,) = self._attribute_targets(
            inputs,
            baselines,
            lambda batch: [check_target(target, batch)],
            additional_forward_args,
            PathOptions(n_steps, method, internal_batch_size, tolerance, max_steps),
            return_convergence_delta,
            return_n_steps,
            attribute_to_layer_input,
            grad_kwargs,
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
        return_convergence_delta: bool = False,
        attribute_to_layer_input: bool = False,
        grad_kwargs: dict[str, Any] | None = None,
        return_n_steps: bool = False,
        tolerance: float | None = None,
        max_steps: int | None = None,
    ) -> list[Any]:
        """Attribute several targets at once, each as
        [attribute][fastattr.LayerIntegratedGradients.attribute] would.

        One forward pass per chunk of the path serves all targets, then one backward pass
        per target.

        Args:
            inputs: as in ``attribute``.
            targets: K targets, a list or a tuple (or a tensor: one target per entry of its
                first dimension), each in any form ``attribute``'s ``target`` takes.
            baselines: as in ``attribute``.
            additional_forward_args: as in ``attribute``.
            n_steps: as in ``attribute``.
            method: as in ``attribute``.
            internal_batch_size: as in ``attribute`` (for all targets together).
            return_convergence_delta: as in ``attribute``.
            attribute_to_layer_input: as in ``attribute``.
            grad_kwargs: as in ``attribute``.
            return_n_steps: as in ``attribute``.
            tolerance: as in ``attribute``.
            max_steps: as in ``attribute``.

        Returns:
            A list of K results; result ``k`` equals (to float rounding)
            ``attribute(inputs, target=targets[k], ...)`` with the same other arguments.

        Raises:
            ValueError: ``targets`` is empty, or mixes None with indexing targets.
            TypeError: ``targets`` is not a sequence.

        Examples:
            >>> import torch
            >>> from torch import nn
            >>> from fastattr import LayerIntegratedGradients
            >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
            >>> lig = LayerIntegratedGradients(model, model[1])
            >>> per_class = lig.attribute_targets(torch.randn(2, 4), [0, 2])
            >>> len(per_class), per_class[1].shape
            (2, torch.Size([2, 8]))
        """
        return self._attribute_targets(
            inputs,
            baselines,
            lambda batch: check_target_sequence(targets, batch, check_target),
            additional_forward_args,
            PathOptions(n_steps, method, internal_batch_size, tolerance, max_steps),
            return_convergence_delta,
            return_n_steps,
            attribute_to_layer_input,
            grad_kwargs,
        )

    def _attribute_targets(
        self,
        inputs: TensorOrTuple,
        baselines: BaselineType,
        checked_targets: Callable[[int], list[Any]],
        additional_forward_args: Any,
        options: PathOptions,
        return_convergence_delta: bool,
        return_n_steps: bool,
        attribute_to_layer_input: bool,
        grad_kwargs: dict[str, Any] | None,
    ) -> list[Any]:
        layers = as_layer_list(self.layer)
        check_layers_in_model(self.forward_func, layers, "layer")
        _check_grad_kwargs(grad_kwargs)
        model_inputs = as_tensor_tuple(inputs)
        baseline_tuple = format_baselines(baselines, model_inputs)
        starts = tuple(b.expand_as(x).contiguous() for b, x in zip(baseline_tuple, model_inputs))
        adaptive = options.check()
        batch = model_inputs[0].shape[0]
        targets = checked_targets(batch)
        args = format_additional_args(additional_forward_args)
        with kept_buffers(self.forward_func):
            return self._integrate(
                model_inputs,
                starts,
                targets,
                args,
                options,
                adaptive,
                return_convergence_delta,
                return_n_steps,
                attribute_to_layer_input,
                grad_kwargs,
            )

    def _integrate(
        self,
        model_inputs: tuple[Tensor, ...],
        starts: tuple[Tensor, ...],
        targets: list[Any],
        args: tuple[Any, ...] | None,
        options: PathOptions,
        adaptive: tuple[float, int] | None,
        return_convergence_delta: bool,
        return_n_steps: bool,
        attribute_to_layer_input: bool,
        grad_kwargs: dict[str, Any] | None,
    ) -> list[Any]:
        layers = as_layer_list(self.layer)
        batch = model_inputs[0].shape[0]
        steps_per_chunk = steps_per_chunk_for(options.internal_batch_size, batch)

        # A layer that runs more than once is replaced at every call, so only its last call
        # reaches the output: its path must run between its last call's values (captum's
        # convention). The first chunk tells; then the values come from a full pass. A model
        # with dropout in training mode gets full passes from the start: captum's draws.
        for last in (True,) if draws_dropout(self.forward_func) else (False, True):
            at_inputs, at_starts = self._layer_values(
                model_inputs, starts, args, attribute_to_layer_input, last
            )
            _check_same_nones(at_inputs, at_starts)
            counts = [len(tensors_of(values)) for values in at_inputs]
            ends = tuple(v for values in at_inputs for v in tensors_of(values))
            path_starts = tuple(v for values in at_starts for v in tensors_of(values))
            check_floating(
                ends, "the values of layer", "; choose a layer with floating point values"
            )
            if batch and any(v.shape[0] % batch for v in ends):
                # One row for a batch of several: a value shared by the examples (a position
                # embedding of ids from a buffer), whose per-example path the model may not take.
                shared = (
                    "; a layer with one row for the whole batch computes one value for every "
                    "example: give it per-example inputs (position ids as an input)"
                    if any(v.shape[0] == 1 for v in ends)
                    else ""
                )
                raise ValueError(
                    f"the values of layer must hold the examples ({batch}) along dimension 0, "
                    f"possibly several rows each, got shapes {[list(v.shape) for v in ends]}"
                    f"{shared}"
                )
            exact = options.method == EXACT
            if (return_convergence_delta or exact) and any(v.shape[0] != batch for v in ends):
                raise ValueError(
                    f"{'method=exact' if exact else 'return_convergence_delta'} needs the "
                    f"values of layer to hold the examples along dimension 0 ({batch}), got "
                    f"shapes {[list(v.shape) for v in ends]}"
                )

            # Layers that cut one another's paths are refused at the first chunk (the graph is
            # walked back from each layer and from the output to tell).
            unchecked = [len(layers) > 1]

            def evaluate(
                paths: tuple[Tensor, ...],
                rows: PointRows,
                counts=counts,
                layouts=at_inputs,
                last=last,
                unchecked=unchecked,
            ) -> list[Tensor]:
                calls = [0] * len(layers)
                with replaced_layers(
                    layers,
                    [with_nones(g, like) for g, like in zip(_group(paths, counts), layouts)],
                    attribute_to_layer_input,
                    calls=calls,
                    check_paths=unchecked[0],
                ) as check_paths:
                    output = self.forward_func(
                        *args_for_points(model_inputs, rows), *args_for_points(args, rows)
                    )
                    check_paths(output)
                unchecked[0] = False
                if not last and max(calls) > 1:
                    raise LayerCalledAgain
                return [
                    path_output(
                        select_targets(output, targets_for_points(t, rows)),
                        len(rows),
                        rows.as_captum,
                    )
                    for t in targets
                ]

            try:
                result, steps = integrate(
                    ends,
                    path_starts,
                    evaluate,
                    batch=batch,
                    method=options.method,
                    n_steps=options.n_steps,
                    adaptive=adaptive,
                    targets=len(targets),
                    steps_per_chunk=steps_per_chunk,
                    multiply_by_inputs=self.multiplies_by_inputs,
                    model=self.forward_func,
                    whole_steps=needs_whole_steps(args, batch),
                    step_costs=self._step_costs,
                    cost_key=(tuple(x.shape[1:] for x in model_inputs), attribute_to_layer_input),
                    grad_kwargs=grad_kwargs,
                )
                break
            except LayerCalledAgain:
                continue
        results = []
        for attributions in result.attributions:
            per_layer = [
                format_output(len(group) > 1, group) for group in _group(attributions, counts)
            ]
            results.append(per_layer if isinstance(self.layer, list) else per_layer[0])
        deltas: list[Any] = [None] * len(targets)
        if return_convergence_delta:
            # The path's own outputs can't stand in for the model's at the inputs and
            # baselines: branches that bypass the layer saw the inputs all along the path.
            start_outs = outputs_per_example(self.forward_func, starts, targets, args)
            end_outs = outputs_per_example(self.forward_func, model_inputs, targets, args)
            deltas = convergence_deltas(result.row_sums, end_outs, start_outs)
        return [
            with_extras(attributions, delta, s if return_n_steps else None)
            for attributions, delta, s in zip(results, deltas, steps)
        ]
