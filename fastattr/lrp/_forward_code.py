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
    except (OSError, TypeError, SyntaxError):
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
