"""One forward that installs each rule's backward, then one backward that runs them.

``plan_rules`` decides, before any work, which rule every module gets (and fails once, listing
every module type without one). ``Propagation`` installs the rules as forward hooks (or
instance forwards doing their work) for the duration of a ``with`` block, routes additions of two
activations written with ``+`` in forward through the epsilon rule (residual connections), and
leaves the model exactly as it found it.

A product at a module's input folds into the previous module's epsilon ratio when only
pass-through rules lie between. Where the forwards' code proves that a module's output goes
into the next module and nowhere else, the output is handed on without its ratio node: the
next module folds the ratio in, or makes the node itself.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules import module as module_hooks
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from fastattr import ops
from fastattr.lrp._forward_code import call_chain, may_add_tensors
from fastattr.lrp.attention import transformer_default_rule
from fastattr.lrp.rules import (
    STABILIZER,
    STRUCTURAL_TYPES,
    IdentityRule,
    PassRule,
    PropagationRule,
    RatioRule,
    as_rule,
    default_rule,
    ratio_node,
)

# LRP's machinery: no name here is public API (fastattr.lrp exports what is).
__all__: list[str] = []


@dataclass
class RulePlan:
    """Every module that carries a rule, with its rule and where it came from."""

    rules: list[tuple[str, nn.Module, PropagationRule, bool]]  # (name, module, rule, user-set)
    modules: tuple[nn.Module, ...] = ()  # every module of the model, as walk_modules lists them
    may_add: bool = True  # whether some forward outside the rules may add tensors
    # False when a captum rule was translated: the translation would miss later changes to it.
    reusable: bool = True
    # id(module) -> the module its output goes into, and nowhere else, as the forwards' code
    # proves (see call_chain); empty unless every container's forward is proven.
    successors: dict[int, nn.Module] = field(default_factory=dict)

    def report(self) -> None:
        """Prints the rule of each layer, as captum's verbose mode does (activations that just
        pass relevance on are left out, as there)."""
        for _, module, rule, user_set in self.rules:
            if user_set or not isinstance(rule, PassRule):
                print(f"Applied {rule} on layer {module}")

    def rule_of(self, module: nn.Module) -> PropagationRule | None:
        return next((rule for _, m, rule, _ in self.rules if m is module), None)


def rule_attribute(module: nn.Module) -> object:
    """``module.rule``, or None; read from the instance first (a missing attribute would cost
    an exception in nn.Module.__getattr__)."""
    if "rule" in module.__dict__:
        return module.__dict__["rule"]
    return getattr(type(module), "rule", None)


def walk_modules(model: nn.Module) -> tuple[nn.Module, ...]:
    """``model.modules()``, without building the names that walk builds and drops."""
    found = [model]
    seen = {id(model)}
    for module in found:  # grows as it goes
        for child in module._modules.values():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                found.append(child)
    return tuple(found)


def rules_key(model: nn.Module) -> tuple:
    """The modules of ``model``, the rules set on them and their instance forwards (which
    change what the code proves), as objects: holding them keeps their ids from being reused,
    so that comparing ids tells whether a plan still holds."""
    modules = walk_modules(model)
    key: list[object] = list(modules)
    for module in modules:
        own = module.__dict__  # rule_attribute, inlined: this runs on every call
        key.append(own["rule"] if "rule" in own else getattr(type(module), "rule", None))
        key.append(own.get("forward"))
    return tuple(key)


def same_key(first: tuple, second: tuple) -> bool:
    return len(first) == len(second) and all(map(operator.is_, first, second))


def check_user_rules(model: nn.Module) -> None:
    """Check every ``module.rule`` the user set (captum's check at construction)."""
    for name, module in model.named_modules():
        rule = rule_attribute(module)
        if rule is not None:
            as_rule(rule, f"model.{name}" if name else "model")


def plan_rules(model: nn.Module) -> RulePlan:
    """The rule of each module: the user's ``module.rule`` (which then covers the module's
    submodules), else its type's default on leaves and on modules with parameters of their own.

    Raises a TypeError naming every module type that has neither, before anything runs.
    """
    rules: list[tuple[str, nn.Module, PropagationRule, bool]] = []
    missing: dict[str, list[str]] = {}
    may_add = False
    reusable = True
    containers: list[nn.Module] = []

    def visit(name: str, module: nn.Module) -> None:
        nonlocal may_add, reusable
        where = f"model.{name}" if name else "model"
        user_rule = rule_attribute(module)
        if user_rule is not None:
            rule = as_rule(user_rule, where)
            reusable = reusable and rule is user_rule
            reason = rule.unsupported_reason(module)
            if reason is not None:
                raise TypeError(f"{where}: {reason}")
            rules.append((name, module, rule, True))
            return
        children = list(module.named_children())
        own_parameters = next(module.parameters(recurse=False), None) is not None
        if not children or own_parameters:
            rule = default_rule(module) or transformer_default_rule(module)
            if rule is not None:
                rules.append((name, module, rule, False))
                return
            if own_parameters and not children:
                missing.setdefault(type(module).__name__, []).append(where)
            elif not isinstance(module, STRUCTURAL_TYPES):
                # Interim: the op rules apply to the calls of a module without a rule of its own.
                may_add = True
        if children:
            may_add = may_add or may_add_tensors(module)
            containers.append(module)
        for child_name, child in children:
            visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", model)
    if missing:
        listing = "; ".join(f"{kind} ({', '.join(names)})" for kind, names in missing.items())
        raise TypeError(
            f"LRP has no rule for these module types: {listing}. Set a rule on each "
            "(module.rule = EpsilonRule(), IdentityRule(), ...) if one is appropriate."
        )
    ruled = {id(module) for _, module, _, _ in rules}
    return RulePlan(rules, walk_modules(model), may_add, reusable, _successors(containers, ruled))


def _successors(containers: list[nn.Module], ruled: set[int]) -> dict[int, nn.Module]:
    """For each module with a rule that runs once, in a chain, right before another module with
    a rule: that module. Empty when some container's forward is not a proven chain, as then a
    module could be called, and its output used, where no chain shows it."""
    chains = []
    for container in containers:
        chain = call_chain(container)
        if chain is None:
            return {}
        chains.append(chain)
    calls: dict[int, int] = {}
    for chain in chains:
        for module in chain:
            if module is not None:
                calls[id(module)] = calls.get(id(module), 0) + 1
    successors = {}
    for chain in chains:
        for producer, consumer in itertools.pairwise(chain):
            if (
                producer is not None
                and consumer is not None
                and calls[id(producer)] == 1
                and id(producer) in ruled
                and id(consumer) in ruled
            ):
                successors[id(producer)] = consumer
    return successors


def _on_relevance_path(value: object) -> bool:
    # Activations derived from the inputs have a grad_fn: the inputs enter the model as views.
    return isinstance(value, Tensor) and value.grad_fn is not None and value.is_floating_point()


def _has_hooks(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
    )


def _torch_code(module: nn.Module) -> bool:
    """Whether ``module`` runs torch's own forward, which keeps no reference to its tensors."""
    return type(module).__module__.startswith("torch.nn.") and "forward" not in module.__dict__


def _takes_ratio(module: nn.Module, rule: PropagationRule | None) -> bool:
    """Whether ``module`` (with ``rule``, None when it folds nothing) can take an output handed
    on without its ratio node: its product folds the ratio in before the module's code sees
    the tensor, or it is a torch module whose pass-through hook makes the node."""
    if rule is None:
        return False
    return rule.relevance_at_input or (isinstance(rule, IdentityRule) and _torch_code(module))


def _has_global_hooks() -> bool:
    return bool(
        module_hooks._global_forward_hooks
        or module_hooks._global_forward_pre_hooks
        or module_hooks._global_backward_hooks
        or module_hooks._global_backward_pre_hooks
    )


class CopiesNeeded(Exception):
    """The forward modifies a rule's output in place: run it again with copied outputs."""


class _ResidualAdditions(TorchFunctionMode):
    """Sends ``a + b`` (and ``a += b``) of two activations through the epsilon rule, the LRP rule
    of a sum, instead of copying the relevance into both branches; leaves everything else alone.

    Additions inside a module that carries its own rule are the rule's business and are skipped.
    """

    _ADDITIONS = frozenset((torch.Tensor.add, torch.add, torch.Tensor.add_))

    def __init__(self, copy: bool) -> None:
        super().__init__()
        self.copy = copy
        self.depth = 0  # > 0 inside a module with a rule

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # Every torch call of the forward comes through here: keep the common case short.
        if func not in self._ADDITIONS:
            return func(*args, **(kwargs or {}))
        kwargs = kwargs or {}
        if (
            self.depth == 0
            and len(args) == 2
            and set(kwargs) <= {"alpha"}
            and _on_relevance_path(args[0])
            and _on_relevance_path(args[1])
        ):
            return self._add(args[0], args[1], kwargs.get("alpha", 1), func is torch.Tensor.add_)
        return func(*args, **kwargs)

    def _add(self, a: Tensor, b: Tensor, alpha: float, in_place: bool) -> Tensor:
        nodes = ops.lrp_nodes()
        first = nodes.product(a.clone() if in_place else a)
        second = nodes.product(b if alpha == 1 else alpha * b)
        total = nodes.ratio(first + second, None, STABILIZER, self.copy or in_place)
        if not in_place:
            return total
        # a.add_(b) must change a itself: write the sum into it, so that its history is the sum.
        # Autograd forbids that on the view a rule's node handed out: ask for copies instead.
        try:
            return a.copy_(total)
        except RuntimeError as error:
            # Refused before anything was written.
            if "custom Function" in str(error):
                raise CopiesNeeded from error
            raise


@dataclass
class Propagation:
    """Installs the plan's rules on entry, as forward hooks or, on modules without hooks of their
    own, as an instance ``forward`` doing the hooks' work; on exit removes them and restores the
    buffers of modules in training mode (running statistics), also when the forward raised."""

    model: nn.Module
    plan: RulePlan
    copy: bool = False  # copy every rule's output, not only when modules work in place
    taps: Sequence[nn.Module] = ()
    # id(layer) -> (its inputs, its output: a tuple of tensors for a block returning several)
    tapped: dict[int, tuple[tuple[Tensor, ...], Tensor | tuple[Tensor, ...]]] = field(
        default_factory=dict
    )
    _handles: list[RemovableHandle] = field(default_factory=list)
    _buffers: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    _mode: _ResidualAdditions | None = None
    # Rule outputs whose epsilon ratio a product at a later module's input may fold into, by id:
    # (the output, or what pass-through rules made of it; z; epsilon; whether it was handed on
    # without its ratio node). Holding the output keeps its id from being reused.
    _ratios: dict[int, tuple[Tensor, Tensor, float, bool]] = field(default_factory=dict)
    # (module, pre-hook or None, hook) for each (effective copy flag, hand-on flag), built on
    # first use: entered again, a Propagation only registers them.
    _hooks: dict[tuple[bool, bool], list[tuple[nn.Module, Callable | None, Callable]]] = field(
        default_factory=dict
    )
    _overridden: list[tuple[nn.Module, Callable | None]] = field(default_factory=list)
    # The backend's node constructors, looked up on entry rather than at every module.
    _nodes: ops.LrpNodes = field(default_factory=ops.lrp_nodes)
    active: bool = False  # between entry and exit

    def __enter__(self) -> Propagation:
        if self.active:
            raise RuntimeError("this Propagation is installed already")
        self.active = True
        self._nodes = ops.lrp_nodes()
        try:
            copy = self._save_buffers() or self.copy
            if self.plan.may_add:
                from fastattr.lrp._op_rules import OpRuleMode  # interim, see that module

                self._mode = OpRuleMode(copy)
            hooked = _has_global_hooks()
            via_hooks = [hooked or _has_hooks(module) for _, module, _, _ in self.plan.rules]
            # Hooks may see a module's output: hand none on without its node then.
            hand_on = bool(self.plan.successors) and not any(via_hooks)
            hooks = self._hooks.get((copy, hand_on))
            if hooks is None:
                hooks = self._hooks[copy, hand_on] = self._make_hooks(copy, hand_on)
            self.tapped.clear()
            for (module, pre_hook, hook), hooked_module in zip(hooks, via_hooks):
                if hooked_module:
                    if pre_hook is not None:
                        self._handles.append(module.register_forward_pre_hook(pre_hook))
                    self._handles.append(module.register_forward_hook(hook))
                else:
                    self._override(module, pre_hook, hook)
            for module in self.taps:
                if self.plan.rule_of(module) is None:
                    self._tap_block(module)
        except BaseException:
            self._restore()
            raise
        return self

    def _override(self, module: nn.Module, pre_hook: Callable | None, hook: Callable) -> None:
        # The hooks' work done by an instance forward, which costs less to install and to call
        # than hooks; only on modules without hooks of their own (which would then see other
        # tensors). It also sees calls of module.forward that bypass module(...).
        own = module.__dict__
        self._overridden.append((module, own.get("forward")))
        forward = module.forward

        def overridden(*args: Any, **kwargs: Any) -> Any:
            if pre_hook is not None:
                args = pre_hook(module, args)
            return hook(module, args, forward(*args, **kwargs))

        own["forward"] = overridden

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def forward(self, *args: Any) -> Any:
        """The model's forward, with its residual additions routed through the sum rule."""
        try:
            if self._mode is None:
                return self.model(*args)
            with self._mode:
                return self.model(*args)
        finally:
            # Held past the forward, the ratios that nothing folded into would keep their nodes,
            # and the tensors those save, alive through the backward.
            self._ratios.clear()

    def _save_buffers(self) -> bool:
        """Saves the buffers of modules in training mode; says whether a module works in place
        (then every rule's output is copied)."""
        in_place = False
        for module in self.plan.modules:
            in_place = in_place or module.__dict__.get("inplace") is True
            if module.training and module._buffers:
                self._buffers.extend((b, b.clone()) for b in module.buffers(recurse=False))
        return in_place

    def _restore(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module, forward in self._overridden:
            if forward is None:
                del module.__dict__["forward"]
            else:
                module.__dict__["forward"] = forward
        self._overridden.clear()
        if self._buffers:
            with torch.no_grad():
                for buffer, saved in self._buffers:
                    buffer.copy_(saved)
            self._buffers.clear()
        self._ratios.clear()
        self.active = False

    def _make_hooks(
        self, copy: bool, hand_on: bool
    ) -> list[tuple[nn.Module, Callable | None, Callable]]:
        taps = {id(t) for t in self.taps}
        # Depth counting only matters under the residual-addition mode.
        counts = self.plan.may_add
        # Folding a product into the previous ratio skips the nodes between, so not where a
        # tapped layer's relevance must reach them; and not on copies (in-place forwards).
        fused = {id(m): rule for _, m, rule, _ in self.plan.rules if not copy and id(m) not in taps}
        hooks = []
        for _, module, rule, _ in self.plan.rules:
            tap = id(module) in taps
            fuse = id(module) in fused
            successor = self.plan.successors.get(id(module)) if hand_on and fuse else None
            hands_on = (
                successor is not None
                and _torch_code(module)
                and _takes_ratio(successor, fused.get(id(successor)))
            )
            pre_hook = None
            if rule.relevance_at_input or tap or counts:
                pre_hook = self._pre_hook(rule, tap, counts, fuse)
            post_hook = self._post_hook(rule, tap, copy, counts, fuse, hands_on)
            hooks.append((module, pre_hook, post_hook))
        return hooks

    def _pre_hook(self, rule: PropagationRule, tap: bool, counts: bool, fuse: bool) -> Callable:
        mode_depth = self._enter_module
        ratios = self._ratios

        def product(a: object) -> object:
            if not isinstance(a, Tensor) or not a.is_floating_point():
                return a
            found = ratios.get(id(a)) if fuse else None
            if found is not None and found[0] is a:
                return self._nodes.product_ratio(found[1], a.detach(), found[2])
            return self._nodes.product(a)

        def hook(module: nn.Module, args: tuple) -> tuple:
            if counts:
                mode_depth(+1)
            if tap:
                # A private view per call: its gradient is this module's input relevance alone.
                args = tuple(a.view_as(a) if isinstance(a, Tensor) else a for a in args)
                self._record(module, args, None)
            if not rule.relevance_at_input:
                return args
            return tuple(map(product, args))

        return hook

    def _post_hook(
        self,
        rule: PropagationRule,
        tap: bool,
        copy: bool,
        counts: bool,
        fuse: bool,
        hands_on: bool,
    ) -> Callable:
        """``hands_on``: the output goes into one module, which folds the ratio into its product
        or makes the ratio node itself; the output is then handed on without a node."""
        mode_depth = self._enter_module
        ratios = self._ratios
        ratio_rule = rule if fuse and isinstance(rule, RatioRule) else None
        pass_rule = rule if isinstance(rule, IdentityRule) else None
        passes = fuse and pass_rule is not None

        def hook(module: nn.Module, args: tuple, output: object) -> Tensor:
            if counts:
                mode_depth(-1)
            if not isinstance(output, Tensor):
                raise TypeError(
                    f"LRP rules need modules that return one tensor; {type(module).__name__} "
                    f"returned {type(output).__name__}"
                )
            if ratio_rule is not None:
                z, epsilon = ratio_rule.ratio_operands(module, args, output)
                foldable = z is output or (z.dtype == output.dtype and z.shape == output.shape)
                if hands_on and foldable:
                    ratios[id(output)] = (output, z, epsilon, True)
                    return output
                propagated = ratio_node(self._nodes, z, output, epsilon, copy)
                if foldable:
                    ratios[id(propagated)] = (propagated, z, epsilon, False)
                return propagated
            found = None
            if pass_rule is not None:
                source = pass_rule.source(module, args, output)
                found = ratios.get(id(source))
                if found is not None and found[0] is not source:
                    found = None
                if found is not None and found[3]:  # a ratio handed on without its node
                    if hands_on and found[1].dtype == output.dtype:
                        ratios[id(output)] = (output, found[1], found[2], True)
                        return output
                    source = ratio_node(self._nodes, found[1], source, found[2], copy)
                propagated = self._nodes.passing(source, output.detach(), copy)
            else:
                propagated = rule.propagate(module, args, output, copy)
            if passes and found is not None and found[1].dtype == output.dtype:
                # The relevance crosses unchanged: a ratio before still awaits its product.
                ratios[id(propagated)] = (propagated, found[1], found[2], False)
            if tap:
                self._record(module, None, propagated)
            return propagated

        return hook

    def _tap_block(self, module: nn.Module) -> None:
        """Records the relevance at the inputs and outputs of a tapped module without a rule of
        its own (a block): private views of its tensors, which the relevance crosses as is."""

        def viewed(value: object) -> object:
            if isinstance(value, (tuple, list)):
                return type(value)(map(viewed, value))
            return value.view_as(value) if _on_relevance_path(value) else value

        def pre_hook(module: nn.Module, args: tuple) -> tuple:
            args = viewed(args)  # type: ignore[assignment]
            self._record(module, args, None)
            return args

        def hook(module: nn.Module, args: tuple, output: object) -> object:
            output = viewed(output)
            found = output if isinstance(output, (tuple, list)) else (output,)
            self._record(module, None, tuple(t for t in found if _on_relevance_path(t)))
            return output

        self._handles.append(module.register_forward_pre_hook(pre_hook))
        self._handles.append(module.register_forward_hook(hook))

    def _enter_module(self, step: int) -> None:
        if self._mode is not None:
            self._mode.depth += step

    def _record(
        self, module: nn.Module, inputs: tuple | None, output: Tensor | tuple[Tensor, ...] | None
    ) -> None:
        key = id(module)
        if inputs is not None:
            if key in self.tapped:
                raise ValueError(
                    f"layer {type(module).__name__} runs more than once in the forward, so its "
                    "relevance is ambiguous; LayerLRP needs a layer that runs once"
                )
            # The inputs relevance reaches: floating tensors on the graph.
            tensors = tuple(a for a in inputs if isinstance(a, Tensor) and a.requires_grad)
            self.tapped[key] = (tensors, torch.empty(0))
        else:
            assert output is not None
            self.tapped[key] = (self.tapped[key][0], output)
