"""The attribution store: a zarr v3 group holding one array per result, one row per example.

Layout (paths inside the group)::

    zarr.json            the job's metadata, under the "fastattr" attribute
    attributions/0, ...  one array per attribution tensor (one per input for tuple inputs)
    delta                the convergence delta, with return_convergence_delta=True
    target               the target of each example, when there is one
    output               the model's output for each example, with target="predicted"
    extras/NAME          anything else attribute() returned with one row per example
    complete             one flag per unit of work: set once the unit's rows are written
    _failures/rank-N     written by a rank that failed, for the others to read

The examples are grouped into units of work of whole batches. A unit covers whole chunks of
every array, so two processes never write the same chunk file, and a unit is marked complete
only after its rows are written (and, on a local file system, flushed to disk): a process
killed at any moment leaves each unit either complete or to be redone. Every chunk of a
complete unit has its file, even one whose rows all equal the fill value (format 2), so a
chunk file missing from a complete unit is damage, found by listing the store's keys.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import torch
from torch import Tensor

from fastattr.data._results import Structure, rebuild

if TYPE_CHECKING:
    import zarr

StoreLike = Union[str, os.PathLike]

# Format 1 left out a chunk whose rows all equal the fill value, so a missing chunk file could
# be such a chunk; format 2 writes every chunk. A format 1 store is read and resumed (and
# becomes format 2 when resumed).
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
METADATA_KEY = "fastattr"
COMPLETE = "complete"
FAILURES = "_failures"
# A unit of work holds at least UNIT_BYTES of results and UNIT_SECONDS of compute, so that
# writing it (a few files, flushed) costs little beside computing it; but the dataset is cut
# into MIN_UNITS units at least where it has the batches, so that processes share it evenly.
# A killed run redoes at most the units in flight.
UNIT_BYTES = 1 << 20
UNIT_SECONDS = 2.0
MIN_UNITS = 16
# A chunk holds at most this many bytes, so reading one example decompresses little.
CHUNK_BYTES = 4 << 20

ZARR_MISSING = (
    "attributing datasets needs zarr 3 (`pip install 'fastattr[data]'`; zarr 3 needs Python "
    "3.11 or newer)"
)


def import_zarr() -> Any:
    """The zarr module, or an ImportError that says how to install it."""
    try:
        import zarr
    except ImportError as error:
        raise ImportError(ZARR_MISSING) from error
    if int(zarr.__version__.split(".")[0]) < 3:
        raise ImportError(f"{ZARR_MISSING}; found zarr {zarr.__version__}")
    return zarr


@dataclass(frozen=True)
class Layout:
    """How the examples are grouped: batches of ``batch_size`` consecutive examples, units of
    ``rows_per_unit`` (a multiple of the batch size). Fixed by the job, not by the number of
    processes, so every run computes the same batches."""

    length: int
    batch_size: int
    rows_per_unit: int

    @classmethod
    def choose(cls, length: int, batch_size: int, row_bytes: int, batch_seconds: float) -> Layout:
        """Units of whole batches, sized from the bytes of a row of results and the seconds
        a batch took to compute."""
        batches = math.ceil(length / batch_size)
        per_unit = max(
            math.ceil(UNIT_BYTES / max(1, batch_size * row_bytes)),
            math.ceil(UNIT_SECONDS / max(batch_seconds, 1e-6)),
        )
        per_unit = max(1, min(per_unit, batches // MIN_UNITS))
        return cls(length, batch_size, batch_size * per_unit)

    @property
    def units(self) -> int:
        return math.ceil(self.length / self.rows_per_unit)

    def rows(self, unit: int) -> tuple[int, int]:
        start = unit * self.rows_per_unit
        return start, min(start + self.rows_per_unit, self.length)

    def batches(self, unit: int) -> Iterator[tuple[int, int]]:
        start, stop = self.rows(unit)
        for first in range(start, stop, self.batch_size):
            yield first, min(first + self.batch_size, stop)

    def as_json(self) -> dict[str, int]:
        return {
            "length": self.length,
            "batch_size": self.batch_size,
            "rows_per_unit": self.rows_per_unit,
            "units": self.units,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, int]) -> Layout:
        return cls(data["length"], data["batch_size"], data["rows_per_unit"])


@dataclass(frozen=True)
class ArraySpec:
    """One per-example array: its path in the group, the shape of a row, its dtype."""

    name: str
    row_shape: tuple[int, ...]
    dtype: str

    @property
    def row_bytes(self) -> int:
        return math.prod(self.row_shape) * np.dtype(self.dtype).itemsize

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "row_shape": list(self.row_shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ArraySpec:
        return cls(data["name"], tuple(data["row_shape"]), data["dtype"])


def chunk_rows(rows_per_unit: int, row_bytes: int) -> int:
    """The largest divisor of the unit's rows whose chunk stays within CHUNK_BYTES."""
    fitting = max(1, CHUNK_BYTES // max(1, row_bytes))
    return max(d for d in range(1, min(rows_per_unit, fitting) + 1) if rows_per_unit % d == 0)


def fill_value(dtype: str) -> Any:
    """What rows not yet written read as: NaN for floats, -1 for integers."""
    kind = np.dtype(dtype).kind
    return float("nan") if kind in "fc" else False if kind == "b" else -1


def local_root(out: StoreLike) -> Path | None:
    """The directory of a store on the local file system, None for a URL."""
    text = os.fspath(out)
    return None if "://" in text else Path(text)


# The metadata of a store while its arrays are being created.
CREATING = "creating"


def read_metadata(out: StoreLike) -> dict[str, Any] | None:
    """The job metadata at ``out``; None when nothing is there; an error when something other
    than a fastattr store is. A store whose creation has not finished (or was cut short) has
    ``{CREATING: True}``."""
    zarr = import_zarr()
    root = local_root(out)
    if root is not None and (not root.exists() or (root.is_dir() and not any(root.iterdir()))):
        return None
    try:
        group = zarr.open_group(out, mode="r")
    except (FileNotFoundError, zarr.errors.BaseZarrError):
        group = None
    metadata = None if group is None else group.attrs.get(METADATA_KEY)
    if metadata is None:
        raise FileExistsError(
            f"out ({os.fspath(out)}) already holds something other than a fastattr store; "
            "choose another path"
        )
    return dict(metadata)


def create_store(
    out: StoreLike,
    metadata: Mapping[str, Any],
    specs: Sequence[ArraySpec],
    layout: Layout,
    *,
    overwrite: bool,
) -> zarr.Group:
    """A new store at ``out`` with empty arrays (rows read as their fill value until written)."""
    zarr = import_zarr()
    # Marked as a store from the start: a creation cut short is recognized, and redone.
    group = zarr.open_group(
        out, mode="w" if overwrite else "w-", attributes={METADATA_KEY: {CREATING: True}}
    )
    for spec in specs:
        group.create_array(
            spec.name,
            shape=(layout.length, *spec.row_shape),
            chunks=(chunk_rows(layout.rows_per_unit, spec.row_bytes), *spec.row_shape),
            dtype=spec.dtype,
            fill_value=fill_value(spec.dtype),
            # zarr's default compressor with a checksum: a damaged chunk fails to read rather
            # than reading as other numbers.
            compressors=zarr.codecs.ZstdCodec(level=0, checksum=True),
        )
    group.create_array(COMPLETE, shape=(layout.units,), chunks=(1,), dtype="uint8", fill_value=0)
    group.attrs[METADATA_KEY] = dict(metadata)
    return group


def completed_units(group: zarr.Group) -> np.ndarray:
    """One bool per unit of work: True once its rows are in the store."""
    return np.asarray(group[COMPLETE][:], dtype=bool)


def chunk_keys(array: zarr.Array, start: int, stop: int) -> Iterator[str]:
    """The store keys of the chunks holding rows ``start`` to ``stop - 1`` of ``array``."""
    rows = array.chunks[0]
    others = [range(math.ceil(s / c)) for s, c in zip(array.shape[1:], array.chunks[1:])]
    encoding = array.metadata.chunk_key_encoding
    for coords in itertools.product(range(start // rows, math.ceil(stop / rows)), *others):
        yield f"{array.path}/{encoding.encode_chunk_key(coords)}"


def _stored_keys(group: zarr.Group, prefix: str) -> set[str]:
    """The keys under ``prefix`` in the group's store: one listing, no chunk read."""
    from zarr.core.sync import sync  # zarr's own bridge from its async stores

    async def collect() -> set[str]:
        return {key async for key in group.store.list_prefix(prefix)}

    return sync(collect())


def units_lacking_chunks(
    group: zarr.Group, names: Sequence[str], layout: Layout, units: Sequence[int]
) -> dict[str, list[int]]:
    """The units among ``units`` that miss a chunk file of an array, by array name (arrays
    that miss none are left out), from one listing of the store per array."""
    lacking = {}
    for name in names:
        array = group[name]
        stored = _stored_keys(group, f"{array.path}/")
        missing = [
            unit
            for unit in units
            if any(key not in stored for key in chunk_keys(array, *layout.rows(unit)))
        ]
        if missing:
            lacking[name] = missing
    return lacking


def row_ranges(layout: Layout, units: Sequence[int], most: int = 8) -> str:
    """The rows of ``units`` as readable ranges (``8..15, 24..27``), the first ``most`` of
    them and how many more."""
    ranges: list[list[int]] = []
    for unit in sorted(units):
        start, stop = layout.rows(unit)
        if ranges and ranges[-1][1] == start - 1:
            ranges[-1][1] = stop - 1
        else:
            ranges.append([start, stop - 1])
    text = ", ".join(f"{a}..{b}" for a, b in ranges[:most])
    return text + (f" and {len(ranges) - most} more ranges" if len(ranges) > most else "")


def _flush(paths: set[Path]) -> None:
    """fsync files: their data is on disk before the unit's flag is written. (Journaling file
    systems commit the renames that put them in place in order, the flag's after theirs.) A
    file missing here is an error: a unit is marked complete only with every chunk file."""
    for path in sorted(paths):
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


class UnitWriter:
    """Writes whole units: their rows into every array, then (on a local file system) an
    fsync of the files written, then the unit's complete flag. Every file is replaced
    atomically (zarr writes a temporary file and renames it), so a killed process leaves each
    file old or new; the flag goes last, so a flagged unit's rows are there. (The flag needs
    no fsync: lost, it only makes a unit be redone.)"""

    def __init__(self, group: zarr.Group, specs: Sequence[ArraySpec]) -> None:
        # Every chunk written, also one equal to the fill value (zarr would leave it out): a
        # complete unit has all its chunk files, so a missing one is found as damage.
        self.arrays = {
            spec.name: group[spec.name].with_config({"write_empty_chunks": True}) for spec in specs
        }
        self.complete = group[COMPLETE]
        root = getattr(group.store, "root", None)
        self._root = Path(root) if root is not None else None

    def write(self, unit: int, start: int, columns: Mapping[str, np.ndarray]) -> None:
        stop = start + len(next(iter(columns.values())))
        for name, values in columns.items():
            self.arrays[name][start:stop] = values
        if self._root is not None:
            root = self._root
            _flush({root / k for n in columns for k in chunk_keys(self.arrays[n], start, stop)})
        self.complete[unit] = 1


Index = Union[int, slice, Sequence[int], np.ndarray]


class Rows:
    """Lazy rows of one result (one array, or one per tensor for tuple inputs and several
    layers): ``rows[i]``, ``rows[a:b]`` or ``rows[[i, j]]`` read only the chunks holding those
    examples and give numpy arrays, nested as ``attribute()`` returns them.

    Args:
        arrays: the zarr arrays, examples along dimension 0 (``rows.arrays``, for zarr, dask
            or xarray).
        structure: how the arrays nest: ``"tensor"`` (one array), ``{"tuple": [...]}`` or
            ``{"list": [...]}``.
    """

    def __init__(self, arrays: Sequence[zarr.Array], structure: Structure = "tensor") -> None:
        self.arrays = tuple(arrays)
        self.structure = structure
        # Set by the AttributionStore: raises for rows marked complete whose chunk files
        # are missing, before zarr reads them as the fill value.
        self._check: Callable[[zarr.Array, Any], None] | None = None

    def __len__(self) -> int:
        return self.arrays[0].shape[0]

    def __repr__(self) -> str:
        shapes = ", ".join(f"{tuple(a.shape)} {a.dtype}" for a in self.arrays)
        return f"Rows({shapes})"

    def _read(self, array: zarr.Array, index: Index) -> np.ndarray:
        if isinstance(index, (int, np.integer, slice)):
            if self._check is not None:
                self._check(array, index)
            return np.asarray(array[index])
        rows = np.asarray(index.cpu() if isinstance(index, Tensor) else index)
        if rows.dtype == bool:  # a mask: the rows where it is True
            if rows.shape != (array.shape[0],):
                raise IndexError(
                    f"a boolean mask must have one entry per example ({array.shape[0]}), got "
                    f"shape {list(rows.shape)}"
                )
            rows = np.flatnonzero(rows)
        rows = rows.astype(np.int64)
        if self._check is not None:
            self._check(array, rows)
        return np.asarray(array.get_orthogonal_selection((rows,)))

    def __getitem__(self, index: Index) -> Any:
        return rebuild(self.structure, [self._read(array, index) for array in self.arrays])

    def tensor(self, index: Index) -> Any:
        """The rows at ``index`` as torch tensors.

        Args:
            index: an example index, a slice or a sequence of indices.

        Returns:
            ``self[index]`` as tensors (sharing memory with the numpy arrays read), nested
            as ``attribute()`` returns them.
        """
        return rebuild(
            self.structure,
            # (np.ascontiguousarray would make a 0-d row 1-d.)
            [
                torch.from_numpy(np.require(self._read(a, index), requirements="C"))
                for a in self.arrays
            ],
        )


class AttributionStore:
    """The results of [`fastattr.attribute_dataset`][fastattr.attribute_dataset], read lazily
    from its store.

    Index by example: ``store.attributions[i]`` (a tuple of arrays, one per input, for tuple
    inputs), ``store.delta[i]``, ``store.target[i]``, ``store.output[i]``,
    ``store.extras[name][i]``; slices and lists of indices read only the chunks they need.
    ``store.complete`` says which examples are written: a store can be read while a job is
    still writing it, and rows not yet written read as NaN (floats) or -1 (integers). Rows
    marked complete whose chunk files are missing from the store (deleted, or not copied) are
    found when the store is opened: ``store.missing`` lists them, ``store.complete`` counts
    them as not written, and reading them raises ``FileNotFoundError`` (running the same job
    again computes them again).

    Args:
        group: the zarr group of the store (see [`fastattr.open_store`][fastattr.open_store]).

    Examples:
        >>> import tempfile, torch
        >>> from torch import nn
        >>> import fastattr
        >>> model = nn.Sequential(nn.Linear(4, 3)).eval()
        >>> data = torch.utils.data.TensorDataset(torch.randn(10, 4))
        >>> out = tempfile.mkdtemp() + "/ig"
        >>> _ = fastattr.attribute_dataset(
        ...     fastattr.IntegratedGradients(model), data, out, target=0, progress=False,
        ...     return_convergence_delta=True)
        >>> store = fastattr.open_store(out)
        >>> len(store), store.is_complete, store.attributions[2:4].shape
        (10, True, (2, 4))
        >>> store.delta.tensor(slice(0, 3)).dtype
        torch.float32
    """

    def __init__(self, group: zarr.Group) -> None:
        self.group = group
        self.metadata: dict[str, Any] = dict(group.attrs[METADATA_KEY])
        self.layout = Layout.from_json(self.metadata["layout"])
        # Units marked complete that miss chunk files, by array. (In a format 1 store a chunk
        # equal to the fill value has no file, so a missing file is no sign of damage there.)
        self._lacking: dict[str, list[int]] = {}
        if self.metadata.get("format", 1) >= 2:
            names = [spec["name"] for spec in self.metadata["arrays"]]
            done = np.flatnonzero(completed_units(group)).tolist()
            self._lacking = units_lacking_chunks(group, names, self.layout, done)
        results = self.metadata["results"]
        self.attributions = self._rows(results["attributions"], results["structure"])
        self.delta = self._optional(results.get("delta"))
        self.target = self._optional(results.get("target"))
        self.output = self._optional(results.get("output"))
        self.extras = {name: self._rows([path]) for name, path in results["extras"].items()}

    def _rows(self, names: Sequence[str], structure: Structure = "tensor") -> Rows:
        rows = Rows([self.group[name] for name in names], structure)
        rows._check = self._check_rows
        return rows

    def _optional(self, name: str | None) -> Rows | None:
        return None if name is None else self._rows([name])

    def _recheck(self, names: Sequence[str]) -> None:
        """Look again at the units found lacking chunk files in ``names`` (a job run since
        may have computed them again)."""
        for name in names:
            found = units_lacking_chunks(self.group, [name], self.layout, self._lacking[name])
            if found:
                self._lacking[name] = found[name]
            else:
                del self._lacking[name]

    def _check_rows(self, array: zarr.Array, index: Any) -> None:
        """Raise if ``index`` reads rows marked complete whose chunk files are missing."""
        if array.path not in self._lacking:
            return
        try:
            rows = np.arange(array.shape[0])[index]
        except IndexError:
            return  # zarr says what is wrong with the index
        hit = np.intersect1d(
            np.unique(rows // self.layout.rows_per_unit), self._lacking[array.path]
        )
        if len(hit) == 0:
            return
        self._recheck([array.path])
        hit = np.intersect1d(hit, self._lacking.get(array.path, []))
        if len(hit):
            raise FileNotFoundError(
                f"examples {row_ranges(self.layout, hit.tolist())} of {array.path} are marked "
                f"complete, but their chunk files are missing from the store at {self.path} "
                "(deleted, or not copied?): run the same job again to compute them again"
            )

    @property
    def missing(self) -> dict[str, list[tuple[int, int]]]:
        """The examples marked complete whose results are missing from the store (chunk
        files deleted, or not copied), by array: ``{"attributions/0": [(start, stop), ...]}``
        with rows ``start`` to ``stop - 1``; empty for a sound store. Found when the store is
        opened, from one listing of its keys per array, and looked at again here. (Not for
        a format 1 store, which left out chunks equal to the fill value.)"""
        self._recheck(list(self._lacking))
        return {
            name: [self.layout.rows(unit) for unit in units]
            for name, units in self._lacking.items()
        }

    @property
    def path(self) -> str:
        """Where the store is (a directory or a URL)."""
        root = getattr(self.group.store, "root", None)
        return os.fspath(root) if root is not None else str(self.group.store)

    def __len__(self) -> int:
        return self.layout.length

    def __repr__(self) -> str:
        done = int(self.complete.sum())
        rows = {row for ranges in self.missing.values() for r in ranges for row in range(*r)}
        damage = f", {len(rows)} marked complete but missing from the store" if rows else ""
        return f"AttributionStore({self.path!r}, {done}/{len(self)} examples complete{damage})"

    def _completed_units(self) -> np.ndarray:
        units = completed_units(self.group)
        if self._lacking:
            self._recheck(list(self._lacking))
            for lacking in self._lacking.values():
                units[lacking] = False
        return units

    @property
    def complete(self) -> np.ndarray:
        """One bool per example: True where its results are written (read afresh; rows in
        [`missing`][fastattr.AttributionStore.missing] are not)."""
        rows = np.repeat(self._completed_units(), self.layout.rows_per_unit)
        return rows[: self.layout.length]

    @property
    def is_complete(self) -> bool:
        """Whether every example's results are written."""
        return bool(self._completed_units().all())

    def as_dataset(self) -> torch.utils.data.Dataset:
        """The store as a map-style torch Dataset, for a DataLoader.

        Returns:
            A dataset whose item ``i`` is a dict of tensors: ``"attributions"`` and, where
            stored, ``"delta"``, ``"target"``, ``"output"`` and the extras by name, read from
            the store one example at a time.
        """
        return _StoreDataset(self)


class _StoreDataset(torch.utils.data.Dataset):
    def __init__(self, store: AttributionStore) -> None:
        self.rows = {"attributions": store.attributions}
        for name in ("delta", "target", "output"):
            if getattr(store, name) is not None:
                self.rows[name] = getattr(store, name)
        self.rows.update(store.extras)

    def __len__(self) -> int:
        return len(self.rows["attributions"])

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {name: rows.tensor(index) for name, rows in self.rows.items()}


def open_store(out: StoreLike) -> AttributionStore:
    """Open the store that [`fastattr.attribute_dataset`][fastattr.attribute_dataset] wrote
    (or is writing) at ``out``.

    Args:
        out: the store's directory (or a URL zarr understands, e.g. ``s3://...`` with fsspec).

    Returns:
        The [`AttributionStore`][fastattr.AttributionStore], read lazily.

    Raises:
        FileNotFoundError: nothing is at ``out``.
        FileExistsError: ``out`` holds something other than a fastattr store.
        ImportError: zarr 3 is not installed (``pip install 'fastattr[data]'``).
    """
    zarr = import_zarr()
    metadata = read_metadata(out)
    if metadata is None:
        raise FileNotFoundError(f"no fastattr store at {os.fspath(out)}")
    if metadata.get(CREATING):
        raise FileNotFoundError(
            f"the fastattr store at {os.fspath(out)} is being created, or its creation was "
            "cut short (rerunning the job creates it anew)"
        )
    return AttributionStore(zarr.open_group(out, mode="r"))
