"""Whether a container's forward may add tensors, read from its source.

Routing residual additions through the sum rule costs a torch-function mode on every torch
call of the forward; a forward whose code provably adds nothing (only calls its submodules and
reshapes) runs without it. Anything unproven counts as adding.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
import tokenize
from collections.abc import Callable

from torch import nn

# Calls that neither add nor hide code that could: reshapes and element-wise activations.
_SAFE_CALLS = frozenset(
    {
        "cat",
        "contiguous",
        "dim",
        "flatten",
        "permute",
        "relu",
        "reshape",
        "sigmoid",
        "size",
        "squeeze",
        "tanh",
        "transpose",
        "unflatten",
        "unsqueeze",
        "view",
        "view_as",
    }
)


@functools.lru_cache(maxsize=256)
def _submodule_calls(forward: Callable) -> tuple[str, ...] | None:
    """The attributes ``forward`` calls on its module, or None unless its code provably adds
    no tensors."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(forward)))
    except (OSError, TypeError, SyntaxError, tokenize.TokenError):
        return None
    definition = tree.body[0] if tree.body else None
    if not isinstance(definition, ast.FunctionDef) or not definition.args.args:
        return None
    owner = definition.args.args[0].arg
    called = []
    for node in ast.walk(definition):
        if isinstance(node, (ast.BinOp, ast.AugAssign)) and isinstance(node.op, ast.Add):
            return None
        if isinstance(node, ast.Call):
            func = node.func
            if not isinstance(func, ast.Attribute):
                return None
            if isinstance(func.value, ast.Name) and func.value.id == owner:
                called.append(func.attr)
            elif func.attr not in _SAFE_CALLS:
                return None
    return tuple(called)


def may_add_tensors(module: nn.Module) -> bool:
    """False only when ``module``'s forward provably adds no tensors itself."""
    if type(module) is nn.Sequential:
        return False
    if "forward" in module.__dict__:  # replaced on the instance: not worth proving
        return True
    called = _submodule_calls(type(module).forward)
    # Calls on the module must reach submodules, not methods that could add.
    return called is None or any(name not in module._modules for name in called)


# Reshapes that may stand between two submodule calls of a chain (written as torch.<name>(x,
# ...) or x.<name>(...) with constant arguments).
_RESHAPES = frozenset({"flatten", "reshape", "view", "squeeze", "unsqueeze", "contiguous"})


def _constant(node: ast.expr) -> bool:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        node = node.operand
    return isinstance(node, ast.Constant)


def _chain_steps(expr: ast.expr, owner: str, var: str) -> list[str | None] | None:
    """The calls ``expr`` applies to ``var``, innermost first: a submodule's attribute name, or
    None for a reshape; None unless ``expr`` is such a chain around ``var`` used once."""
    if isinstance(expr, ast.Name):
        return [] if expr.id == var else None
    if not isinstance(expr, ast.Call) or expr.keywords or not isinstance(expr.func, ast.Attribute):
        return None
    func = expr.func
    if isinstance(func.value, ast.Name) and func.value.id == owner and len(expr.args) == 1:
        inner = _chain_steps(expr.args[0], owner, var)
        return None if inner is None else [*inner, func.attr]
    if func.attr not in _RESHAPES:
        return None
    if isinstance(func.value, ast.Name) and func.value.id == "torch" and expr.args:
        value, rest = expr.args[0], expr.args[1:]
    else:
        value, rest = func.value, expr.args
    if not all(map(_constant, rest)):
        return None
    inner = _chain_steps(value, owner, var)
    return None if inner is None else [*inner, None]


@functools.lru_cache(maxsize=256)
def _forward_chain(forward: Callable) -> tuple[str | None, ...] | None:
    """The calls of a forward that only passes its one input through submodules and reshapes,
    each result going into the next call and nowhere else (``return self.b(self.a(x))``, or
    statements ``x = self.a(x)`` ending in ``return x``-like chains); None for anything else."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(forward)))
    except (OSError, TypeError, SyntaxError, tokenize.TokenError):
        return None
    definition = tree.body[0] if tree.body else None
    if not isinstance(definition, ast.FunctionDef):
        return None
    arguments = definition.args
    if (
        len(arguments.args) != 2
        or arguments.vararg
        or arguments.kwarg
        or arguments.kwonlyargs
        or arguments.posonlyargs
        or arguments.defaults
    ):
        return None
    owner, var = arguments.args[0].arg, arguments.args[1].arg
    body = list(definition.body)
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    if not body or not isinstance(body[-1], ast.Return) or body[-1].value is None:
        return None
    steps: list[str | None] = []
    for statement in body[:-1]:
        if not (
            isinstance(statement, ast.Assign)
            and len(statement.targets) == 1
            and isinstance(statement.targets[0], ast.Name)
            and statement.targets[0].id == var
        ):
            return None
        found = _chain_steps(statement.value, owner, var)
        if found is None:
            return None
        steps += found
    found = _chain_steps(body[-1].value, owner, var)
    return None if found is None else (*steps, *found)


def call_chain(module: nn.Module) -> list[nn.Module | None] | None:
    """The submodules ``module``'s forward calls in turn, each on the previous one's result and
    on nothing else (None for a reshape between two calls), when its code proves that; else
    None."""
    if type(module) is nn.Sequential:
        return list(module._modules.values())
    if "forward" in module.__dict__:
        return None
    steps = _forward_chain(type(module).forward)
    if steps is None or any(s is not None and s not in module._modules for s in steps):
        return None
    return [None if s is None else module._modules[s] for s in steps]
