"""Membership of captum's classes, without importing captum.

captum's wrappers check the attribution methods they take against captum's own classes
(``isinstance(method, LLMGradientAttribution.SUPPORTED_METHODS)``, NoiseTunnel's
``isinstance(method, GradientAttribution)``). Each public fastattr class names the captum class
it replaces; once ``captum.attr`` has been imported, that captum class is appended to the
fastattr class's bases, so ``isinstance`` holds for it and for its bases while fastattr's own
methods stay first in the method resolution order.

``captum.attr`` is never imported here: it takes about a second and pulls in matplotlib. When
fastattr is imported first, a finder on ``sys.meta_path`` waits for ``captum.attr`` to be
imported and adopts the bases as soon as that module has finished executing (then it removes
itself). When captum came first, the bases are adopted at fastattr's import.

Every attribute a fastattr class would now inherit from captum (private helpers such as
``IntegratedGradients._attribute``, class-level defaults such as ``LRP.layers``) is hidden
behind an ``AttributeError``: captum's code must never run on a fastattr object, whose state
is not captum's. fastattr's classes define every public member of captum's themselves, so
they behave the same whether captum is imported or not.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
import threading
import warnings
from collections.abc import Sequence
from types import ModuleType
from typing import Any

CAPTUM_ATTR = "captum.attr"

# (fastattr class, name of the captum.attr class it replaces), in definition order: a class
# is adopted after its fastattr bases.
_registered: list[tuple[type, str]] = []
_lock = threading.RLock()


class _CaptumOnly:
    """Hides an attribute a fastattr class would inherit from a captum class."""

    def __init__(self, name: str, captum_class: type) -> None:
        self.name = name
        self.captum_class = captum_class

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        owner_name = owner.__name__ if owner is not None else type(instance).__name__
        raise AttributeError(
            f"{owner_name!r} has no attribute {self.name!r}: it belongs to captum's "
            f"{self.captum_class.__qualname__}, whose internals fastattr's class does not share"
        )


def _captum_module(cls: type) -> bool:
    return cls.__module__.split(".")[0] == "captum"


def _hide_captum_members(cls: type) -> None:
    """Shadow each non-dunder attribute that ``cls`` would take from a captum class."""
    for klass in cls.__mro__:
        if not _captum_module(klass):
            continue
        for name in vars(klass):
            if name.startswith("__") and name.endswith("__"):
                continue
            owner = next(k for k in cls.__mro__ if name in vars(k))
            if _captum_module(owner):
                setattr(cls, name, _CaptumOnly(name, owner))


def _adopt(cls: type, captum_name: str, module: ModuleType) -> None:
    try:
        captum_class = getattr(module, captum_name)
        if not issubclass(cls, captum_class):
            cls.__bases__ = (*cls.__bases__, captum_class)
    except (AttributeError, TypeError) as error:
        # A captum version whose class is missing or can't be a base: captum's wrappers will
        # then refuse the fastattr class, which is a clear error; breaking captum's import
        # would not be.
        warnings.warn(
            f"fastattr.{cls.__name__} could not become a subclass of captum.attr."
            f"{captum_name} ({error}); captum's isinstance checks will not accept it",
            RuntimeWarning,
            stacklevel=2,
        )
        return
    _hide_captum_members(cls)


def _loaded_captum_attr() -> ModuleType | None:
    """``captum.attr`` if it has been imported, else None (without importing it)."""
    module = sys.modules.get(CAPTUM_ATTR)
    # (spec._initializing is importlib's private mark of a module still executing;
    # test_captum_imported_by_another_thread_meanwhile depends on it.)
    if module is not None and getattr(module.__spec__, "_initializing", False):
        # Another thread is importing it, past the finder: wait until it has finished.
        module = importlib.import_module(CAPTUM_ATTR)
    return module


def adopt_captum_bases(module: ModuleType) -> None:
    """Append each registered class's captum class to its bases (idempotent)."""
    with _lock:
        for cls, captum_name in _registered:
            _adopt(cls, captum_name, module)


def register(cls: type, captum_name: str) -> None:
    """Make ``cls`` a subclass of ``captum.attr.<captum_name>`` whenever captum is imported."""
    with _lock:
        _registered.append((cls, captum_name))
        module = _loaded_captum_attr()
        if module is not None:
            _adopt(cls, captum_name, module)
        else:
            _watch_for_captum()


class _AdoptAfterLoading(importlib.abc.Loader):
    """``captum.attr``'s own loader, followed by the adoption of the bases."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec: Any) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # captum's module keeps its own loader, as if nothing had watched its import.
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        adopt_captum_bases(module)
        _stop_watching()


class _CaptumAttrFinder(importlib.abc.MetaPathFinder):
    """Finds ``captum.attr`` through the other finders and hands out its spec with a loader
    that adopts the bases once the module has run."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> Any:
        if fullname != CAPTUM_ATTR:
            return None
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            if finder is self or find_spec is None:
                continue
            spec = find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _AdoptAfterLoading(spec.loader)
        return spec


_finder = _CaptumAttrFinder()


def _watch_for_captum() -> None:
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


def _stop_watching() -> None:
    if _finder in sys.meta_path:
        sys.meta_path.remove(_finder)
