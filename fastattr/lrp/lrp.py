"""LRP and LayerLRP with captum's API and numbers, in one forward and one backward."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Union

import torch
from torch import Tensor, nn

from fastattr._autograd import input_gradients
from fastattr._compiled import compiled_code_runs_eagerly, uncompiled
from fastattr._formatting import (
    ColumnIndices,
    TargetType,
    TensorOrTuple,
    as_tensor_tuple,
    check_target,
    check_target_sequence,
    format_additional_args,
    format_output,
)
from fastattr._forward import (
    check_differentiable,
    path_output,
    row_sums,
    run_forward,
    select_targets,
)
from fastattr._model_state import kept_buffers
from fastattr.attr._base import Attribution, LayerAttribution
from fastattr.canonizers import Canonizer
from fastattr.lrp.propagation import (
    CopiesNeeded,
    CopyNeededAt,
    MergeMissed,
    Relevance,
    RulePlan,
    WritesNeedCopies,
    check_user_rules,
    plan_key,
    plan_rules,
    same_key,
)

LayerType = Union[nn.Module, list[nn.Module]]
# The layer tensors to differentiate as well, read once the forward has run.
LayerTensors = Union[Callable[[Relevance], tuple[Tensor, ...]], None]


def _per_example_sum(tensors: tuple[Tensor, ...]) -> Tensor:
    return sum(row_sums(t) for t in tensors)  # type: ignore[return-value]


def _or_zeros(grad: Tensor | None, wanted: Tensor) -> Tensor:
    return torch.zeros_like(wanted) if grad is None else grad


def _target_output(output: Any, target: Any, k: int, batch: int) -> Tensor:
    """The output of ``targets[k]``, naming it in the error when it selects nothing valid."""
    try:
        return path_output(select_targets(output, target), batch, True)
    except (ValueError, IndexError) as error:
        raise type(error)(f"targets[{k}]: {error}") from None


def _leaf(tensor: Tensor) -> Tensor:
    """An input as a leaf of LRP's graph. Integer inputs (token ids, for LayerLRP) carry no
    relevance; a tensor made under torch.inference_mode() is copied, as autograd can't record
    it (captum fails: "Setting requires_grad=True on inference tensor")."""
    if tensor.is_inference():
        tensor = tensor.clone()
    return tensor.detach().requires_grad_() if tensor.is_floating_point() else tensor


def _check_floating(tensors: tuple[Tensor, ...]) -> None:
    for i, tensor in enumerate(tensors):
        if not tensor.is_floating_point():
            raise TypeError(
                f"inputs[{i}] must be a floating point tensor, got {tensor.dtype} (for the "
                "relevance of token ids, use LayerLRP on the embedding layer)"
            )


def _tensors(output: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    # A block (a module without a rule of its own) may return several tensors.
    return output if isinstance(output, tuple) else (output,)


_NO_OUTPUT = "output that depends on the attributed inputs: no relevance reaches it"
_NO_POSITIONAL_INPUT = (
    "positional input that depends on the attributed inputs. Module hooks see positional "
    "inputs only: a module called with keyword arguments, as HuggingFace calls its attention "
    "modules, shows none. Take the output of the module before it, or a submodule called "
    "positionally, such as the attention's output projection."
)


_NEVER_CALLED_CONTAINER = (
    ": it has no forward of its own (a container such as ModuleList is never called itself); "
    "pass one of the modules it holds"
)


def _scaled(relevance: Tensor, output: Tensor) -> Tensor:
    # The backward starts from 1 at the target, as captum's does; scaling at the end gives its
    # rounding.
    return relevance * output.reshape((-1,) + (1,) * (relevance.dim() - 1))


def _check_canonizers(canonizers: object) -> tuple[Canonizer, ...]:
    if canonizers is None:
        return ()
    if isinstance(canonizers, Canonizer) or not isinstance(canonizers, (list, tuple)):
        raise TypeError(
            "canonizers must be a list of fastattr.canonizers objects, got "
            f"{type(canonizers).__name__}"
        )
    for i, canonizer in enumerate(canonizers):
        if not isinstance(canonizer, Canonizer):
            raise TypeError(
                f"canonizers[{i}] must be a fastattr.canonizers.Canonizer, got "
                f"{type(canonizer).__name__}"
            )
    return tuple(canonizers)


class LRP(Attribution, captum_class="LRP"):
    """Layer-wise relevance propagation: the target output, sent back layer by layer by each
    module's rule (``module.rule``, or the default of its type) down to the inputs.

    The relevance of each example sums to its target output, less what the rules' stabilizers
    and biases absorb. With no canonizer the numbers are captum's; canonizers
    ([fastattr.canonizers][]) change how the model is read, for this object's calls only.

    Args:
        model: the model; rules are read from its modules' ``rule`` attributes at every call.
        canonizers: canonizers applied to every call, in order.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from fastattr import LRP
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> relevance, delta = LRP(model).attribute(
        ...     torch.randn(2, 4), target=1, return_convergence_delta=True)
        >>> relevance.shape, delta.shape
        (torch.Size([2, 4]), torch.Size([2]))
    """

    def __init__(self, model: nn.Module, canonizers: Sequence[Canonizer] | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_user_rules(model)
        super().__init__(model)
        self.model = model
        self.canonizers = _check_canonizers(canonizers)
        # Set once a forward modified a rule's output in place (`out += x`): from then on the
        # rules hand out copies, as captum's always do.
        self._copies = False
        # The sites where a forward wrote into a rule's output handed on uncopied (see
        # Relevance.ratio): rules hand out copies there from then on.
        self._copied_sites: frozenset[int] = frozenset()
        # Set once the backward found a tensor an in-place ReLU wrote into in use elsewhere:
        # from then on such modules write into copies.
        self._copy_writes = False
        # The linear modules whose outputs, held for a batch norm to merge, no batch norm
        # merged (see Relevance.held_for_merge): from then on they make their rules' nodes.
        self._unheld: frozenset[int] = frozenset()
        # Cleared once a held output had another use: from then on no output is held.
        self._holds_merges = True
        self._plan: tuple[tuple, RulePlan] | None = None

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

        Raises:
            TypeError: a module of the model has no rule (before anything else is checked),
                or an input is not a floating point tensor.
            RuntimeError: called under ``torch.inference_mode()``, which records no graph.
        """
        plan = self._rule_plan()
        is_tuple, tensors, target, args = self._prepare(inputs, target, additional_forward_args)
        _check_floating(tensors)
        if verbose:
            plan.report()
        ((grads, output),) = self._propagate(plan, (), tensors, [target], args, None)
        return self._result(is_tuple, grads, output, return_convergence_delta)

    def attribute_targets(
        self,
        inputs: TensorOrTuple,
        targets: Any,
        additional_forward_args: Any = None,
        return_convergence_delta: bool = False,
        verbose: bool = False,
    ) -> list[Any]:
        """The relevance for several targets at once: one forward serves them all, then one
        backward per target.

        Args:
            inputs: As for [attribute][fastattr.LRP.attribute].
            targets: K targets, a list or a tuple (or a tensor: one target per entry of its
                first dimension), each in any form ``attribute``'s ``target`` takes.
            additional_forward_args: As for [attribute][fastattr.LRP.attribute].
            return_convergence_delta: As for [attribute][fastattr.LRP.attribute].
            verbose: As for [attribute][fastattr.LRP.attribute].

        Returns:
            A list of K results; result ``k`` equals (to float rounding)
            ``attribute(inputs, target=targets[k], ...)`` with the same other arguments.

        Raises:
            TypeError: A module of the model has no rule, or ``targets`` is not a sequence.
            ValueError: ``targets`` is empty, or mixes None with indexing targets.

        Examples:
            >>> import torch
            >>> from torch import nn
            >>> from fastattr import LRP
            >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
            >>> per_class = LRP(model).attribute_targets(torch.randn(2, 4), [0, 1, 2])
            >>> len(per_class), per_class[0].shape
            (3, torch.Size([2, 4]))
        """
        plan = self._rule_plan()
        is_tuple, tensors, _, args = self._prepare(inputs, None, additional_forward_args)
        _check_floating(tensors)
        checked = check_target_sequence(targets, tensors[0].shape[0], check_target)
        if verbose:
            plan.report()
        found = self._propagate(plan, (), tensors, checked, args, None)
        return [
            self._result(is_tuple, grads, output, return_convergence_delta)
            for grads, output in found
        ]

    def _result(
        self, is_tuple: bool, grads: tuple[Tensor, ...], output: Tensor, with_delta: bool
    ) -> Any:
        relevances = tuple(_scaled(g, output) for g in grads)
        result = format_output(is_tuple, relevances)
        if with_delta:
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
        batch = tensors[0].shape[0]
        if output.numel() not in (1, batch):  # one value broadcasts, as in captum
            raise ValueError(
                f"output must hold one value per example ({batch}), got shape {list(output.shape)}"
            )
        return output.flatten() - _per_example_sum(tensors).flatten()

    def _rule_plan(self) -> RulePlan:
        key = plan_key(self.model, self.canonizers)
        cached = self._plan
        if cached is not None and same_key(cached[0], key) and cached[1].reusable:
            return cached[1]
        plan = plan_rules(self.model, self.canonizers)
        self._plan = (key, plan)
        return plan

    def _prepare(
        self, inputs: Any, target: TargetType, additional_forward_args: Any
    ) -> tuple[bool, tuple[Tensor, ...], TargetType | ColumnIndices, tuple[Any, ...] | None]:
        if torch.is_inference_mode_enabled():
            # (Its tensors record no graph: the propagation would fail deep inside.)
            raise RuntimeError(
                "LRP propagates relevance through autograd, which torch.inference_mode() turns "
                "off: call attribute outside it (torch.no_grad() is fine)"
            )
        tensors = as_tensor_tuple(inputs)
        target = check_target(target, tensors[0].shape[0])
        args = format_additional_args(additional_forward_args)
        return isinstance(inputs, tuple), tensors, target, args

    def _propagate(
        self,
        plan: RulePlan,
        taps: Sequence[nn.Module],
        tensors: tuple[Tensor, ...],
        targets: Sequence[TargetType | ColumnIndices],
        args: tuple[Any, ...] | None,
        layer_tensors: LayerTensors,
    ) -> list[tuple[tuple[Tensor, ...], Tensor]]:
        """For each target: relevance (normalized to 1 at the target) at the inputs, then at
        the tensors ``layer_tensors`` reads once the forward has run; and the target output.
        One forward serves all targets. Run again with copied rule outputs when the forward
        turns out to modify one in place."""
        # Shared with the integrated-gradients methods: of concurrent calls on one model
        # (LRP's, IG's) the last to leave restores the values the first found.
        # Compiled code would skip the rules' hooks, or trace them into its graph.
        with kept_buffers(self.model), compiled_code_runs_eagerly():
            while True:
                relevance = Relevance(
                    plan,
                    copy=self._copies,
                    taps=taps,
                    copy_writes=self._copy_writes,
                    copied_sites=self._copied_sites,
                    holds_merges=self._holds_merges,
                    unheld=self._unheld,
                )
                try:
                    return self._backward(relevance, tensors, targets, args, layer_tensors)
                except (
                    CopiesNeeded,
                    CopyNeededAt,
                    WritesNeedCopies,
                    MergeMissed,
                    RuntimeError,
                ) as error:
                    if not self._retry(error):
                        raise

    def _retry(self, error: Exception) -> bool:
        """Whether the call is to run again after ``error``: with copies, when the forward
        wrote into a rule's output (autograd refuses that), or into a tensor a rule's backward
        needs (an in-place ReLU's input where its relevance has another use); holding no more
        the outputs no batch norm merged, or none, when a held output had another use."""
        if isinstance(error, MergeMissed) and error.modules:
            if error.modules <= self._unheld:
                return False
            self._unheld = self._unheld | error.modules
            return True
        if isinstance(error, MergeMissed):
            if not self._holds_merges:
                return False
            self._holds_merges = False
            return True
        if isinstance(error, CopyNeededAt):
            if error.site in self._copied_sites:
                return False
            self._copied_sites = self._copied_sites | {error.site}
            return True
        message = str(error)
        if isinstance(error, WritesNeedCopies):
            message = "modified by an inplace operation"
        if isinstance(error, CopiesNeeded) or "custom Function" in message:
            if self._copies:
                return False
            self._copies = True
            return True
        if "modified by an inplace operation" in message and not self._copy_writes:
            self._copy_writes = True
            return True
        return False

    def _backward(
        self,
        relevance: Relevance,
        tensors: tuple[Tensor, ...],
        targets: Sequence[TargetType | ColumnIndices],
        args: tuple[Any, ...] | None,
        layer_tensors: LayerTensors,
    ) -> list[tuple[tuple[Tensor, ...], Tensor]]:
        batch = tensors[0].shape[0]
        results = []
        with torch.enable_grad():
            leaves = tuple(_leaf(t) for t in tensors)
            model = uncompiled(self.model)
            if len(targets) == 1:
                selected = relevance.run(
                    lambda: run_forward(model, leaves, targets[0], args), leaves
                )
                outputs = [path_output(selected, batch, True)]
            else:
                full = relevance.run(lambda: run_forward(model, leaves, None, args), leaves)
                outputs = [_target_output(full, t, k, batch) for k, t in enumerate(targets)]
            relevance.check_writes(outputs)
            layer = layer_tensors(relevance) if layer_tensors is not None else ()
            differentiable = tuple(x for x in leaves if x.requires_grad)
            for k, output in enumerate(outputs):
                check_differentiable(output)
                keep = k < len(outputs) - 1  # the graph serves the next target too
                found = iter(
                    input_gradients(output, differentiable + layer, torch.ones_like(output), keep)
                )
                at_leaves = tuple(next(found) if x.requires_grad else None for x in leaves)
                grads = tuple(_or_zeros(g, w) for g, w in zip((*at_leaves, *found), leaves + layer))
                results.append((grads, output.detach()))
        return results


class LayerLRP(LRP, LayerAttribution, captum_class="LayerLRP"):
    """LRP relevance at the output (or input) of one layer, or of each layer in a list.

    Args:
        model: The model, as for [fastattr.LRP][].
        layer: a module of the model with a rule (or a list of them).
        canonizers: As for [fastattr.LRP][].

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from fastattr import LayerLRP
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> LayerLRP(model, model[2]).attribute(torch.randn(2, 4), target=0).shape
        torch.Size([2, 3])
    """

    def __init__(
        self,
        model: nn.Module,
        layer: LayerType,
        canonizers: Sequence[Canonizer] | None = None,
    ) -> None:
        super().__init__(model, canonizers)
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
            return_convergence_delta: also return the per-example deltas.
            attribute_to_layer_input: the relevance at the layer's inputs rather than at its
                output.
            verbose: print the rule applied on each layer.

        Returns:
            A tensor (a tuple for a layer with several inputs), or a list of those when
            ``layer`` is a list; with ``return_convergence_delta`` also the (B,) deltas (a list
            of them for a list of layers).

        Raises:
            TypeError: a module of the model has no rule.
            ValueError: the layer carries no rule of its own, or does not run exactly once.
        """
        plan = self._rule_plan()
        _, tensors, target, args = self._prepare(inputs, target, additional_forward_args)
        ((grads, output),), counts = self._layer_propagate(
            plan, tensors, [target], args, attribute_to_layer_input, verbose
        )
        return self._layer_result(grads[len(tensors) :], counts, output, return_convergence_delta)

    def attribute_targets(  # type: ignore[override]
        self,
        inputs: TensorOrTuple,
        targets: Any,
        additional_forward_args: Any = None,
        return_convergence_delta: bool = False,
        attribute_to_layer_input: bool = False,
        verbose: bool = False,
    ) -> list[Any]:
        """The layer's relevance for several targets at once: one forward serves them all,
        then one backward per target.

        Args:
            inputs: As for [attribute][fastattr.LayerLRP.attribute].
            targets: K targets, as for [fastattr.LRP.attribute_targets][].
            additional_forward_args: As for [attribute][fastattr.LayerLRP.attribute].
            return_convergence_delta: As for [attribute][fastattr.LayerLRP.attribute].
            attribute_to_layer_input: As for [attribute][fastattr.LayerLRP.attribute].
            verbose: As for [attribute][fastattr.LayerLRP.attribute].

        Returns:
            A list of K results; result ``k`` equals (to float rounding)
            ``attribute(inputs, target=targets[k], ...)`` with the same other arguments.

        Raises:
            TypeError: A module of the model has no rule, or ``targets`` is not a sequence.
            ValueError: ``targets`` is empty or mixes None with indexing targets, or a layer
                carries no rule of its own or does not run exactly once.
        """
        plan = self._rule_plan()
        _, tensors, _, args = self._prepare(inputs, None, additional_forward_args)
        checked = check_target_sequence(targets, tensors[0].shape[0], check_target)
        found, counts = self._layer_propagate(
            plan, tensors, checked, args, attribute_to_layer_input, verbose
        )
        return [
            self._layer_result(grads[len(tensors) :], counts, output, return_convergence_delta)
            for grads, output in found
        ]

    def _layer_propagate(
        self,
        plan: RulePlan,
        tensors: tuple[Tensor, ...],
        targets: Sequence[TargetType | ColumnIndices],
        args: tuple[Any, ...] | None,
        attribute_to_layer_input: bool,
        verbose: bool,
    ) -> tuple[list[tuple[tuple[Tensor, ...], Tensor]], list[int]]:
        """``_propagate`` with the layers' tensors: and how many each layer has."""
        if not isinstance(attribute_to_layer_input, bool):
            raise TypeError(
                "attribute_to_layer_input must be a bool, got "
                f"{type(attribute_to_layer_input).__name__}"
            )
        layers = self.layer if isinstance(self.layer, list) else [self.layer]
        if verbose:
            plan.report()
        counts: list[int] = []

        def recorded(relevance: Relevance) -> tuple[Tensor, ...]:
            found = []
            counts.clear()
            for layer in layers:
                if id(layer) not in relevance.tapped:
                    container = type(layer).forward is nn.Module.forward
                    raise ValueError(
                        f"layer {type(layer).__name__} did not run in the forward"
                        + (_NEVER_CALLED_CONTAINER if container else "")
                    )
                layer_inputs, layer_output = relevance.tapped[id(layer)]
                if not attribute_to_layer_input and not isinstance(layer_output, (Tensor, tuple)):
                    raise TypeError(
                        f"layer {type(layer).__name__} returns a {type(layer_output).__name__}: "
                        "LayerLRP reads a layer's output as a tensor or a tuple of tensors. "
                        "Take a submodule that returns the wanted tensor, or the input of the "
                        "module that reads it (attribute_to_layer_input=True)"
                    )
                taken = layer_inputs if attribute_to_layer_input else _tensors(layer_output)
                if not taken:
                    raise ValueError(
                        f"layer {type(layer).__name__} has no "
                        + (_NO_POSITIONAL_INPUT if attribute_to_layer_input else _NO_OUTPUT)
                    )
                counts.append(len(taken))
                found.extend(taken)
            return tuple(found)

        return self._propagate(plan, layers, tensors, targets, args, recorded), counts

    def _layer_result(
        self, grads: tuple[Tensor, ...], counts: list[int], output: Tensor, with_delta: bool
    ) -> Any:
        results: list[TensorOrTuple] = []
        for count in counts:
            for g in grads[:count]:
                # (One output value, as a batch-reducing forward gives, scales any shape.)
                if output.shape[0] > 1 and (g.dim() == 0 or g.shape[0] != output.shape[0]):
                    raise ValueError(
                        f"the layer's tensor has shape {list(g.shape)}, whose first dimension "
                        f"is not the batch ({output.shape[0]} examples): LayerLRP cannot tell "
                        "the examples' relevance apart there (a layer run on windows or "
                        "tokens folded into the batch); take a layer whose tensors lead with "
                        "the batch"
                    )
            scaled = tuple(_scaled(g, output) for g in grads[:count])
            grads = grads[count:]
            results.append(scaled if len(scaled) > 1 else scaled[0])
        if not isinstance(self.layer, list):
            if with_delta:
                return results[0], self.compute_convergence_delta(results[0], output)
            return results[0]
        if with_delta:
            return results, [self.compute_convergence_delta(r, output) for r in results]
        return results
