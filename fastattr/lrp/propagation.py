"""One forward that builds each rule's backward, then one backward that runs them.

``plan_rules`` decides, before any work, which rule every module gets (and fails once,
listing every module without one). [Relevance][fastattr.lrp.Relevance] holds one call's
state: while it is running, process-wide module hooks hand each module call of *this thread*
to the module's rule, and a torch-function mode hands the torch calls that op rules take to
those rules. The model itself is never changed: no hook, forward or attribute is set on it,
so other threads (and other calls) see it as it is, and an interrupted call has nothing to
undo on it.

The data flow is observed as it happens, tensor by tensor, never guessed from source code:

- a product at a module's input folds into the epsilon ratio of the module that made that very
  tensor (object identity), through pass-through rules only; every rule output keeps its own
  node, so any other use of it (whatever code makes it) still gets the full rule;
- an op rule decides from its operands themselves (for the sum rule: whether both depend on the
  inputs, read off their autograd graph);
- a batch norm merges into the linear module whose output it receives.
"""

from __future__ import annotations

import contextvars
import inspect
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn.modules import module as module_hooks
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode
from torch.overrides import _get_current_function_mode as _current_function_mode
from torch.utils.hooks import RemovableHandle

from fastattr import ops
from fastattr.lrp.attention import runs_own_forward, transformer_module_rule
from fastattr.lrp.rules import (
    RULES_IGNORED_ON,
    STABILIZER,
    STRUCTURAL_TYPES,
    OpRule,
    PassRule,
    PropagationRule,
    as_rule,
    default_rule,
)
from fastattr.ops._checks import check_epsilon

if TYPE_CHECKING:
    from fastattr.canonizers import Canonizer


@dataclass(frozen=True)
class RulePlan:
    """Every module that carries a rule, by identity, with its rule; the op rules; the lines
    that ``verbose`` prints."""

    rules: dict[int, tuple[nn.Module, PropagationRule]]
    op_rules: dict[Callable[..., Any], OpRule | None]  # None: the call runs as it is
    modules: tuple[nn.Module, ...]  # every module of the model, once
    every_call: OpRule | None = None  # offered the torch calls no op rule lists
    applied: tuple[str, ...] = ()
    # False when a captum rule was translated: the translation would miss later changes to it.
    reusable: bool = True

    @property
    def has_op_rules(self) -> bool:
        """Whether some op rule is in use (then LRP's forward runs under a torch-function
        mode)."""
        return bool(self.op_rules) or self.every_call is not None

    def report(self) -> None:
        """Prints the rule of each layer, as captum's verbose mode does."""
        for line in self.applied:
            print(line)


def rule_attribute(module: nn.Module) -> object:
    """``module.rule``, or None; read from the instance first (a missing attribute would cost
    an exception in nn.Module.__getattr__)."""
    if "rule" in module.__dict__:
        return module.__dict__["rule"]
    return getattr(type(module), "rule", None)


def walk_modules(model: nn.Module) -> tuple[nn.Module, ...]:
    """Every module of ``model`` once (a module registered under two parents too), in
    ``model.modules()``'s order, without building the names that walk builds and drops."""
    found = [model]
    seen = {id(model)}
    # module._modules, here and in plan_key, is torch's private registry of children
    # (checked on torch 2.13 and 2.14; tests/test_torch_private_api.py).
    for module in found:  # grows as it goes
        for child in module._modules.values():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                found.append(child)
    return tuple(found)


def plan_key(model: nn.Module, canonizers: Sequence[Canonizer]) -> tuple:
    """The modules of ``model`` (as ``walk_modules`` lists them) each followed by the rule
    set on it, as objects: holding them keeps their ids from being reused, so that comparing
    ids tells whether a plan still holds. (One pass: this runs on every call.)"""
    key: list[object] = [*canonizers, model, rule_attribute(model)]
    modules = [model]
    seen = {id(model)}
    for module in modules:  # grows as it goes
        for child in module._modules.values():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                modules.append(child)
                own = child.__dict__
                key.append(child)
                key.append(own["rule"] if "rule" in own else getattr(type(child), "rule", None))
    return tuple(key)


def same_key(first: tuple, second: tuple) -> bool:
    return len(first) == len(second) and all(a is b for a, b in zip(first, second))


def check_user_rules(model: nn.Module) -> None:
    """Check every ``module.rule`` the user set (captum's check at construction)."""
    for name, module in model.named_modules():
        rule = rule_attribute(module)
        if rule is not None:
            as_rule(rule, f"model.{name}" if name else "model")


def _layer_children(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The submodules a module's values run through: not the parametrizations of a module
    parametrized with torch.nn.utils.parametrize (weight_norm, spectral_norm, orthogonal),
    which compute its weights, so that it keeps the rule of its type."""
    weights_only = "parametrizations" if parametrize.is_parametrized(module) else None
    return [(n, c) for n, c in module._modules.items() if c is not None and n != weights_only]


def _refuse_torchscript(model: nn.Module) -> None:
    scripted = [
        f"model.{name}" if name else "model"
        for name, module in model.named_modules()
        if isinstance(module, torch.jit.ScriptModule)
    ]
    if scripted:
        raise TypeError(
            f"LRP can't run TorchScript modules ({', '.join(scripted[:3])}"
            f"{', ...' if len(scripted) > 3 else ''}: made by torch.jit.trace or "
            "torch.jit.script): their compiled code runs no Python hooks, so no rule can act "
            "inside them. Pass the model before tracing or scripting it."
        )


def plan_rules(model: nn.Module, canonizers: Sequence[Canonizer] = ()) -> RulePlan:
    """The rule of each module, as captum picks it: the user's ``module.rule`` (which then
    covers the module's submodules), else the default of its type on modules without
    submodules; containers without a rule run as plain autograd. captum passes relevance
    straight through ReLU, Dropout and Tanh whatever rule is set on them, and so does this.
    Canonizers then adjust the rules (giving some to modules without one) and add op rules;
    when an op rule takes every torch call, a module without parameters and without a rule runs
    as code under the op rules.

    Args:
        model: The model.
        canonizers: The canonizers, in order.

    Returns:
        The plan.

    Raises:
        TypeError: naming every module without a rule (or the TorchScript modules), before
            anything runs.
    """
    _refuse_torchscript(model)
    canonizers = tuple(canonizer.for_model(model) for canonizer in canonizers)
    rules: dict[int, tuple[nn.Module, PropagationRule]] = {}
    applied: list[str] = []
    missing: dict[str, list[str]] = {}
    seen: set[int] = set()
    reusable = True
    op_rules: dict[Callable[..., Any], OpRule | None] = {}  # None: the call runs as it is
    every_call = None
    for canonizer in canonizers:
        for op_rule in canonizer.op_rules():
            if op_rule.functions is None:
                every_call = every_call or op_rule
            for function in op_rule.functions or ():
                op_rules.setdefault(function, op_rule)
    for function in every_call.runs_as_is if every_call is not None else ():
        op_rules.setdefault(function, None)

    def visit(name: str, module: nn.Module) -> None:
        nonlocal reusable
        if id(module) in seen:
            return
        seen.add(id(module))
        where = f"model.{name}" if name else "model"
        children = _layer_children(module)
        user_rule = rule_attribute(module)
        if user_rule is not None and not (not children and type(module) in RULES_IGNORED_ON):
            rule = as_rule(user_rule, where)
            reusable = reusable and rule is user_rule
            reason = rule.unsupported_reason(module)
            if reason is not None:
                raise TypeError(f"{where}: {reason}")
            applied.append(f"Applied {rule} on layer {module}")
        elif children:
            for child_name, child in children:
                visit(f"{name}.{child_name}" if name else child_name, child)
            return
        else:
            rule = PassRule() if user_rule is not None else default_rule(module)
        chosen = rule
        for canonizer in canonizers:  # which may give a rule to a module without one
            rule = canonizer.module_rule(module, rule)
        for canonizer in canonizers:  # which wrap the rule chosen (a batch norm's, to merge)
            rule = canonizer.wrap_rule(module, rule)
        if rule is not None and rule is not chosen:
            reason = rule.unsupported_reason(module)
            if reason is not None:
                raise TypeError(f"{where}: {reason} (the rule a canonizer gave it)")
        if rule is None:
            # A module without parameters runs as code when op rules take every call (they
            # refuse what they have no rule for).
            code = every_call is not None and (
                next(module.parameters(False), None) is None or runs_own_forward(module)
            )
            if not code and not isinstance(module, STRUCTURAL_TYPES):
                missing.setdefault(type(module).__name__, []).append(where)
            return
        if user_rule is None and not isinstance(rule, PassRule):
            applied.append(f"Applied {rule} on layer {module}")
        rules[id(module)] = (module, rule)

    visit("", model)
    if missing:
        listing = "; ".join(f"{kind} ({', '.join(names)})" for kind, names in missing.items())
        hint = ""
        if every_call is None and any(
            transformer_module_rule(module) is not None for module in walk_modules(model)
        ):
            hint = " For transformers, pass canonizers=[AttnLRP()] (fastattr.canonizers)."
        raise TypeError(
            f"LRP has no rule for these module types: {listing}. Set a rule on each "
            f"(module.rule = EpsilonRule(), IdentityRule(), ...) if one is appropriate.{hint}"
        )
    modules = walk_modules(model)
    return RulePlan(rules, op_rules, modules, every_call, tuple(applied), reusable)


class CopiesNeeded(Exception):
    """The forward modified a rule's output in place: run it again with copied outputs."""


class CopyNeededAt(Exception):
    """The forward is about to write into a rule's output handed on uncopied: run it again
    with a copy at that site (``site``: see Relevance's ``copied_sites``)."""

    def __init__(self, site: int) -> None:
        super().__init__(site)
        self.site = site


class MergeMissed(Exception):
    """A module output held for a batch norm to merge (see
    [held_for_merge][fastattr.lrp.Relevance.held_for_merge]) was not merged: the forward
    ended with ``modules`` (their ids) merged into by no batch norm, and LRP runs the call
    again holding theirs no more; or (``modules`` empty) the backward reached a held output,
    which then has another use, and LRP runs the call again holding none."""

    def __init__(self, modules: frozenset[int] = frozenset()) -> None:
        super().__init__(sorted(modules))
        self.modules = modules


class _HeldForMerge(torch.autograd.Function):
    """A module's output, handed on with no rule's nodes: the batch norm that merges it reads
    the module's own output instead, so relevance arrives here only through another use."""

    @staticmethod
    def forward(ctx: Any, output: Tensor) -> Tensor:
        return output.view_as(output)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        raise MergeMissed


class WritesNeedCopies(Exception):
    """A tensor an in-place ReLU wrote into has another use: run again with the ReLUs writing
    into copies."""


# The Relevance being built in this thread (or task), if any: the module hooks and the
# torch-function mode act for it alone.
_ACTIVE: contextvars.ContextVar[Relevance | None] = contextvars.ContextVar(
    "fastattr_lrp_relevance", default=None
)


class _ModuleHook:
    """A process-wide module (pre-)hook acting for one Relevance, only in the context
    that Relevance's forward runs in. It holds the Relevance weakly: once that is gone (its
    call over, however it ended), a hook still registered removes itself."""

    __slots__ = ("handle", "pre", "relevance")

    def __init__(self, relevance: Relevance, pre: bool) -> None:
        self.relevance = weakref.ref(relevance)
        self.pre = pre
        self.handle: RemovableHandle | None = None

    def __call__(self, module: nn.Module, args: tuple, *output: object) -> Any:
        relevance = self.relevance()
        if relevance is None:
            if self.handle is not None:
                self.handle.remove()
            return None
        if _ACTIVE.get() is not relevance:
            return None
        # The rules' own torch calls skip the op rules' mode, which would hand each one back
        # as it is. (torch._C.DisableTorchFunction: checked on torch 2.13 and 2.14; see
        # tests/test_torch_private_api.py.)
        with torch._C.DisableTorchFunction():
            if self.pre:
                return relevance._pre_hook(module, args)
            return relevance._post_hook(module, args, output[0])


def _finish_suspended_withs(error: BaseException | None, mode: _OpRules) -> None:
    """Closes the generator context managers that ``error`` (or an exception it was raised in
    handling) left suspended in the frames it passed through: their exits run now, as they
    would once the traceback is freed. Then takes ``mode``, which they put back, off."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        tb = error.__traceback__
        while tb is not None:
            for value in list(tb.tb_frame.f_locals.values()):
                generator = getattr(value, "gen", None)
                if inspect.isgenerator(generator) and generator.gi_suspended:
                    generator.close()
            tb = tb.tb_next
        error = error.__context__
    while _current_function_mode() is mode:
        torch._C._pop_torch_function_stack()


def _remove(hooks: Sequence[_ModuleHook]) -> None:
    """Removes the hooks, to the end even through a KeyboardInterrupt (raised once done)."""
    try:
        for hook in hooks:
            if hook.handle is not None:
                hook.handle.remove()
    finally:
        for hook in hooks:
            if hook.handle is not None:
                hook.handle.remove()


class _Ratio:
    """A tensor a rule handed on whose relevance goes to an epsilon ratio at ``z``, directly or
    through pass-through rules; a product at a later module's input may fold into that ratio.
    A ratio node's own output also notes what it shows (``raw``), whether that holds ``z``'s
    own values (``holds_z``: a product there cancels the ratio), and, when it is a module's
    output, the module, its rule and the inputs the rule saw. ``scale``, when known, says that
    the tensor holds ``z``'s own values times ``scale``, perhaps masked (see
    [scaled_scores][fastattr.lrp.Relevance.scaled_scores])."""

    __slots__ = (
        "epsilon",
        "foldable",
        "holds_z",
        "inputs",
        "module",
        "raw",
        "rule",
        "scale",
        "tensor",
        "version",
        "z",
    )

    def __init__(
        self,
        tensor: Tensor,
        z: Tensor,
        epsilon: float,
        foldable: bool,
        raw: Tensor | None = None,
        holds_z: bool = False,
        scale: float | None = None,
    ) -> None:
        self.tensor = tensor  # held: keeps its id from being reused
        # The tensor's version then: written into since, it is no longer the ratio's output.
        # (Tensor._version is private: checked on torch 2.13 and 2.14; see
        # tests/test_torch_private_api.py.)
        self.version = tensor._version
        self.z = z
        self.epsilon = epsilon
        self.foldable = foldable
        self.raw = raw  # the tensor the ratio node shows (held too)
        self.holds_z = holds_z
        self.scale = scale
        self.module: nn.Module | None = None
        self.rule: PropagationRule | None = None
        self.inputs: tuple = ()


class _OpRules(TorchFunctionMode):
    """Hands the torch calls that op rules take to those rules, outside modules with a rule."""

    def __init__(self, relevance: Relevance) -> None:
        super().__init__()
        self.relevance = relevance
        self.rules = relevance.plan.op_rules
        self.every_call = relevance.plan.every_call
        # A rule's TypeError raised where torch turns TypeErrors into NotImplemented (operators
        # such as `/`), raised again when the forward leaves the mode with another error.
        self.refusal: TypeError | None = None
        # Set when the mode was found off the stack on leaving it (see __exit__).
        self.lost = False

    def __exit__(self, kind, error, traceback):
        refusal, self.refusal = self.refusal, None
        # Not on top when an interrupt cut short the with statement in which torch takes the
        # mode off the stack while it runs (see under_op_rules): popping would fail, and
        # replace the interrupt with "trying to pop from empty mode stack".
        if _current_function_mode() is self:
            super().__exit__(kind, error, traceback)
        else:
            self.lost = True
        if refusal is not None and error is not None and error is not refusal:
            raise refusal from None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # Every torch call of the forward comes through here: keep the common case short.
        rule = self.rules.get(func, self.every_call)
        if rule is None or self.relevance.depth:
            return func(*args, **(kwargs or {}))
        try:
            return rule.apply(self.relevance, func, args, kwargs or {})
        except TypeError as error:
            self.refusal = error
            raise


class Relevance:
    """One LRP call's relevance graph under construction, and the methods rules build it with.

    Rules receive it as their first argument: [product][fastattr.lrp.Relevance.product],
    [ratio][fastattr.lrp.Relevance.ratio] and [passing][fastattr.lrp.Relevance.passing] make
    the nodes (and fold a product into the ratio before it where they can), the rest tell
    what the data flow of this call is. [run][fastattr.lrp.Relevance.run] runs a forward with
    this thread's module calls routed to their rules (and torch calls to op rules).

    Args:
        plan: The rules (made by LRP from the model's modules and canonizers).
        copy: Hand on copies of what the rules make (the forward writes into one in place).
        taps: The modules whose input and output relevance LayerLRP reads (in ``tapped``
            once the forward has run).
        copy_writes: Give modules that work in place copies to write into, always (see
            [writable][fastattr.lrp.Relevance.writable]).
        copied_sites: Where earlier forwards wrote into an output that a rule handed on
            uncopied (see [ratio][fastattr.lrp.Relevance.ratio]), each the ``id`` of the
            innermost module without a rule (or of None): outputs made there are copies.
        holds_merges: Hold outputs for batch norms to merge (see
            [held_for_merge][fastattr.lrp.Relevance.held_for_merge]).
        unheld: The ids of modules whose outputs are not to be held all the same (no batch
            norm merged them in an earlier call).
    """

    __slots__ = (
        "__weakref__",
        "_containers",
        "_copy_wanted",
        "_folds",
        "_holding",
        "_inputs",
        "_memo",
        "_nodes",
        "_products",
        "_ratios",
        "_raw",
        "_reaches",
        "_results",
        "_writable",
        "_written",
        "copied_sites",
        "copy",
        "copy_writes",
        "depth",
        "holds_merges",
        "plan",
        "tapped",
        "taps",
        "unheld",
    )

    def __init__(
        self,
        plan: RulePlan,
        copy: bool = False,
        taps: Sequence[nn.Module] = (),
        copy_writes: bool = False,
        copied_sites: frozenset[int] = frozenset(),
        holds_merges: bool = True,
        unheld: frozenset[int] = frozenset(),
    ) -> None:
        self.plan = plan
        self.copy = copy
        self.holds_merges = holds_merges
        self.unheld = unheld
        # The ids of the modules whose outputs this forward holds and no batch norm has merged
        # yet (see held_for_merge).
        self._holding: set[int] = set()
        self.copy_writes = copy_writes
        self.copied_sites = copied_sites
        self.taps = taps
        # id(layer) -> (its input tensors, its output: a tuple for a block returning several),
        # for LayerLRP.
        self.tapped: dict[int, tuple[tuple[Tensor, ...], Tensor | tuple[Tensor, ...]]] = {}
        self.depth = 0  # > 0 inside a module with a rule
        self._nodes = ops.lrp_nodes()
        self._ratios: dict[int, _Ratio] = {}
        # id(x) -> (x, its version, the product node's output, its version), for product.
        self._products: dict[int, tuple[Tensor, int, Tensor, int]] = {}
        self._raw: dict[int, _Ratio] = {}  # by id of the tensor the ratio node shows
        # id -> (what a module's rule returned, its version, the ratio on the module's output).
        self._results: dict[int, tuple[Tensor, int, _Ratio]] = {}
        # id -> (the tensor a module writes into, its input, the ratio written into or None).
        self._writable: dict[int, tuple[Tensor, Tensor, _Ratio | None]] = {}
        # Tensors in-place ReLUs wrote into, by their autograd node, and the products folded
        # into them (see check_writes).
        self._written: dict[Any, Tensor] = {}
        self._folds: set[Any] = set()
        self._containers: list[nn.Module] = []
        # id -> (a rule output handed on uncopied that the forward may write into, its site).
        self._copy_wanted: dict[int, tuple[Tensor, int]] = {}
        self._inputs: dict[int, Tensor] = {}  # the attributed inputs, by id (held: ids stay)
        # Autograd nodes, by whether their graph reaches an attributed input (see is_activation).
        self._reaches: dict[Any, bool] = {}
        self._memo: dict[tuple[Callable, int], tuple[Tensor, int, Any]] = {}

    # What rules build with.

    def product(self, x: object, cancel: bool = False) -> Any:
        """``x`` through the node that turns the contribution arriving into the relevance ``x *
        contribution``; when ``x`` is (a pass-through of) a rule's epsilon-ratio output, one
        fused node that also divides by that ratio's ``z``.

        Args:
            x: A module's (or op's) input.
            cancel: Where ``x`` holds its ratio's ``z`` itself (a module's output read
                unchanged), the product and the ratio cancel but for the stabilizer, ``x * c /
                (x + epsilon * sign(x))``: hand the contribution to ``z`` unchanged, as the
                gradient does, through a node that neither reads ``x`` nor keeps it.

        Returns:
            A view of ``x`` carrying the node; anything but a tensor on the graph as it is.
        """
        if not isinstance(x, Tensor) or not x.requires_grad:
            return x
        found = self._current(x)
        if cancel and found is not None and self._cancels(found):
            return self._handed(self._nodes.passing(found.z, x.detach()))
        # One node serves every module that reads x (a transformer's query, key and value):
        # the contributions arriving add up before the one product.
        made_before = self._products.get(id(x))
        if (
            made_before is not None
            and made_before[0] is x
            and made_before[1] == x._version
            and made_before[2]._version == made_before[3]
        ):
            return made_before[2]
        if found is not None and found.foldable:
            made = self._nodes.product_ratio(found.z, x.detach(), found.epsilon)
            if self._written_into(found):
                self._folds.add(made.grad_fn)
        else:
            made = self._nodes.product(x)
        if self.copy:  # each module gets a copy of its own to write into
            return made.clone()
        self._products[id(x)] = (x, x._version, made, made._version)
        return made

    def cancels(self, x: object) -> bool:
        """Whether ``product(x, cancel=True)`` hands the contribution straight to a ratio's
        ``z`` (and so saves nothing of ``x``).

        Args:
            x: Anything.

        Returns:
            True when ``x`` is, unchanged, a rule's epsilon-ratio output that holds its ``z``.
        """
        found = self._current(x)
        return found is not None and self._cancels(found)

    def _cancels(self, found: _Ratio) -> bool:
        # Not into a tensor an in-place ReLU wrote into: there the product masks (see writable).
        return found.holds_z and found.foldable and not self._written_into(found)

    def _current(self, x: object) -> _Ratio | None:
        """The record of the ratio whose output ``x`` is (or passes on), while ``x`` is
        unchanged since."""
        found = self._ratios.get(id(x)) if isinstance(x, Tensor) else None
        if found is None or found.tensor is not x or found.version != x._version:
            return None
        return found

    def _written_into(self, found: _Ratio) -> bool:
        # Whether an in-place ReLU wrote into the tensor the ratio divides by.
        return bool(self._written) and found.z.grad_fn in self._written

    def share(self, x: object, fraction: float) -> Any:
        """``x`` through the node that turns the contribution arriving into the relevance
        ``fraction * x * contribution``: one factor's part of a product's relevance under the
        uniform rule.

        Args:
            x: A factor of a product (of a module or an op).
            fraction: Its share, positive.

        Returns:
            ``x`` carrying the node; anything but a tensor on the graph as it is.
        """
        if not isinstance(x, Tensor) or not x.requires_grad:
            return x
        return self._handed(ops.lrp_share_node(x, fraction))

    def ratio(
        self,
        z: Tensor,
        output: Tensor,
        epsilon: float | Callable[[Tensor], Tensor],
        copy: bool = False,
    ) -> Tensor:
        """``output`` through the node that divides the relevance by ``z + epsilon * sign(z)``
        (or by ``epsilon(z)``, for a callable) and sends it into ``z``'s graph.

        Args:
            z: ``output``, or a recomputation of it (modified weights).
            output: The module's (or op's) output.
            epsilon: The stabilizer, non-negative; or a callable that returns the stabilized
                denominator from ``z``'s values, as zennit's callable stabilizers do.
            copy: The forward may change the output in place (BERT's embeddings add to a
                sum): hand on a copy where it has done so before (otherwise a view, which
                autograd keeps from changing; the first write into it stops the forward,
                which LRP then runs again with a copy there).

        Returns:
            What the model continues with.

        Raises:
            ValueError: ``epsilon`` is negative or not finite, or returns a tensor of another
                shape than ``z``'s.
        """
        if callable(epsilon):
            z, epsilon = self._stabilized(z, epsilon), 0.0
        # Every epsilon reaches the nodes here (a custom rule's too), and the compiled nodes
        # take it unchecked.
        check_epsilon(epsilon)
        if z is output:
            made = self._nodes.ratio(z, epsilon)
        else:
            made = self._nodes.ratio_shown(z, output.detach(), epsilon)
        if copy and not self.copy:
            site = id(self.container)
            if site in self.copied_sites:
                made = made.clone()
            else:
                self._copy_wanted[id(made)] = (made, site)
        else:
            made = self._handed(made)
        foldable = z is output or (z.dtype == output.dtype and z.shape == output.shape)
        holds_z = z is output or (
            foldable and z.data_ptr() == output.data_ptr() and z.stride() == output.stride()
        )
        found = _Ratio(made, z, epsilon, foldable, output, holds_z, 1.0 if holds_z else None)
        self._ratios[id(made)] = found
        self._raw[id(output)] = found
        return made

    def _stabilized(self, z: Tensor, stabilizer: Callable[[Tensor], Tensor]) -> Tensor:
        """A tensor holding ``stabilizer(z)`` whose relevance goes to ``z`` unchanged: the
        denominator of a ratio with epsilon 0. Like zennit's, the stabilizer sees ``z``'s
        values, outside the graph."""
        denominator = stabilizer(z.detach())
        if not isinstance(denominator, Tensor) or denominator.shape != z.shape:
            got = list(denominator.shape) if isinstance(denominator, Tensor) else denominator
            raise ValueError(
                f"a callable stabilizer must return a tensor of its input's shape "
                f"{list(z.shape)}, got {got!r} from {stabilizer!r}"
            )
        return self._nodes.passing(z, denominator.to(z.dtype))

    def linear_output(self, module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
        """``output``; for an ``nn.Linear`` on the CPU that reads a sequence (an input of three
        or more dimensions), a view of it through [fastattr.ops.lrp_linear_node][], whose
        backward multiplies only the rows that carry relevance.

        Args:
            module: A module with a rule.
            inputs: The inputs it ran on.
            output: Its output.

        Returns:
            ``output``, or the view, whose graph takes the layer's backward.
        """
        if len(inputs) != 1 or type(module).forward is not nn.Linear.forward:
            return output
        x, weight = inputs[0], module.weight  # a parametrized weight is computed on each read
        if (
            not isinstance(x, Tensor)
            or x.dim() < 3
            or not x.requires_grad
            or x.device.type != "cpu"
            or not x.dtype == output.dtype == weight.dtype
            or torch.is_autocast_enabled("cpu")
        ):
            return output
        return self._nodes.linear(x, weight.detach(), output.detach())

    def source(self, x: Tensor) -> Tensor:
        """``x`` as a source of relevance: an input of the model's though not one attributed
        (tokens embedded from ids), which the op rules then treat as an activation, so that
        the rules a product of it and an activation gets do not depend on which inputs are
        attributed. Outside autograd's graph (a frozen model's), it becomes a leaf of it.

        Args:
            x: A module's output.

        Returns:
            ``x``, or a leaf holding its values.
        """
        if not x.is_floating_point():
            return x
        if not x.requires_grad:
            x = x.detach().requires_grad_()
            self._inputs[id(x)] = x
        elif x.grad_fn is None:  # a parameter returned as it is: a view of it is the source
            x = x.view_as(x)
        self._reaches[torch.autograd.graph.get_gradient_edge(x).node] = True
        return x

    def passing(self, source: Tensor, output: Tensor, scale: float | None = None) -> Tensor:
        """``output`` through the node that hands the relevance to ``source`` unchanged.

        Args:
            source: The input that receives the relevance.
            output: The module's output.
            scale: ``output`` is ``source`` times this number (attention scores scaled), or
                None.

        Returns:
            What the model continues with.
        """
        written = self._writable.get(id(source))
        if written is not None and written[0] is source:
            if written[2] is not None:
                return self._passing_written(output, written[2])
            source = written[1]  # the module wrote into a copy: the relevance goes to the original
        elif output is source:  # an identity that returned its input (dropout in eval mode)
            return output
        made = self._handed(self._nodes.passing(source, output.detach()))
        found = self._current(source)
        if found is not None and found.z.dtype == output.dtype and found.z.shape == output.shape:
            scaled = None if scale is None or found.scale is None else found.scale * scale
            self._ratios[id(made)] = _Ratio(
                made, found.z, found.epsilon, found.foldable, scale=scaled
            )
        return made

    def follows_scores(
        self,
        scores: Tensor,
        output: Tensor,
        rearrange: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        """Notes that ``output`` holds ``scores``' values, masked (a mask of zeros and of values
        at most half the dtype's lowest added, or such values filled in, where a softmax then
        gives zero) or rearranged by ``rearrange`` (a view, a transpose, ...), so that a
        softmax of it can still find the scores' ratio (see
        [scaled_scores][fastattr.lrp.Relevance.scaled_scores]), its ``z`` rearranged alike.
        Autograd's own backward of the masking or rearranging moves the relevance meanwhile.

        Args:
            scores: The activation masked or rearranged.
            output: The result.
            rearrange: The rearrangement, as a function of a tensor of ``scores``' shape, or
                None for a mask.
        """
        found = self._current(scores)
        if found is None or found.scale is None or self._written_into(found):
            return
        z = found.z if rearrange is None else rearrange(found.z)
        if z.dtype == output.dtype and z.shape == output.shape:
            # A product folding into it divides x * c by z, as the ratio after the masking or
            # rearranging would.
            self._ratios[id(output)] = _Ratio(
                output, z, found.epsilon, found.foldable, scale=found.scale
            )

    def scaled_scores(self, x: object) -> tuple[Tensor, float] | None:
        """``(z, scale)`` when ``x`` holds ``scale * z``, perhaps masked or rearranged (see
        [follows_scores][fastattr.lrp.Relevance.follows_scores]), where ``z`` is the output of
        a rule's epsilon ratio that holds ``z``'s own values (attention scores ``q @ k^T``),
        with a stabilizer of at most the default, 1e-9.

        A softmax of ``x`` may then send its contribution straight to ``z``: the relevance
        ``x * c`` its rule computes is divided by ``z + epsilon * sign(z)`` at the ratio, which
        is ``scale * c`` where nothing is masked, but for the stabilizer (a relative ``epsilon /
        |z|``), and zero where it is (the softmax is zero there). With a larger epsilon,
        which damps scores near zero on purpose, the ratio runs as written.

        Args:
            x: Anything.

        Returns:
            The ratio's ``z`` and the scale, or None.
        """
        found = self._current(x)
        if (
            found is None
            or found.scale is None
            or not found.foldable  # LayerLRP reads a tensor on the way
            or not found.epsilon <= STABILIZER
            or self._written_into(found)
        ):
            return None
        return found.z, found.scale

    def writable(self, x: object, zero_or_same: bool = False) -> Any:
        """A tensor holding ``x``'s values that a module may write into; ``passing`` sends
        relevance from it to ``x`` itself.

        Args:
            x: A module's input.
            zero_or_same: The module writes, element by element, either the value there or
                zero (an in-place ReLU). When ``x`` is a rule's epsilon-ratio output, the module
                may then write into the tensor the ratio divides by: where it writes zero, the
                product at the next module's input is zero anyway. (Should anything else use
                ``x``'s relevance, the backward finds that tensor changed, and LRP runs the
                call again with copies.)

        Returns:
            The tensor to write into (anything but a tensor as it is).
        """
        if not isinstance(x, Tensor):
            return x
        found = self._current(x)
        if (
            zero_or_same
            and not self.copy_writes
            and found is not None
            and found.foldable
            and found.raw is found.z
        ):
            self._writable[id(found.z)] = (found.z, x, found)
            return found.z
        copied = x.clone()
        self._writable[id(copied)] = (copied, x, None)
        return copied

    def _passing_written(self, output: Tensor, ratio: _Ratio) -> Tensor:
        # The module wrote zeros or the same values into the tensor `ratio` divides by, and
        # returned it: a product folding into it now divides by the module's output, which is
        # exact (see writable). Nothing else may use it: check_writes sees to that.
        if ratio.z is not output:
            raise WritesNeedCopies
        self._ratios[id(output)] = _Ratio(output, output, ratio.epsilon, ratio.foldable)
        self._written[output.grad_fn] = output
        return output

    def check_writes(self, outputs: Sequence[Tensor]) -> None:
        """Checks that every tensor an in-place ReLU wrote into (see
        [writable][fastattr.lrp.Relevance.writable]) is used in the graph of ``outputs`` by
        products folded into it alone.

        Args:
            outputs: What the backward starts from.

        Raises:
            WritesNeedCopies: It has another use.
        """
        written, folds = self._written, self._folds
        self._written, self._folds = {}, set()
        if not written:
            return
        stack = [output.grad_fn for output in outputs if output.grad_fn is not None]
        seen = set(stack)
        while stack:
            node = stack.pop()
            for following, _ in node.next_functions:
                if following is None:
                    continue
                if following in written and node not in folds:
                    raise WritesNeedCopies
                if following not in seen:
                    seen.add(following)
                    stack.append(following)

    def before_write(self, target: object) -> None:
        """Called before an in-place call writes into ``target``.

        Args:
            target: The tensor written into.

        Raises:
            CopyNeededAt: ``target`` is an output a rule handed on uncopied where copies are
                made once needed (see [ratio][fastattr.lrp.Relevance.ratio]).
        """
        found = self._copy_wanted.get(id(target))
        if found is not None and found[0] is target:
            raise CopyNeededAt(found[1])

    def write_into(self, target: Tensor, value: Tensor) -> Tensor:
        """``target`` with ``value`` written into it (with ``value``'s history), for rules of
        in-place calls.

        Args:
            target: The tensor the call writes into.
            value: What the rule computed for it.

        Returns:
            ``target``.
        """
        try:
            target.copy_(value)
        except RuntimeError as error:
            # Refused before anything was written: a rule's output cannot be changed in place.
            if "custom Function" in str(error):
                raise CopiesNeeded from error
            raise
        found = self._current(value)
        if found is not None and target.dtype == value.dtype and target.shape == value.shape:
            # target now holds value's values: what reads it folds (or cancels) as value would.
            self._ratios[id(target)] = _Ratio(
                target,
                found.z,
                found.epsilon,
                found.foldable,
                holds_z=found.holds_z,
                scale=found.scale,
            )
        return target

    def is_activation(self, value: object) -> bool:
        """Whether ``value`` is a floating tensor that depends on the attributed inputs (rather
        than on parameters, buffers and constants only), read off its autograd graph.

        Args:
            value: Anything.

        Returns:
            True for an activation.
        """
        if not isinstance(value, Tensor) or not value.requires_grad:
            return False
        if id(value) in self._inputs:
            return True
        node = value.grad_fn
        return node is not None and self._reaches_inputs(node)

    def memoized(self, function: Callable[[Tensor], Any], tensor: Tensor) -> Any:
        """``function(tensor)``, computed once per call while ``tensor`` is unchanged: for a
        property of a tensor that every layer meets again (the attention mask).

        Args:
            function: A function of the tensor's values alone.
            tensor: The tensor.

        Returns:
            What ``function`` returned for it.
        """
        key = (function, id(tensor))
        found = self._memo.get(key)
        if found is not None and found[0] is tensor and found[1] == tensor._version:
            return found[2]
        value = function(tensor)
        self._memo[key] = (tensor, tensor._version, value)  # holding it keeps its id
        return value

    def under_op_rules(self, function: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """``function(*args, **kwargs)`` with the torch calls it makes handed to the op rules,
        for an op rule of a torch function written in torch calls (which runs, as every op
        rule does, outside them).

        Args:
            function: The function to run.
            args: Its positional arguments.
            kwargs: Its keyword arguments.

        Returns:
            What ``function`` returns.
        """
        mode = _OpRules(self)
        try:
            with mode:
                return function(*args, **kwargs)
        except BaseException as error:
            # torch's Python functions (F.embedding, F.layer_norm, ...) hand a call to the mode
            # inside a generator's with statement that takes the mode off the stack and puts
            # it back on exit. An interrupt as that exit is entered leaves the generator
            # suspended, held by the traceback: it would put the mode back whenever the
            # traceback is freed, long after this call. Finish those exits now.
            if mode.lost:
                _finish_suspended_withs(error, mode)
            raise
        finally:
            # An interrupt can land after the function returned and before the with statement
            # left the mode: then it is still on top of torch's stack. (The private
            # _get_current_function_mode: checked on torch 2.13 and 2.14; see
            # tests/test_torch_private_api.py.)
            if _current_function_mode() is mode:
                mode.__exit__(None, None, None)

    @property
    def container(self) -> nn.Module | None:
        """The innermost module without a rule whose forward is running (kept while op rules
        are in use)."""
        return self._containers[-1] if self._containers else None

    def rule_output(self, x: object) -> _Ratio | None:
        """What made ``x`` when it is, unchanged, what a module's rule returned after a ratio
        on the module's own output (its epsilon ratio, or a ratio of a rule that recomputes the
        module): the record of that ratio, with ``module``, ``rule``, ``inputs`` (those the
        module ran on) and ``raw`` (the module's own output).

        Args:
            x: Anything.

        Returns:
            The record, or None.
        """
        found = self._results.get(id(x)) if isinstance(x, Tensor) else None
        if found is None or found[0] is not x or found[1] != x._version:
            return None
        return found[2]

    def raw_output(self, x: object) -> _Ratio | None:
        """When ``x`` is a module's own output that a rule then handed on through its epsilon
        ratio, that ratio's record (as ``rule_output`` gives it).

        Args:
            x: Anything.

        Returns:
            The record, or None.
        """
        found = self._raw.get(id(x)) if isinstance(x, Tensor) else None
        return found if found is not None and found.raw is x and found.module is not None else None

    def held_for_merge(self, output: Tensor, module: nn.Module) -> Tensor | None:
        """``output``, a linear module's, handed on without nodes for a batch norm to merge
        (whose rule then runs the module's rule on the merged map): the nodes of the module's
        rule on its own map, which the merge would leave unused, are never made. Should no
        batch norm merge it, the forward ends in ``MergeMissed`` naming the module, and LRP
        runs the call (and later ones) again holding its outputs no more; should the relevance
        reach it all the same (it has another use), the backward raises ``MergeMissed``, and
        LRP runs the call (and later ones) again holding nothing.

        Args:
            output: The output of ``module``, whose rule asks.
            module: The module.

        Returns:
            What the model continues with; None when this call holds no outputs of
            ``module`` (then the rule makes its nodes).
        """
        if not self.holds_merges or id(module) in self.unheld:
            return None
        self._holding.add(id(module))
        held = _HeldForMerge.apply(output)
        # The module's record, as a ratio on its output makes it (see rule_output).
        self._raw[id(output)] = _Ratio(held, output, 0.0, False, output)
        return self._handed(held)

    def merged(self, module: nn.Module, into: nn.Module, output: Tensor) -> None:
        """``module`` (a batch norm) merged into ``into``, the module whose output it received:
        ``output``, what ``module``'s rule returned for both, is from now on ``into``'s output
        and ``module``'s input as well as its output (the merged ``module`` is the identity).
        LayerLRP reads their relevance there.

        Args:
            module: The module merged.
            into: The module merged into.
            output: What ``module``'s rule returned.
        """
        self._holding.discard(id(into))
        if not self.taps:
            return
        if any(into is tap for tap in self.taps):
            self._tap_output(into, output)
        if id(module) in self.tapped:
            self.tapped[id(module)] = ((output,), self.tapped[id(module)][1])

    # The engine.

    def run(self, forward: Callable[[], Any], inputs: Sequence[Tensor]) -> Any:
        """``forward()`` with this thread's module calls handed to their rules (and torch calls
        to op rules); nothing of it remains once it returns or raises.

        The hooks are process-wide but act only in the context ``forward`` runs in, a copy of
        the caller's made for this call alone: other threads, and this one once the call is
        over, are untouched even if an interrupt cut the removal of the hooks short (a hook
        left so removes itself when its call's state is gone).

        Args:
            forward: The model's forward, as a function of nothing.
            inputs: The attributed inputs (leaves of the graph).

        Returns:
            What ``forward`` returns.
        """
        self._inputs = {id(x): x for x in inputs}
        gradient_edge = torch.autograd.graph.get_gradient_edge
        self._reaches = {gradient_edge(x).node: True for x in inputs if x.requires_grad}
        self._nodes = ops.lrp_nodes()
        hooks = (_ModuleHook(self, pre=True), _ModuleHook(self, pre=False))
        # The hooks turn torch functions off while a rule runs: an interrupt on the line that
        # leaves that with statement would leave them off for the thread. Restored in a
        # finally of its own, which an interrupt in the other cannot skip. (The private torch
        # function state: checked on torch 2.13 and 2.14; see tests/test_torch_private_api.py.)
        state = torch._C._get_torch_function_state()
        try:
            try:
                hooks[0].handle = module_hooks.register_module_forward_pre_hook(hooks[0])
                hooks[1].handle = module_hooks.register_module_forward_hook(hooks[1])
                return contextvars.copy_context().run(self._forward, forward)
            finally:
                _remove(hooks)
                self._forget()
        finally:
            torch._C._set_torch_function_state(state)

    def _forward(self, forward: Callable[[], Any]) -> Any:
        _ACTIVE.set(self)  # in this call's own context
        if self.plan.has_op_rules:
            result = self.under_op_rules(forward, (), {})
        else:
            result = forward()
        if self._holding:
            # Held outputs no batch norm merged: the relevance would reach them (see
            # held_for_merge). Found here, all at once, before any backward.
            raise MergeMissed(frozenset(self._holding))
        return result

    def _forget(self) -> None:
        # Held past the forward, the ratios that nothing folded into would keep their nodes,
        # and the tensors those save, alive through the backward.
        self._ratios.clear()
        self._products.clear()
        self._raw.clear()
        self._results.clear()
        self._writable.clear()
        self._copy_wanted.clear()
        self._reaches.clear()
        self._memo.clear()
        self._inputs.clear()
        self._containers.clear()

    def _pre_hook(self, module: nn.Module, args: tuple) -> tuple | None:
        found = self.plan.rules.get(id(module))
        if found is None:
            if self.plan.has_op_rules:
                self._containers.append(module)
            if self.taps and any(module is tap for tap in self.taps):
                return self._tap_inputs(module, args)
            return None
        self.depth += 1
        if self.taps and any(module is tap for tap in self.taps):
            args = self._tap_inputs(module, args)
        return found[1].forward_inputs(self, module, args)

    def _post_hook(self, module: nn.Module, args: tuple, output: object) -> Any:
        found = self.plan.rules.get(id(module))
        if found is None:
            if self.plan.has_op_rules and self._containers:
                self._containers.pop()
            if self.taps and any(module is tap for tap in self.taps):
                return self._tap_block_output(module, output)
            return None
        if not isinstance(output, Tensor):
            raise TypeError(
                f"LRP rules need modules that return one tensor; {type(module).__name__} "
                f"returned {type(output).__name__}"
            )
        rule = found[1]
        result = rule.forward_output(self, module, args, output)
        self.depth -= 1
        made = self._raw.get(id(output))
        if made is not None and made.raw is output and made.module is None:
            # The ratio node on this module's own output.
            made.module, made.rule, made.inputs = module, rule, args
            self._results[id(result)] = (result, result._version, made)
        if self.taps and any(module is tap for tap in self.taps):
            self._tap_output(module, result)
        return result

    def _handed(self, made: Tensor) -> Tensor:
        return made.clone() if self.copy else made

    def _reaches_inputs(self, start: Any) -> bool:
        """Whether the autograd graph from ``start`` reaches an attributed input (or a node
        known to)."""
        reaches = self._reaches
        known = reaches.get(start)
        if known is not None:
            return known
        # Depth first, remembering the way back: once an input's node is found, every node on
        # the path to it is known to reach it, so the next walk (from further down the model)
        # stops where this one passed instead of going back to the inputs again.
        parents: dict[Any, Any] = {start: None}
        stack = [start]
        while stack:
            node = stack.pop()
            known = reaches.get(node)
            if known:
                while node is not None:
                    reaches[node] = True
                    node = parents[node]
                return True
            if known is None:
                for following, _ in node.next_functions:
                    if following is not None and following not in parents:
                        parents[following] = node
                        stack.append(following)
        for node in parents:  # none of these reaches an input
            reaches[node] = False
        return False

    def _tap_inputs(self, module: nn.Module, args: tuple) -> tuple:
        if id(module) in self.tapped:
            raise ValueError(
                f"layer {type(module).__name__} runs more than once in the forward, so its "
                "relevance is ambiguous; LayerLRP needs a layer that runs once"
            )
        # A private view per call: its gradient is this module's input relevance alone.
        args = tuple(self._tap_view(a) if isinstance(a, Tensor) else a for a in args)
        tensors = tuple(a for a in args if isinstance(a, Tensor) and a.requires_grad)
        self._as_inputs(tensors)
        self.tapped[id(module)] = (tensors, torch.empty(0))
        return args

    def _tap_view(self, x: Tensor) -> Tensor:
        view = x.view_as(x)
        found = self.rule_output(x)
        if found is not None:  # a batch norm still merges into the module that made x
            self._results[id(view)] = (view, view._version, found)
        return view

    def _tap_output(self, module: nn.Module, output: Tensor) -> None:
        # Its relevance must reach this tensor: nothing may fold past it.
        found = self._ratios.get(id(output))
        if found is not None:
            found.foldable = False
        self._as_inputs((output,))
        self.tapped[id(module)] = (self.tapped[id(module)][0], output)

    def _tap_block_output(self, module: nn.Module, output: Any) -> Any:
        """A tapped module without a rule of its own (a block): private views of the tensors
        it returns (one, or a tuple), whose gradients are the relevance at its output."""
        if not isinstance(output, (Tensor, tuple)):  # a dict, say: LayerLRP refuses it
            self.tapped[id(module)] = (self.tapped[id(module)][0], output)
            return None
        found = output if isinstance(output, tuple) else (output,)
        viewed = tuple(
            t.view_as(t) if isinstance(t, Tensor) and t.requires_grad else t for t in found
        )
        tensors = tuple(t for t, was in zip(viewed, found) if t is not was)
        self._as_inputs(tensors)
        self.tapped[id(module)] = (self.tapped[id(module)][0], tensors)
        return viewed if isinstance(output, tuple) else viewed[0]

    def _as_inputs(self, tensors: Sequence[Tensor]) -> None:
        # What LayerLRP reads depends on the attributed inputs for the op rules (which act on
        # such tensors alone), even where the model's inputs are token ids.
        for tensor in tensors:
            if tensor.grad_fn is not None:
                self._reaches[tensor.grad_fn] = True


# LRP's machinery: of it, rules see Relevance (exported by fastattr.lrp).
__all__ = ["Relevance"]
