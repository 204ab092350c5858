"""Leaving a model as it was found: its buffers kept across an attribution (also when several
threads attribute at once, or an interrupt arrives), and what tells whether its forward couples
the examples of a batch."""

from __future__ import annotations

import contextlib
import functools
import threading
import types
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from fastattr._settle import settled


def module_of(forward_func: object) -> nn.Module | None:
    """The module behind ``forward_func``: the module itself, or the owner of a bound method
    such as ``model.forward``."""
    if isinstance(forward_func, nn.Module):
        return forward_func
    owner = getattr(forward_func, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


def modules_behind(forward_func: object) -> tuple[nn.Module, ...]:
    """The modules ``forward_func`` runs, as far as can be seen: the module itself, the owner
    of a bound method, or for a plain function (``lambda x: model(x).softmax(-1)``) or a
    ``functools.partial``, the modules it holds in its closure, arguments, default values or
    the globals it names, and in the functions it holds in turn (three levels deep). For a
    callable object that is neither (a wrapper holding the model), and for a method of one,
    the modules among the object's attributes."""
    found: dict[int, nn.Module] = {}
    seen: set[int] = set()

    def visit(value: object, depth: int) -> None:
        if id(value) in seen or depth > 3:
            return
        seen.add(id(value))
        module = module_of(value)
        if module is not None:
            found.setdefault(id(module), module)
        elif isinstance(value, types.MethodType):
            holder(value.__self__)
        elif isinstance(value, functools.partial):
            for held in (value.func, *value.args, *value.keywords.values()):
                visit(held, depth + 1)
        elif isinstance(value, types.FunctionType):
            cells = value.__closure__ or ()
            named = value.__globals__
            # Default values too: `lambda x, net=model: net(x)` binds the model so (the
            # idiom for forwards made in a loop).
            defaults = (*(value.__defaults__ or ()), *(value.__kwdefaults__ or {}).values())
            for held in (
                *(cell.cell_contents for cell in cells if _filled(cell)),
                *(named[name] for name in value.__code__.co_names if name in named),
                *defaults,
            ):
                visit(held, depth + 1)

    def holder(value: object) -> None:
        # An object holding the model: its attributes, not deeper (an object's attributes
        # may reach far: tokenizers, datasets).
        if id(value) in seen or not hasattr(value, "__dict__") or isinstance(value, type):
            return
        seen.add(id(value))
        for held in vars(value).values():
            if isinstance(held, (nn.Module, functools.partial, types.FunctionType)):
                visit(held, 1)

    looked_into = (nn.Module, functools.partial, types.FunctionType, types.MethodType)
    if isinstance(forward_func, looked_into):
        visit(forward_func, 0)
    else:
        holder(forward_func)
    return tuple(found.values())


def _filled(cell: types.CellType) -> bool:
    try:
        cell.cell_contents  # noqa: B018 (an empty cell raises)
    except ValueError:
        return False
    return True


def draws_dropout(forward_func: object) -> bool:
    """Whether a dropout module behind ``forward_func`` is in training mode, drawing random
    numbers: passes that stop early at a layer would draw fewer than Captum's, which run to
    the end, and leave other results and another random state."""
    # (_DropoutNd, private, is the base of torch's dropout modules: checked on torch 2.13 and
    # 2.14 in tests/test_torch_private_api.py.)
    return any(
        isinstance(m, _DropoutNd) and m.training and m.p > 0
        for model in modules_behind(forward_func)
        for m in model.modules()
    )


def uses_batch_statistics(forward_func: object) -> bool:
    """Whether a module behind ``forward_func`` normalizes with the statistics of the batch
    it is given (batch normalization in training mode, or without running statistics), so that
    an example's output depends on the other rows of its batch."""
    # (_BatchNorm, private, is the base of every batch normalization: checked on torch 2.13
    # and 2.14, with what its forward does, in tests/test_torch_private_api.py.)
    return any(
        isinstance(m, _BatchNorm) and (m.training or m.running_mean is None)
        for model in modules_behind(forward_func)
        for m in model.modules()
    )


# (id of the module, buffer name) -> (the calls holding it, module, the buffer, its saved
# value). Concurrent calls on one model share a snapshot: the first saves it, the last to leave
# restores it.
_held: dict[tuple[int, str], tuple[set[object], nn.Module, Tensor, Tensor]] = {}
# Reentrant: an interrupt on the line where a with statement leaves it (CPython traces that
# line before the lock's __exit__ runs) leaves it held by the interrupted thread, which takes
# it again to release its holds, and then lets go of it (see kept_buffers).
_held_lock = threading.RLock()


@contextlib.contextmanager
def kept_buffers(forward_func: object) -> Iterator[None]:
    """Within the block the model may update its buffers (running statistics of modules in
    training mode); on exit each is restored, the same tensor with its old values, also after
    an exception or an interrupt. Modules in eval mode are not watched: their forward leaves
    buffers alone. A plain function is looked into (``modules_behind``); modules it hides
    (behind an object's attribute, say) are not watched. Grad mode is
    restored too: an interrupt inside one of torch's grad-mode context managers (Python code)
    would leave it switched."""
    models = modules_behind(forward_func)
    # (Builtins, unlike torch.set_grad_enabled, run no Python an interrupt could stop:
    # torch._C._set_grad_enabled is private, checked on torch 2.13 and 2.14, see
    # tests/test_torch_private_api.py.)
    grad_enabled = torch.is_grad_enabled()
    call = object()

    def hold() -> None:
        with _held_lock:
            for module in {id(m): m for model in models for m in model.modules()}.values():
                if not module.training:
                    continue
                for name, buffer in module._buffers.items():
                    if buffer is None:
                        continue
                    held = _held.get((id(module), name))
                    if held is None:  # one store: an interrupt leaves no call-less entry
                        saved = buffer.detach().clone()
                        _held[id(module), name] = ({call}, module, buffer, saved)
                    else:
                        held[0].add(call)

    def release() -> None:
        # Idempotent (run again after an interrupt): finds this call's holds by its token, and
        # lets a hold go only once its buffer is restored.
        with _held_lock:
            for key, (calls, module, buffer, saved) in list(_held.items()):
                if call not in calls:
                    continue
                if len(calls) == 1:
                    buffer.detach().copy_(saved)
                    # In case the forward replaced it (module._buffers: torch's private
                    # registry, checked on torch 2.13 and 2.14, see
                    # tests/test_torch_private_api.py).
                    module._buffers[key[1]] = buffer
                    del _held[key]
                calls.discard(call)

    def settle() -> None:
        # Idempotent: this call's holds released, the lock let go of (an interrupt can leave
        # it held, see _held_lock), grad mode back.
        release()
        # (RLock._is_owned, private: what the standard library's Condition uses.)
        while _held_lock._is_owned():  # type: ignore[attr-defined]
            _held_lock.release()
        torch._C._set_grad_enabled(grad_enabled)

    yield from settled(hold, settle)
