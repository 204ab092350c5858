"""Which kernels run: the compiled extension (``fastattr._C``) or the PyTorch reference twins."""

from __future__ import annotations

import contextlib
import contextvars
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch

BACKENDS = ("compiled", "reference")

try:
    from fastattr import _C  # registers torch.ops.fastattr.*
except ImportError as error:  # pragma: no cover - exercised only without a build
    _C = None
    _import_error: ImportError | None = error
    warnings.warn(
        "fastattr's compiled extension is not built; falling back to the PyTorch reference "
        f"kernels ({error}). Build it with `pip install .`.",
        RuntimeWarning,
        stacklevel=2,
    )
else:
    _import_error = None


def is_compiled() -> bool:
    """Whether the compiled extension was imported."""
    return _C is not None


def _check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "compiled" and _C is None:
        raise RuntimeError(
            f"the compiled backend was asked for but fastattr._C is not built: {_import_error}"
        )
    return name


def _default_backend() -> str:
    requested = os.environ.get("FASTATTR_BACKEND")
    if not requested:
        return "compiled" if _C is not None else "reference"
    try:
        return _check_backend(requested)
    except (ValueError, RuntimeError) as error:
        raise type(error)(f"FASTATTR_BACKEND={requested!r}: {error}") from None


_DEFAULT_BACKEND = _default_backend()
_active: contextvars.ContextVar[str] = contextvars.ContextVar(
    "fastattr_backend", default=_DEFAULT_BACKEND
)


def current_backend() -> str:
    """The backend the ops dispatch to in this context."""
    return _active.get()


# current_backend without its Python frame, for the ops, which LRP calls once per module.
backend_in_context = _active.get


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed code on ``"compiled"`` or ``"reference"`` kernels.

    ``FASTATTR_BACKEND`` sets the default. The choice holds for the enclosed code in this
    thread (and the tasks it starts), not for other threads.

    Args:
        name: ``"compiled"`` (fastattr's C++/CUDA kernels) or ``"reference"`` (their
            pure-PyTorch twins in [fastattr.ops.reference][]).

    Raises:
        ValueError: ``name`` is neither.
        RuntimeError: ``"compiled"`` when the extension is not built.

    Examples:
        >>> import fastattr
        >>> with fastattr.use_backend("reference"):
        ...     fastattr.current_backend()
        'reference'
    """
    token = _active.set(_check_backend(name))
    try:
        yield
    finally:
        _active.reset(token)


def build_info() -> dict[str, Any]:
    """How fastattr was built and what it will run on."""
    cuda_built = bool(_C is not None and _C.with_cuda)
    return {
        "compiled": _C is not None,
        "cpu": _C is not None,
        "cuda": cuda_built,
        "cuda_arch_list": _C.cuda_arch_list.split(";") if cuda_built else [],
        "backend": current_backend(),
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "import_error": None if _import_error is None else str(_import_error),
    }
