"""Interim: applies the op rules of [attention][fastattr.lrp.attention] to the torch calls of a
forward, as a torch-function mode on top of the module rules of
[Propagation][fastattr.lrp.propagation.Propagation]. It stands in until the LRP engine applies op
rules itself, and then goes away.

Calls inside a module that carries a rule of its own are that rule's business and run as they
are; so do calls on tensors that carry no relevance.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fastattr.lrp.attention import IN_PLACE, OP_RULES, STRUCTURAL, OpenRule, no_rule_error
from fastattr.lrp.propagation import CopiesNeeded, _on_relevance_path, _ResidualAdditions


def _has_carrying(args: tuple, kwargs: dict[str, Any]) -> bool:
    for value in (*args, *kwargs.values()):
        if isinstance(value, (list, tuple)):
            if any(map(_on_relevance_path, value)):
                return True
        elif _on_relevance_path(value):
            return True
    return False


def _carrying_outputs(result: object) -> bool:
    if isinstance(result, (list, tuple)):
        return any(map(_on_relevance_path, result))
    return _on_relevance_path(result)


def _fastattr_op(func: object) -> bool:
    """Whether ``func`` is one of fastattr's own ops or autograd nodes, which the rules call."""
    if getattr(func, "namespace", None) == "fastattr":
        return True
    owner = getattr(func, "__self__", None)
    return isinstance(owner, type) and owner.__module__.startswith("fastattr.")


def _write(target: Tensor, result: Tensor) -> Tensor:
    """``target`` overwritten by ``result`` (an in-place call's effect, with ``result``'s
    history)."""
    try:
        return target.copy_(result)
    except RuntimeError as error:
        # Refused before anything was written: the target is a view a rule's node handed out.
        if "custom Function" in str(error):
            raise CopiesNeeded from error
        raise


# Additions and subtractions, whose outputs are copied (see OpRuleMode._add).
_SUMS = frozenset(
    (*_ResidualAdditions._ADDITIONS, torch.Tensor.sub, torch.sub, torch.Tensor.__rsub__)
)


class OpRuleMode(_ResidualAdditions):
    """The residual-addition mode, extended to every op rule."""

    def __init__(self, copy: bool) -> None:
        super().__init__(copy)
        # A refusal raised where torch turns TypeErrors into NotImplemented (operators such as
        # `/`), raised again when the forward leaves the mode.
        self.refusal: TypeError | None = None

    def __exit__(self, kind, error, traceback):
        refusal, self.refusal = self.refusal, None
        super().__exit__(kind, error, traceback)
        if refusal is not None and error is not None and error is not refusal:
            raise refusal from None

    def _add(self, a: Tensor, b: Tensor, alpha: float, in_place: bool) -> Tensor:
        # Sums are handed out as copies: the forward may then update one in place (`x += y`, as
        # BERT's embeddings do) without every rule's output being copied from then on.
        copy, self.copy = self.copy, True
        try:
            return super()._add(a, b, alpha, in_place)
        finally:
            self.copy = copy

    def _refuse(self, error: TypeError) -> TypeError:
        self.refusal = error
        return error

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.depth:
            return func(*args, **kwargs)
        rule = OP_RULES.get(func)
        if rule is STRUCTURAL or not _has_carrying(args, kwargs) or _fastattr_op(func):
            return func(*args, **kwargs)
        if func in self._ADDITIONS and len(args) == 2 and set(kwargs) <= {"alpha"}:
            if _on_relevance_path(args[0]) and _on_relevance_path(args[1]):
                return self._add(args[0], args[1], kwargs.get("alpha", 1), func in IN_PLACE)
        if func in IN_PLACE:
            out_of_place = IN_PLACE[func]
            return _write(args[0], self._apply(out_of_place, args, kwargs))
        if rule is None:
            result = func(*args, **kwargs)
            if _carrying_outputs(result):
                raise self._refuse(no_rule_error(func))
            return result
        if isinstance(rule, OpenRule):
            with self:
                return OpenRule.body(func)(*args, **kwargs)
        try:
            return rule(func, args, kwargs, _on_relevance_path, self.copy or func in _SUMS)
        except TypeError as error:
            raise self._refuse(error) from None

    def _apply(self, func, args, kwargs):
        rule = OP_RULES.get(func)
        if rule is None:
            raise no_rule_error(func)
        return rule(func, args, kwargs, _on_relevance_path, self.copy or func in _SUMS)
