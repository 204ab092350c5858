"""LRP and LayerLRP with captum's API and numbers, in one forward and one backward."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Union

import torch
from torch import Tensor, nn

from fastattr._autograd import input_gradients
from fastattr._formatting import (
    ColumnIndices,
    TargetType,
    TensorOrTuple,
    as_tensor_tuple,
    check_target,
    format_additional_args,
    format_output,
    per_example,
    run_forward,
)
from fastattr.attr._base import Attribution, LayerAttribution
from fastattr.lrp.propagation import (
    CopiesNeeded,
    Propagation,
    RulePlan,
    check_user_rules,
    plan_rules,
    rules_key,
    same_key,
)

LayerType = Union[nn.Module, list[nn.Module]]
# The layer tensors to differentiate as well, known once the forward has run.
LayerTensors = Union[Callable[[], tuple[Tensor, ...]], None]


def _per_example_sum(tensors: tuple[Tensor, ...]) -> Tensor:
    return sum(t.reshape(t.shape[0], -1).sum(1) for t in tensors)  # type: ignore[return-value]


def _tensors(output: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    # A block (a module without a rule of its own) may return several tensors.
    return output if isinstance(output, tuple) else (output,)


def _scaled(relevance: Tensor, output: Tensor) -> Tensor:
    # The backward starts from 1 at the target, as captum's does; scaling at the end gives its
    # rounding.
    return relevance * output.reshape((-1,) + (1,) * (relevance.dim() - 1))


class LRP(Attribution, captum_class="LRP"):
    """Layer-wise relevance propagation: the target output, sent back layer by layer by each
    module's rule (``module.rule``, or the default of its type) down to the inputs.

    The relevance of each example sums to its target output, less what the rules' stabilizers
    and biases absorb.

    Args:
        model: The model. Its modules' ``rule`` attributes, where set, choose their rules.

    Raises:
        TypeError: ``model`` is not a module, or a module's ``rule`` is not an LRP rule.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from fastattr import LRP
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
        >>> relevance = LRP(model).attribute(torch.randn(2, 4), target=0)
        >>> relevance.shape
        torch.Size([2, 4])
    """

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_user_rules(model)
        super().__init__(model)
        self.model = model
        # Set once a forward modified a rule's output in place (`out += x`): from then on the
        # rules hand out copies, as captum's always do.
        self._copies = False
        self._plan: tuple[tuple, RulePlan] | None = None
        # One per copy flag, reused while the plan holds (its hooks are built once).
        self._propagations: dict[bool, Propagation] = {}

    @property
    def multiplies_by_inputs(self) -> bool:
        """LRP's relevance includes the input factor: always True."""
        return True

    def has_convergence_delta(self) -> bool:
        """LRP has a convergence delta: always True."""
        return True

    def attribute(
        self,
        inputs: TensorOrTuple,
        target: TargetType = None,
        additional_forward_args: Any = None,
        return_convergence_delta: bool = False,
        verbose: bool = False,
    ) -> TensorOrTuple | tuple[TensorOrTuple, Tensor]:
        """The relevance of every input feature for the target output.

        Args:
            inputs: a tensor, or a tuple of tensors, with the examples along dimension 0.
            target: the output to explain, in captum's forms: None for a model with one output
                per example, an int or a one-element tensor for the same column of every example,
                a tuple of indices after the batch dimension, or a list / (B,) tensor with one
                index per example.
            additional_forward_args: further arguments of the model, after the inputs; not
                attributed.
            return_convergence_delta: also return the per-example delta of
                [compute_convergence_delta][fastattr.LRP.compute_convergence_delta].
            verbose: print the rule applied on each layer.

        Returns:
            The relevance in the inputs' shapes (a tuple for tuple inputs), and with
            ``return_convergence_delta`` the (B,) deltas.
        """
        plan = self._rule_plan()
        is_tuple, tensors, target, args = self._prepare(inputs, target, additional_forward_args)
        for i, tensor in enumerate(tensors):
            if not tensor.is_floating_point():
                raise TypeError(
                    f"inputs[{i}] must be a floating point tensor, got {tensor.dtype} (for the "
                    "relevance of token ids, use LayerLRP on the embedding layer)"
                )
        if verbose:
            plan.report()
        grads, output = self._propagate(
            lambda copy: self._propagation(plan, copy),
            tensors,
            target,
            args,
            None,
        )
        relevances = tuple(_scaled(g, output) for g in grads)
        result = format_output(is_tuple, relevances)
        if return_convergence_delta:
            return result, self.compute_convergence_delta(relevances, output)
        return result

    def compute_convergence_delta(self, attributions: TensorOrTuple, output: Tensor) -> Tensor:
        """Per example, the target output minus the summed relevance: zero when the rules
        conserve relevance exactly, otherwise what stabilizers and biases absorbed.

        Args:
            attributions: relevance as returned by ``attribute`` (a tensor or a tuple).
            output: the target output, one value per example.

        Returns:
            A (B,) tensor of deltas.
        """
        tensors = as_tensor_tuple(attributions, "attributions")
        if not isinstance(output, Tensor):
            raise TypeError(f"output must be a tensor, got {type(output).__name__}")
        return output.flatten() - _per_example_sum(tensors).flatten()

    def _rule_plan(self) -> RulePlan:
        key = rules_key(self.model)
        if self._plan is None or not same_key(self._plan[0], key) or not self._plan[1].reusable:
            self._plan = (key, plan_rules(self.model))
        return self._plan[1]

    def _propagation(self, plan: RulePlan, copy: bool) -> Propagation:
        found = self._propagations.get(copy)
        if found is None or found.plan is not plan or found.active:
            found = self._propagations[copy] = Propagation(self.model, plan, copy=copy)
        return found

    def _prepare(
        self, inputs: Any, target: TargetType, additional_forward_args: Any
    ) -> tuple[bool, tuple[Tensor, ...], TargetType | ColumnIndices, tuple[Any, ...] | None]:
        tensors = as_tensor_tuple(inputs)
        target = check_target(target, tensors[0].shape[0])
        args = format_additional_args(additional_forward_args)
        return isinstance(inputs, tuple), tensors, target, args

    def _propagate(
        self,
        propagation: Callable[[bool], Propagation],
        tensors: tuple[Tensor, ...],
        target: TargetType | ColumnIndices,
        args: tuple[Any, ...] | None,
        layer_tensors: LayerTensors,
    ) -> tuple[tuple[Tensor, ...], Tensor]:
        """The backward of :meth:`_backward`, run again with copied rule outputs when the
        forward turned out to modify one in place."""
        if not self._copies:
            try:
                with propagation(False) as active:
                    return self._backward(active, tensors, target, args, layer_tensors)
            except CopiesNeeded:
                self._copies = True
        with propagation(True) as active:
            return self._backward(active, tensors, target, args, layer_tensors)

    def _backward(
        self,
        propagation: Propagation,
        tensors: tuple[Tensor, ...],
        target: TargetType | ColumnIndices,
        args: tuple[Any, ...] | None,
        layer_tensors: LayerTensors,
    ) -> tuple[tuple[Tensor, ...], Tensor]:
        """Relevance (normalized to 1 at the target) at the inputs, then at the tensors
        ``layer_tensors`` names once the forward has run; and the target output."""
        with torch.enable_grad():
            # Integer inputs (token ids, for LayerLRP) carry no relevance.
            leaves = tuple(
                t.detach().requires_grad_() if t.is_floating_point() else t for t in tensors
            )
            # Views give the inputs a grad_fn, which marks them as activations for the
            # residual-addition rule (when some forward may add).
            inputs = tuple(
                x.view_as(x) if x.requires_grad and propagation.plan.may_add else x for x in leaves
            )
            output = per_example(
                run_forward(propagation.forward, inputs, target, args), tensors[0].shape[0]
            )
            differentiable = tuple(x for x in leaves if x.requires_grad)
            wanted = differentiable + (layer_tensors() if layer_tensors is not None else ())
            found = iter(input_gradients(output, wanted, torch.ones_like(output)))
        grads = tuple(next(found) if x.requires_grad else None for x in leaves) + tuple(found)
        wanted = leaves + wanted[len(differentiable) :]
        grads = tuple(torch.zeros_like(w) if g is None else g for g, w in zip(grads, wanted))
        return grads, output.detach()


class LayerLRP(LRP, LayerAttribution, captum_class="LayerLRP"):
    """LRP relevance at the output (or input) of one layer, or of each layer in a list.

    Args:
        model: The model, as for [fastattr.LRP][].
        layer: A module of ``model`` that carries a rule, or a non-empty list of them.

    Raises:
        TypeError: ``layer`` is not a module or a list of modules.
        ValueError: A layer is not a module of ``model``.
    """

    def __init__(self, model: nn.Module, layer: LayerType) -> None:
        super().__init__(model)
        layers = layer if isinstance(layer, list) else [layer]
        if not layers or not all(isinstance(m, nn.Module) for m in layers):
            raise TypeError("layer must be a module of the model or a non-empty list of them")
        owned = set(map(id, model.modules()))
        for m in layers:
            if id(m) not in owned:
                raise ValueError(f"layer {type(m).__name__} is not a module of the model")
        self.layer = layer

    def attribute(  # type: ignore[override]
        self,
        inputs: TensorOrTuple,
        target: TargetType = None,
        additional_forward_args: Any = None,
        return_convergence_delta: bool = False,
        attribute_to_layer_input: bool = False,
        verbose: bool = False,
    ) -> Any:
        """The relevance at the layer's output (or input, with ``attribute_to_layer_input``).

        Args:
            inputs: As for [fastattr.LRP.attribute][].
            target: As for [fastattr.LRP.attribute][].
            additional_forward_args: As for [fastattr.LRP.attribute][].
            return_convergence_delta: Also return each example's convergence delta.
            attribute_to_layer_input: The relevance at the layer's inputs instead of its
                output.
            verbose: Print the rule each module gets.

        Returns:
            A tensor (a tuple for a layer with several inputs), or a list of those when
            ``layer`` is a list; with ``return_convergence_delta`` also the (B,) deltas (a list
            of them for a list of layers).

        Raises:
            ValueError: A layer carries no rule of its own, or did not run in the forward.
        """
        if not isinstance(attribute_to_layer_input, bool):
            raise TypeError(
                "attribute_to_layer_input must be a bool, got "
                f"{type(attribute_to_layer_input).__name__}"
            )
        plan = self._rule_plan()
        _, tensors, target, args = self._prepare(inputs, target, additional_forward_args)
        layers = self.layer if isinstance(self.layer, list) else [self.layer]
        if verbose:
            plan.report()
        propagation = Propagation(self.model, plan, taps=layers)

        def propagation_with(copy: bool) -> Propagation:
            nonlocal propagation
            propagation = Propagation(self.model, plan, taps=layers, copy=copy)
            return propagation

        def recorded() -> tuple[Tensor, ...]:
            found = []
            for layer in layers:
                if id(layer) not in propagation.tapped:
                    raise ValueError(f"layer {type(layer).__name__} did not run in the forward")
                layer_inputs, layer_output = propagation.tapped[id(layer)]
                found.extend(layer_inputs if attribute_to_layer_input else _tensors(layer_output))
            return tuple(found)

        grads, output = self._propagate(propagation_with, tensors, target, args, recorded)
        grads = grads[len(tensors) :]
        results: list[TensorOrTuple] = []
        for layer in layers:
            layer_inputs, layer_output = propagation.tapped[id(layer)]
            count = len(layer_inputs if attribute_to_layer_input else _tensors(layer_output))
            scaled = tuple(_scaled(g, output) for g in grads[:count])
            grads = grads[count:]
            results.append(scaled if len(scaled) > 1 else scaled[0])
        if not isinstance(self.layer, list):
            relevance = results[0]
            if return_convergence_delta:
                return relevance, self.compute_convergence_delta(relevance, output)
            return relevance
        if return_convergence_delta:
            return results, [self.compute_convergence_delta(r, output) for r in results]
        return results
