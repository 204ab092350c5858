"""The documentation: the site builds in strict mode, every public name is documented and
rendered in the API reference, and the Python examples on the pages run.

Public: a module none of whose dotted parts starts with an underscore; its names are its
``__all__``, or, without one, every name it defines that does not start with an underscore.
Documented: a docstring, and every parameter of a public function, method or constructor
named in its Google-style ``Args:`` section (``Attributes:`` for a dataclass's fields).
The docstrings' ``>>>`` examples run as doctests (``--doctest-modules`` in pyproject.toml).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import pkgutil
import re
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

import fastattr

pytest.importorskip("mkdocs", reason="the docs tools come with `make test` (TEST_DEPS)")
griffe = pytest.importorskip("griffe")

ROOT = Path(__file__).resolve().parents[1]
SECTIONS_NAMING_PARAMETERS = {"parameters", "other parameters", "attributes"}


def public_modules() -> list[str]:
    names = ["fastattr"]
    for info in pkgutil.walk_packages(fastattr.__path__, "fastattr."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return names


def public_names(module_name: str) -> list[str]:
    module = importlib.import_module(module_name)
    exported = getattr(module, "__all__", None)
    if exported is not None:
        return [name for name in exported if name != "__version__"]
    return sorted(
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and (inspect.isclass(value) or inspect.isfunction(value))
        and value.__module__ == module_name
    )


def public_objects() -> Iterator[tuple[str, object, str]]:
    """(dotted path, object, docstring) of every public function, class and public method,
    each object once (under the first public path found). A method without a docstring of
    its own is documented by the one it overrides."""
    seen: set[int] = set()
    for module_name in public_modules():
        module = importlib.import_module(module_name)
        for name in public_names(module_name):
            value = getattr(module, name)
            if not (inspect.isclass(value) or inspect.isfunction(value)) or id(value) in seen:
                continue  # submodules are checked as modules; constants carry no docstring
            seen.add(id(value))
            yield f"{module_name}.{name}", value, inspect.getdoc(value) or ""
            if not inspect.isclass(value):
                continue
            for member, attribute in vars(value).items():
                if member.startswith("_"):
                    continue
                if isinstance(attribute, (staticmethod, classmethod)):
                    attribute = attribute.__func__
                if inspect.isfunction(attribute) or isinstance(attribute, property):
                    docstring = inspect.getdoc(getattr(value, member)) or ""
                    yield f"{module_name}.{name}.{member}", attribute, docstring


def _named_in_docstring(docstring: str) -> set[str]:
    parsed = griffe.Docstring(docstring, parser="google").parse(warnings=False)
    return {
        item.name.lstrip("*")
        for section in parsed
        if section.kind.value in SECTIONS_NAMING_PARAMETERS
        for item in section.value
    }


def _parameters(function: object) -> list[str]:
    names = list(inspect.signature(function).parameters)
    return [name for name in names if name not in ("self", "cls")]


def _own_init(cls: type) -> object | None:
    """The constructor whose parameters the class must document, if it defines one."""
    if dataclasses.is_dataclass(cls) or issubclass(cls, tuple):
        return cls.__init__ if dataclasses.is_dataclass(cls) else None
    return vars(cls).get("__init__")


# A twin documented as "Twin of [fastattr.ops.name][]" takes that op's documented arguments.
TWIN_OF = re.compile(r"Twin of \[(fastattr\.[\w.]+)\]\[\]")


# Sphinx roles, which mkdocstrings shows as written instead of linking.
SPHINX_ROLE = re.compile(r":(func|meth|class|mod|data|attr|obj|exc):`")


def undocumented(path: str, value: object, docstring: str) -> list[str]:
    if not docstring.strip():
        return [f"{path}: no docstring"]
    if SPHINX_ROLE.search(docstring):
        return [f"{path}: a Sphinx role; link with [name][fastattr.path.to.name]"]
    if isinstance(value, property):
        return []
    if inspect.isclass(value):
        init = _own_init(value)
        if init is None:
            if issubclass(value, tuple) and hasattr(value, "_fields"):
                missing = set(value._fields) - _named_in_docstring(docstring)
                return [f"{path}: field {name!r} not in Attributes" for name in sorted(missing)]
            return []
        named = _named_in_docstring(docstring) | _named_in_docstring(init.__doc__ or "")
        parameters = _parameters(init)
    else:
        named = _named_in_docstring(docstring)
        twin = TWIN_OF.search(docstring)
        if twin is not None:
            original = _resolve(twin.group(1))
            if original is None or _parameters(original) != _parameters(value):
                return [f"{path}: not the twin of {twin.group(1)} (no such op, or other arguments)"]
            named |= _named_in_docstring(inspect.getdoc(original) or "")
        parameters = _parameters(value)
    return [f"{path}: parameter {name!r} not in Args" for name in parameters if name not in named]


def test_every_public_name_is_documented():
    problems = [
        problem
        for path, value, docstring in public_objects()
        for problem in undocumented(path, value, docstring)
    ]
    assert problems == [], "\n".join(problems)


def test_every_public_module_has_a_docstring_without_sphinx_roles():
    docstrings = {name: importlib.import_module(name).__doc__ or "" for name in public_modules()}
    assert [name for name, doc in docstrings.items() if not doc.strip()] == []
    assert [name for name, doc in docstrings.items() if SPHINX_ROLE.search(doc)] == []


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site, built as `make docs` builds it but with --strict: any warning fails."""
    out = tmp_path_factory.mktemp("site")
    completed = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return out


def _inventory(site: Path) -> set[str]:
    """The names in the site's Sphinx inventory (objects.inv), which mkdocstrings writes for
    every object it renders."""
    raw = (site / "objects.inv").read_bytes()
    header_end = 0
    for _ in range(4):
        header_end = raw.index(b"\n", header_end) + 1
    text = zlib.decompress(raw[header_end:]).decode()
    return {line.split(" ", 1)[0] for line in text.splitlines() if line}


def _resolve(path: str) -> object | None:
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            value = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for part in parts[cut:]:
            value = inspect.getattr_static(value, part, None)
            if value is None:
                return None
        return value
    return None


def test_the_site_builds_strictly_and_renders_every_public_name(site):
    rendered = _inventory(site)
    rendered_objects = {id(_resolve(path)) for path in rendered}
    missing = [
        path
        for path, _, _ in public_objects()
        if path not in rendered
        and id(inspect.getattr_static(*_split(path))) not in rendered_objects
    ]
    assert missing == [], "not in the API reference: " + ", ".join(missing)
    for module in public_modules():
        assert module in rendered, f"{module} has no section in the API reference"


def _split(path: str) -> tuple[object, str]:
    owner, _, name = path.rpartition(".")
    return _resolve(owner), name


# ----------------------------------------------------------------------------- examples

FENCE = re.compile(r"(<!-- no-run -->\n)?```python\n(.*?)```", re.DOTALL)
PAGES = sorted((ROOT / "docs").rglob("*.md"))


def python_blocks(page: Path) -> list[str]:
    """The page's ```python blocks, in order, except those preceded by `<!-- no-run -->`."""
    return [code for skip, code in FENCE.findall(page.read_text()) if not skip]


@pytest.mark.parametrize(
    "page",
    [page for page in PAGES if python_blocks(page)],
    ids=lambda page: str(page.relative_to(ROOT / "docs")),
)
def test_the_python_examples_on_each_page_run(page, tmp_path, monkeypatch):
    # One namespace per page, blocks in order, as a reader would run them.
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem}"}
    for code in python_blocks(page):
        exec(compile(code, str(page), "exec"), namespace)
