"""What ``attribute()`` returns, taken apart into per-example arrays for the store and put
back together when read.

The attributions may be a tensor, a tuple of tensors (tuple inputs, a layer with several
outputs) or a list of those (several layers); ``return_convergence_delta`` adds the delta;
anything further that a method returns with one row per example (a tuple's later entries, the
fields of a named tuple, a dataclass or a dict) is kept as an extra under its name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Union

from torch import Tensor

# How tensors nest: "tensor", {"tuple": [...]} or {"list": [...]}.
Structure = Union[str, dict[str, list[Any]]]
DELTA_NAMES = ("delta", "convergence_delta")


def flatten(tree: Any, what: str = "attributions") -> tuple[Structure, list[Tensor]]:
    """The tensors of ``tree`` in order, and how they nest."""
    if isinstance(tree, Tensor):
        return "tensor", [tree]
    if isinstance(tree, (tuple, list)) and tree:
        structures, leaves = [], []
        for i, item in enumerate(tree):
            structure, items = flatten(item, f"{what}[{i}]")
            structures.append(structure)
            leaves += items
        return {"tuple" if isinstance(tree, tuple) else "list": structures}, leaves
    raise TypeError(
        f"attribute() returned {what} of type {type(tree).__name__}: attribute_dataset stores "
        "tensors, tuples and lists of tensors"
    )


def rebuild(structure: Structure, leaves: list[Any]) -> Any:
    """The inverse of ``flatten``, on any leaves (arrays, tensors)."""
    items = iter(leaves)

    def build(node: Structure) -> Any:
        if node == "tensor":
            return next(items)
        assert isinstance(node, dict)
        ((kind, children),) = node.items()
        built = [build(child) for child in children]
        return tuple(built) if kind == "tuple" else built

    return build(structure)


def _fields(result: Any) -> dict[str, Any] | None:
    """A result object's named parts (named tuple, dataclass, mapping), else None."""
    if isinstance(result, tuple) and hasattr(result, "_fields"):
        return dict(zip(result._fields, result))
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        return {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}
    if isinstance(result, Mapping):
        return {str(k): v for k, v in result.items()}
    return None


def split_result(
    result: Any, with_delta: bool, with_steps: bool = False
) -> tuple[Any, Tensor | None, dict[str, Any]]:
    """``(attributions, delta or None, extras by name)`` of what ``attribute()`` returned;
    with ``with_steps`` (``return_n_steps=True``), its last item is the extra ``n_steps``."""
    if with_steps:
        if not isinstance(result, tuple) or len(result) < 2:
            raise TypeError(
                "attribute() with return_n_steps=True returned "
                f"{type(result).__name__}, not (attributions, ..., steps)"
            )
        rest = result[:-1] if with_delta else result[0]
        attributions, delta, extras = split_result(rest, with_delta)
        return attributions, delta, {**extras, "n_steps": result[-1]}
    fields = _fields(result)
    if fields is not None:
        if "attributions" not in fields:
            raise TypeError(
                f"attribute() returned a {type(result).__name__} without an 'attributions' "
                f"field (fields: {sorted(fields)})"
            )
        attributions = fields.pop("attributions")
        delta = next((fields.pop(n) for n in DELTA_NAMES if n in fields), None)
        return attributions, delta, {k: v for k, v in fields.items() if v is not None}
    if not with_delta:
        return result, None, {}
    if not isinstance(result, tuple) or len(result) < 2:
        raise TypeError(
            "attribute() with return_convergence_delta=True returned "
            f"{type(result).__name__}, not (attributions, delta, ...)"
        )
    return result[0], result[1], {str(i): extra for i, extra in enumerate(result[2:], start=2)}
