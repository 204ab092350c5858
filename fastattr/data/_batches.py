"""From dataset items to batches on the device: what an item may be, the batches of a rank's
units, and the target of each batch.

An item is a tensor, or a tuple (or list) of tensors for a model with several inputs (a tuple
of one tensor, as ``TensorDataset(x)`` gives, counts as that tensor). A dataset whose items are
``(inputs, label)`` says so with a true ``fastattr_labels`` attribute, or is wrapped in
[`labeled`][fastattr.data.labeled]; its labels then serve ``target="label"``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler, TensorDataset, default_collate, get_worker_info

from fastattr.data._store import Layout

LABELS_ATTRIBUTE = "fastattr_labels"
Target = Union[None, int, tuple, str, Callable[..., Any]]
TARGET_WORDS = ("label", "predicted")


class _Wrapped(Dataset):
    """A dataset with the items of another."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]


class _Labeled(_Wrapped):
    fastattr_labels = True


def labeled(dataset: Dataset) -> Dataset:
    """``dataset``, declared to hold ``(inputs, label)`` items (as torchvision's datasets do).

    Args:
        dataset: a map-style dataset whose items are ``(inputs, label)``, where ``inputs`` is
            a tensor or a tuple of tensors and ``label`` an int or an integer tensor.

    Returns:
        A dataset with the same items, which
        [`fastattr.attribute_dataset`][fastattr.attribute_dataset] reads as inputs and label,
        so ``target="label"`` attributes each example to its label. (A dataset class of your
        own can say the same with a class attribute ``fastattr_labels = True``.)

    Examples:
        >>> import torch
        >>> from fastattr.data import labeled
        >>> data = labeled(torch.utils.data.TensorDataset(torch.randn(4, 3), torch.arange(4)))
        >>> data.fastattr_labels, len(data)
        (True, 4)
    """
    return _Labeled(dataset)


def has_labels(dataset: Any) -> bool:
    return bool(getattr(dataset, LABELS_ATTRIBUTE, False))


def _describe(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return f"{type(value).__name__} of [{', '.join(_describe(v) for v in value)}]"
    if isinstance(value, Tensor):
        return f"tensor{list(value.shape)}"
    return type(value).__name__


def _is_class_index(value: Tensor) -> bool:
    return value.dim() == 0 and not value.is_floating_point() and not value.is_complex()


@dataclass(frozen=True)
class ItemFormat:
    """What every item of the dataset must look like (that of its first item)."""

    labels: bool
    is_tuple: bool
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    def split(self, item: Any, index: int) -> tuple[tuple[Tensor, ...], Any]:
        """``(inputs, label)`` of an item, checked against the format; errors name the index."""
        label = None
        if self.labels:
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise ValueError(
                    f"dataset item {index}: the dataset says its items are (inputs, label), got "
                    f"{_describe(item)}"
                )
            item, label = item
        inputs = tuple(item) if isinstance(item, (tuple, list)) else (item,)
        if not inputs or not all(isinstance(t, Tensor) for t in inputs):
            hint = (
                "; if the items are (inputs, label), say so with fastattr.data.labeled(dataset)"
                if not self.labels and isinstance(item, (tuple, list))
                else ""
            )
            raise TypeError(
                f"dataset item {index} must be a tensor or a tuple of tensors, got "
                f"{_describe(item)}{hint}"
            )
        if self.shapes and (
            len(inputs) != len(self.shapes)
            or any(tuple(t.shape) != s for t, s in zip(inputs, self.shapes))
            or any(_dtype_name(t.dtype) != d for t, d in zip(inputs, self.dtypes))
        ):
            got = ", ".join(f"{list(t.shape)} {_dtype_name(t.dtype)}" for t in inputs)
            expected = ", ".join(f"{list(s)} {d}" for s, d in zip(self.shapes, self.dtypes))
            raise ValueError(
                f"dataset item {index} has inputs of shape {got}; the job's items (as item 0) "
                f"have {expected}"
            )
        return inputs, label

    @classmethod
    def of(cls, dataset: Any, item: Any) -> ItemFormat:
        unchecked = cls(has_labels(dataset), False, (), ())
        inputs, _ = unchecked.split(item, 0)
        item_inputs = item[0] if unchecked.labels else item
        if not unchecked.labels and len(inputs) > 1 and _is_class_index(inputs[-1]):
            # TensorDataset(features, labels) unwrapped: the label would be attributed as an
            # input (integer inputs run along the path in floating point, as in captum).
            raise TypeError(
                f"dataset item 0 is {_describe(item)}, whose last tensor looks like a label (one "
                "integer per example): say so with fastattr.data.labeled(dataset), or give a "
                "floating point tensor if it is an input"
            )
        return cls(
            unchecked.labels,
            # A tuple of one tensor (TensorDataset's items) is that tensor.
            isinstance(item_inputs, (tuple, list)) and len(inputs) > 1,
            tuple(tuple(t.shape) for t in inputs),
            tuple(_dtype_name(t.dtype) for t in inputs),
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "labels": self.labels,
            "tuple": self.is_tuple,
            "inputs": [{"shape": list(s), "dtype": d} for s, d in zip(self.shapes, self.dtypes)],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ItemFormat:
        inputs = data["inputs"]
        return cls(
            data["labels"],
            data["tuple"],
            tuple(tuple(i["shape"]) for i in inputs),
            tuple(i["dtype"] for i in inputs),
        )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class Batch:
    """Consecutive examples ``first .. first + len - 1``."""

    first: int
    inputs: tuple[Tensor, ...]
    labels: Any

    def __len__(self) -> int:
        return self.inputs[0].shape[0]

    def pin_memory(self) -> Batch:
        # (The DataLoader's pin-memory thread calls this.)
        labels = self.labels.pin_memory() if isinstance(self.labels, Tensor) else self.labels
        return Batch(self.first, tuple(t.pin_memory() for t in self.inputs), labels)


class IndexedItems(_Wrapped):
    """The dataset's items fetched a batch at a time, with their indices (so that errors can
    name them): through the dataset's ``__getitems__`` where it has one, as one slice per
    tensor for a ``TensorDataset`` (with ``slices``: not when a collate function of the
    user's stacks the items), else item by item."""

    def __init__(self, dataset: Dataset, slices: bool = True) -> None:
        super().__init__(dataset)
        inner = dataset.dataset if isinstance(dataset, _Labeled) else dataset
        tensors = slices and type(inner) is TensorDataset
        self._tensors = inner.tensors if tensors else None

    @property
    def in_memory(self) -> bool:
        """Whether the items are slices of tensors in memory (a TensorDataset)."""
        return self._tensors is not None

    def __getitems__(self, indices: list[int]) -> tuple[list[int], Any]:
        if self._tensors is not None:
            rows = slice(indices[0], indices[-1] + 1)
            # In a worker, a view would send the whole dataset's storage to shared memory.
            copy = get_worker_info() is not None
            return indices, Stacked(
                tuple(t[rows].clone() if copy else t[rows] for t in self._tensors)
            )
        getitems = getattr(self.dataset, "__getitems__", None)
        items = getitems(indices) if getitems else [self.dataset[i] for i in indices]
        return indices, items


@dataclass
class Stacked:
    """A batch of a TensorDataset, already one tensor per field."""

    tensors: tuple[Tensor, ...]


class Collate:
    """Stacks a batch's items; when they don't stack into the job's item format, checks them
    one by one to name the first that differs. With the user's own collate function, that
    function stacks and the batch is checked."""

    def __init__(self, item_format: ItemFormat, collate_fn: Callable[..., Any] | None) -> None:
        self.format = item_format
        self.collate_fn = collate_fn

    def _stack(self, items: list[Any]) -> tuple[tuple[Tensor, ...], Any] | None:
        """The items stacked into the job's format, or None where they don't fit it."""
        labels = None
        try:
            if self.format.labels:
                items, labels = zip(*items)
                labels = default_collate(list(labels))
            parts = [item if isinstance(item, (tuple, list)) else (item,) for item in items]
            columns = list(zip(*parts))
            # torch.stack promotes an item of another dtype: each is checked before.
            if any(
                not isinstance(t, Tensor) or _dtype_name(t.dtype) != d
                for column, d in zip(columns, self.format.dtypes)
                for t in column
            ):
                return None
            inputs = tuple(torch.stack(column) for column in columns)
        except (TypeError, ValueError, RuntimeError):
            return None
        fits = len(inputs) == len(self.format.shapes) and all(
            tuple(t.shape[1:]) == s for t, s in zip(inputs, self.format.shapes)
        )
        return (inputs, labels) if fits else None

    def __call__(self, fetched: tuple[list[int], Any]) -> Batch:
        indices, items = fetched
        first = indices[0]
        if indices[-1] - first != len(indices) - 1:
            raise ValueError(f"a batch must hold consecutive examples, got {indices}")
        if isinstance(items, Stacked):
            tensors = items.tensors
            if self.format.labels:
                return Batch(first, tensors[:-1], tensors[-1])
            return Batch(first, tensors, None)
        if self.collate_fn is None:
            stacked = self._stack(items)
            if stacked is None:
                for index, item in zip(indices, items):
                    self.format.split(item, index)  # raises, naming the item
                raise ValueError(f"dataset items {first}..{indices[-1]} don't stack")
            return Batch(first, *stacked)
        batch = self.collate_fn(items)
        shaped = ItemFormat(self.format.labels, self.format.is_tuple, (), ())
        inputs, labels = shaped.split(batch, first)
        expected = [(len(indices), *s) for s in self.format.shapes]
        if [tuple(t.shape) for t in inputs] != expected:
            raise ValueError(
                f"the batch of dataset items {first}..{indices[-1]} from collate_fn has inputs of "
                f"shape {[list(t.shape) for t in inputs]}, expected {[list(s) for s in expected]}"
            )
        return Batch(first, inputs, labels)


class UnitBatches(Sampler[list[int]]):
    """The batches of the given units, in order: each a list of consecutive indices."""

    def __init__(self, layout: Layout, units: Sequence[int]) -> None:
        self.layout = layout
        self.units = units

    def __iter__(self) -> Iterator[list[int]]:
        for unit in self.units:
            for start, stop in self.layout.batches(unit):
                yield list(range(start, stop))

    def __len__(self) -> int:
        return sum(len(range(*self.layout.rows(u))[:: self.layout.batch_size]) for u in self.units)


def check_target(target: Any, labels: bool, takes_target: bool) -> None:
    """Reject a target form attribute_dataset can't serve, before any work."""
    if target is None:
        return
    if not takes_target:
        raise ValueError(
            f"target must be None for an attribution whose attribute() takes no target, got "
            f"{target!r}"
        )
    if isinstance(target, str):
        if target not in TARGET_WORDS:
            raise ValueError(
                f"target must be None, an int, a tuple of ints, 'label', 'predicted' or a "
                f"callable, got {target!r}"
            )
        if target == "label" and not labels:
            raise ValueError(
                "target='label' needs items of the form (inputs, label): wrap the dataset in "
                "fastattr.data.labeled(...) or give its class fastattr_labels = True"
            )
        return
    if callable(target) or isinstance(target, tuple):
        return
    if isinstance(target, int) and not isinstance(target, bool):
        return
    raise TypeError(
        f"target must be None, an int, a tuple of ints, 'label', 'predicted' or a callable of "
        f"the batch, got {type(target).__name__}"
    )


@dataclass
class ResolvedTarget:
    """The target to pass to attribute() for one batch, and what the store keeps of it."""

    value: Any
    rows: Tensor | None  # (batch,) or (batch, k) int64, or None
    output: Tensor | None  # the model's output, for target="predicted"


def _target_rows(value: Any, batch: int, device: torch.device) -> Tensor:
    if isinstance(value, int):
        return torch.full((batch,), value, dtype=torch.int64, device=device)
    if isinstance(value, tuple):
        return torch.tensor([value] * batch, dtype=torch.int64, device=device)
    rows = torch.as_tensor(value, dtype=torch.int64, device=device)
    if rows.shape[:1] != (batch,) or rows.dim() > 2:
        raise ValueError(
            f"the target callable must return one index (or tuple) per example ({batch}), or an "
            f"int, got shape {list(rows.shape)}"
        )
    return rows


def resolve_target(
    target: Target,
    inputs: tuple[Tensor, ...],
    labels: Any,
    *,
    is_tuple: bool,
    forward: Callable[..., Any] | None,
    additional_args: Any,
) -> ResolvedTarget:
    """The batch's target in a form attribute() takes, from the job's target spec."""
    batch = inputs[0].shape[0]
    device = inputs[0].device
    model_inputs = inputs if is_tuple else inputs[0]
    if target is None:
        return ResolvedTarget(None, None, None)
    if target == "label":
        rows = torch.as_tensor(labels, device=device)
        return ResolvedTarget(rows, _target_rows(rows, batch, device), None)
    if target == "predicted":
        assert forward is not None
        extra = additional_args if isinstance(additional_args, tuple) else (additional_args,)
        with torch.no_grad():
            output = forward(*inputs, *(extra if additional_args is not None else ()))
        if not isinstance(output, Tensor) or output.dim() != 2 or output.shape[0] != batch:
            raise ValueError(
                "target='predicted' needs a model output of shape (batch, classes), got "
                f"{list(output.shape) if isinstance(output, Tensor) else type(output).__name__}"
            )
        rows = output.argmax(dim=1)
        return ResolvedTarget(rows, rows, output)
    if callable(target):
        value = target((model_inputs, labels) if labels is not None else model_inputs)
        if isinstance(value, list) and value and isinstance(value[0], tuple):
            return ResolvedTarget(value, _target_rows(value, batch, device), None)
        if isinstance(value, (list, Tensor)):
            rows = _target_rows(value, batch, device)
            return ResolvedTarget(rows, rows, None)
        return ResolvedTarget(value, _target_rows(value, batch, device), None)
    return ResolvedTarget(target, _target_rows(target, batch, device), None)
