"""Models compiled with torch.compile, where fastattr's hooks must see their modules run:
compiled code runs no hook registered on a submodule after it was compiled, and traces the
hooks it does run (LRP's) into its graph, which its backends can't always compile."""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from typing import Any

from torch import nn

from fastattr._settle import settled

# The calls inside compiled_code_runs_eagerly, and the stance object the first of them set
# (its __exit__ puts back the stance found). Reentrant, for the same reason as
# _model_state._held_lock: an interrupt on the line where a with statement leaves it leaves it
# held by the interrupted thread, which then lets go of it.
_eager_lock = threading.RLock()
_eager_calls = 0
_eager_stance: Any = None


def _dynamo_loaded() -> bool:
    # torch.compile imports torch._dynamo: until then nothing is compiled, and importing it
    # (over a second) is not worth it.
    return "torch._dynamo" in sys.modules


def uncompiled(model: nn.Module) -> nn.Module:
    """The module ``torch.compile(model)`` wraps (through any number of wrappings), or
    ``model`` itself: LRP's process-wide hooks would also fire on the wrapper, and torch warns
    about that on every call."""
    if not _dynamo_loaded():
        return model
    # (OptimizedModule and its _orig_mod, private: checked on torch 2.13 and 2.14 in
    # tests/test_torch_private_api.py.)
    from torch._dynamo.eval_frame import OptimizedModule

    while isinstance(model, OptimizedModule):
        model = model._orig_mod
    return model


@contextlib.contextmanager
def compiled_code_runs_eagerly() -> Iterator[None]:
    """Within the block, code compiled with torch.compile (a compiled model, a model compiled
    in place by ``module.compile()``, a compiled function around a model) runs eagerly:
    ``torch.compiler.set_stance("force_eager")``. The stance is process-wide: concurrent
    blocks share it, and the last to leave puts back the stance the first found. Other
    threads' compiled code runs eagerly meanwhile too, to the same numbers."""
    if not _dynamo_loaded():
        yield
        return
    import torch.compiler

    counted = False

    def enter() -> None:
        global _eager_calls, _eager_stance
        nonlocal counted
        with _eager_lock:
            _eager_calls, counted = _eager_calls + 1, True  # one line: one trace event
            if _eager_stance is None:
                _eager_stance = torch.compiler.set_stance("force_eager")

    def leave() -> None:
        # Idempotent: this call's count taken back, the stance put back by the last to leave,
        # the lock let go of (RLock._is_owned, private: what the standard library's Condition
        # uses).
        global _eager_calls, _eager_stance
        nonlocal counted
        with _eager_lock:
            if counted:
                _eager_calls, counted = _eager_calls - 1, False  # one line: one trace event
            if _eager_calls == 0 and _eager_stance is not None:
                _eager_stance.__exit__(None, None, None)
                _eager_stance = None
        while _eager_lock._is_owned():  # type: ignore[attr-defined]
            _eager_lock.release()

    yield from settled(enter, leave)
