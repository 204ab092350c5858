"""attribute_dataset: a whole dataset through an attribution method into a store, on one
process or on every rank of a torch.distributed job, resumable."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import queue
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate, default_convert

from fastattr._path_integral import _SavedTensorMeter, chunk_budget, model_state_tensors
from fastattr.data._batches import (
    Batch,
    Collate,
    IndexedItems,
    ItemFormat,
    ResolvedTarget,
    Target,
    UnitBatches,
    check_target,
    has_labels,
    resolve_target,
)
from fastattr.data._distributed import (
    FailureBoard,
    Ranks,
    current_ranks,
    from_rank0,
    restored_generators,
    seed_generators,
)
from fastattr.data._job import (
    PER_BATCH_ARGUMENTS,
    Describer,
    attribute_parameters,
    differences,
    effective_arguments,
    forward_of,
    item_fingerprints,
    listed,
    model_digest,
    model_of,
    qualified_name,
    wrapped_attributions,
)
from fastattr.data._results import flatten, split_result
from fastattr.data._store import (
    COMPLETE,
    CREATING,
    FORMAT_VERSION,
    METADATA_KEY,
    READABLE_FORMATS,
    ArraySpec,
    AttributionStore,
    Layout,
    StoreLike,
    UnitWriter,
    completed_units,
    create_store,
    import_zarr,
    read_metadata,
    row_ranges,
    units_lacking_chunks,
)

DEFAULT_BATCH_SIZE = 32
# Units between the computing loop and the writer thread: enough to ride out a slow write,
# few enough to keep memory bounded.
WRITE_QUEUE_UNITS = 2
MAX_DEFAULT_WORKERS = 4


class StoreWriteError(OSError):
    """Writing results into the store failed (a full disk, an unwritable path). The units
    already marked complete are intact; rerunning the job resumes from them."""


def _loader_settings(data: Any) -> tuple[Dataset, dict[str, Any], Any, int | None]:
    """The dataset, the DataLoader settings to keep, the user's collate function (None for
    torch's default) and the batch size a DataLoader brings."""
    if isinstance(data, DataLoader):
        dataset = data.dataset
        settings = {
            "num_workers": data.num_workers,
            "pin_memory": data.pin_memory,
            "worker_init_fn": data.worker_init_fn,
            "multiprocessing_context": data.multiprocessing_context,
            "timeout": data.timeout,
        }
        if data.num_workers > 0:
            settings["prefetch_factor"] = data.prefetch_factor
        collate = None if data.collate_fn in (default_collate, default_convert) else data.collate_fn
        batch_size = data.batch_size
    else:
        dataset, settings, collate, batch_size = data, {}, None, None
    if isinstance(dataset, IterableDataset) or not (
        hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")
    ):
        raise TypeError(
            "data must be a map-style dataset (with __len__ and __getitem__) or a DataLoader "
            f"over one, got {type(dataset).__name__}: the store keeps each example at its index"
        )
    return dataset, settings, collate, batch_size


def _default_workers(ranks: Ranks, dataset: Dataset, device: torch.device) -> int:
    """DataLoader workers per process: none for tensors in memory computed on the CPU (a
    slice per batch costs less than a worker's hand-over), else the CPUs this process may use,
    less one for it (on a GPU, workers and the pinning thread prepare the next batches while
    the device computes)."""
    if device.type == "cpu" and IndexedItems(dataset).in_memory:
        return 0
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", ranks.world))
    return max(0, min(MAX_DEFAULT_WORKERS, cpus // max(1, local_world) - 1))


def _device_of(attribution: Any, ranks: Ranks) -> torch.device:
    model = model_of(attribution)
    tensors = [] if model is None else [*model.parameters(), *model.buffers()]
    device = tensors[0].device if tensors else torch.device("cpu")
    if ranks.distributed and device.type == "cuda" and device.index != ranks.local_rank:
        warnings.warn(
            f"rank {ranks.rank} runs its model on {device}, not on its LOCAL_RANK device "
            f"cuda:{ranks.local_rank}",
            stacklevel=3,
        )
    return device


def _host_dtype(dtype: torch.dtype) -> torch.dtype:
    # numpy (and so zarr) has no bfloat16.
    return torch.float32 if dtype == torch.bfloat16 else dtype


def _numpy_dtype(dtype: torch.dtype) -> str:
    return torch.empty((), dtype=_host_dtype(dtype)).numpy().dtype.name


@dataclass
class _Plan:
    """What rank 0 tells every rank before they start."""

    metadata: dict[str, Any]
    remaining: list[int]


class _Job:
    """Everything needed to compute one batch, the same way in every process and run."""

    def __init__(
        self,
        attribution: Any,
        dataset: Dataset,
        collate: Any,
        target: Target,
        batch_size: int,
        kwargs: dict[str, Any],
        device: torch.device,
    ) -> None:
        self.attribution = attribution
        self.dataset = dataset
        self.user_collate = collate
        self.target = target
        self.batch_size = batch_size
        self.kwargs = kwargs
        self.device = device
        self.parameters, _ = attribute_parameters(attribution)
        self.takes_target = "target" in self.parameters
        self.with_delta = bool(kwargs.get("return_convergence_delta", False))
        self.with_steps = bool(kwargs.get("return_n_steps", False))
        self.forward = forward_of(attribution)
        self.arguments = effective_arguments(self.parameters, kwargs)
        self.wrapper = len(list(wrapped_attributions(attribution))) > 1
        # Set from the store's metadata before any batch that counts is computed.
        self.item_format: ItemFormat | None = None
        self.fixed_kwargs: dict[str, Any] = {}
        # The first batch's results from the probe (rank 0, on a new store, which owns the
        # first unit): computed as every batch is, so they are stored rather than redone.
        self.probed: dict[str, Tensor] | None = None

    def identity(self, item_format: ItemFormat) -> dict[str, Any]:
        """What a resumed run must match, as JSON."""
        model = model_of(self.attribution)
        describe = Describer(model)
        return {
            "method": qualified_name(self.attribution),
            "attribution": describe.attribution(self.attribution),
            "model": None
            if model is None
            else {"class": qualified_name(model), "sha256": model_digest(model)},
            "arguments": describe(self.arguments),
            "target": describe(self.target),
            "batch_size": self.batch_size,
            "dataset": {
                "length": len(self.dataset),  # type: ignore[arg-type]
                "items": item_format.as_json(),
                "fingerprints": item_fingerprints(self.dataset),
            },
        }

    def _call_arguments(
        self, batch: Batch, fixed_kwargs: Mapping[str, Any]
    ) -> tuple[Any, dict[str, Any], ResolvedTarget]:
        """The batch's inputs on the device, attribute()'s keywords and the resolved target
        (run under the batch's seed, as the target may run the model)."""
        assert self.item_format is not None
        inputs = tuple(t.to(self.device, non_blocking=True) for t in batch.inputs)
        labels = batch.labels
        if isinstance(labels, Tensor):
            labels = labels.to(self.device, non_blocking=True)
        kwargs = {**self.kwargs, **fixed_kwargs}
        resolved = resolve_target(
            self.target,
            inputs,
            labels,
            is_tuple=self.item_format.is_tuple,
            forward=self.forward,
            additional_args=kwargs.get("additional_forward_args"),
        )
        if self.takes_target:
            kwargs["target"] = resolved.value
        return (inputs if self.item_format.is_tuple else inputs[0]), kwargs, resolved

    def compute(
        self, batch: Batch, fixed_kwargs: Mapping[str, Any]
    ) -> tuple[Any, dict[str, Tensor]]:
        """The batch's results as ``(structure of the attributions, columns by array name)``,
        each column with one row per example."""
        # The batch's first index seeds it: the same noise whichever process computes it.
        seed_generators(batch.first, self.device)
        inputs, kwargs, resolved = self._call_arguments(batch, fixed_kwargs)
        result = self.attribution.attribute(inputs, **kwargs)
        attributions, delta, extras = split_result(result, self.with_delta, self.with_steps)
        if delta is not None and self.wrapper:
            delta = self._delta_per_example(delta, len(batch))
        structure, leaves = flatten(attributions)
        columns = {f"attributions/{i}": leaf for i, leaf in enumerate(leaves)}
        named = {"delta": delta, "target": resolved.rows, "output": resolved.output}
        named.update({f"extras/{k}": v for k, v in extras.items()})
        for name, value in named.items():
            if value is None:
                continue
            if not isinstance(value, Tensor):
                raise TypeError(
                    f"attribute() returned {name} of type {type(value).__name__}: "
                    "attribute_dataset stores tensors with one row per example"
                )
            columns[name] = value
        last = batch.first + len(batch) - 1
        for name, column in columns.items():
            if column.dim() == 0 or column.shape[0] != len(batch):
                raise ValueError(
                    f"attribute() returned {name} of shape {list(column.shape)} for dataset "
                    f"items {batch.first}..{last}: attribute_dataset stores one row per example "
                    f"({len(batch)} here)"
                )
        return structure, columns

    def _delta_per_example(self, delta: Tensor, batch: int) -> Tensor:
        """NoiseTunnel's deltas (one per noisy copy, ``nt_samples * batch``, partition after
        partition of ``nt_samples_batch_size`` copies, each example's copies together, as
        captum orders them) as one row of ``nt_samples`` deltas per example."""
        samples = self.arguments.get("nt_samples")
        if not isinstance(samples, int) or delta.dim() != 1 or delta.numel() != batch * samples:
            return delta
        per_partition = self.arguments.get("nt_samples_batch_size") or samples
        partitions = [per_partition] * (samples // per_partition)
        partitions += [samples % per_partition] if samples % per_partition else []
        rows, start = [], 0
        for copies in partitions:
            rows.append(delta[start : start + batch * copies].reshape(batch, copies))
            start += batch * copies
        return torch.cat(rows, dim=1)

    def fixed_chunking(self, batch: Batch) -> int | None:
        """For methods that chunk the path: ``internal_batch_size`` for every batch of the job,
        unless the caller chose one. The engine sizes its chunks from free memory, which
        varies between runs, and measures the first chunk of a new shape in a chunk of its
        own; a chunk's size can change the last bits of the results. So the size is fixed
        once: what one step of this batch keeps for the backward (measured on a call of one
        step, one step per chunk), as many steps as the engine's memory budget holds."""
        if "internal_batch_size" not in self.parameters or "internal_batch_size" in self.kwargs:
            return None
        # The method that runs the path: a wrapper (NoiseTunnel) passes the argument on.
        path_method = list(wrapped_attributions(self.attribution))[-1]
        parameters, _ = attribute_parameters(path_method)
        one_step = {"n_steps": 1, "method": "gausslegendre", "internal_batch_size": len(batch)}
        meter = _SavedTensorMeter(model_state_tensors(model_of(self.attribution)))
        seed_generators(batch.first, self.device)
        inputs, kwargs, _ = self._call_arguments(batch, {})
        kwargs = {k: v for k, v in kwargs.items() if k in parameters}
        kwargs.update(one_step)
        for extra in ("return_convergence_delta", "return_n_steps"):
            if extra in kwargs:
                kwargs[extra] = False
        # (n_steps="auto"'s own arguments: the measuring call has one fixed step.)
        kwargs.pop("tolerance", None)
        kwargs.pop("max_steps", None)
        with meter.hooks():
            result = path_method.attribute(inputs, **kwargs)
        attributions, _, _ = split_result(result, False)
        _, leaves = flatten(attributions)
        # The path rows, their gradient and that gradient in the accumulator's layout.
        path_bytes = sum(leaf.numel() * leaf.element_size() for leaf in leaves)
        steps = chunk_budget(self.device) // max(1, meter.bytes + 3 * path_bytes)
        return max(1, steps) * len(batch)

    def probe(self, batch: Batch) -> tuple[Any, dict[str, Tensor], int | None, float]:
        """Run the first batch as the job will run every batch, to learn the results'
        shapes, the job's fixed chunking and how long a batch takes."""
        internal = self.fixed_chunking(batch)
        fixed = {} if internal is None else {"internal_batch_size": internal}
        started = time.perf_counter()
        structure, columns = self.compute(batch, fixed)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return structure, columns, internal, time.perf_counter() - started


def _results_metadata(structure: Any, columns: Mapping[str, Tensor]) -> dict[str, Any]:
    return {
        "structure": structure,
        "attributions": [n for n in columns if n.startswith("attributions/")],
        "delta": "delta" if "delta" in columns else None,
        "target": "target" if "target" in columns else None,
        "output": "output" if "output" in columns else None,
        "extras": {n.removeprefix("extras/"): n for n in columns if n.startswith("extras/")},
    }


def _versions(device: torch.device) -> dict[str, str]:
    from fastattr import __version__

    return {
        "fastattr": __version__,
        "torch": torch.__version__,
        "zarr": import_zarr().__version__,
        "python": platform.python_version(),
        "device_type": device.type,
    }


def _prepare(job: _Job, out: StoreLike, resume: bool, ranks: Ranks) -> _Plan:
    """Rank 0: check or create the store; list the units left to do."""
    zarr = import_zarr()
    length = len(job.dataset)  # type: ignore[arg-type]
    if length == 0:
        raise ValueError("data holds no examples")
    item_format = ItemFormat.of(job.dataset, job.dataset[0])
    job.item_format = item_format
    identity = job.identity(item_format)
    stored = read_metadata(out)
    if stored is not None and resume and not stored.get(CREATING):
        if stored.get("format") not in READABLE_FORMATS:
            raise ValueError(
                f"out ({os.fspath(out)}) holds a store of format {stored.get('format')}, this "
                f"fastattr writes format {FORMAT_VERSION}: pass resume=False to start over"
            )
        adopted = "fingerprints" not in stored["job"]["dataset"]
        if adopted:
            # A store from before items were fingerprinted takes this dataset's, trusted as it
            # was then, so that every rank and every later run is compared with them.
            stored["job"]["dataset"]["fingerprints"] = identity["dataset"]["fingerprints"]
        found = differences(stored["job"], identity)
        if found:
            raise ValueError(
                f"out ({os.fspath(out)}) holds a different job:{listed(found)}\nPass resume=False "
                "(CLI: --overwrite) to discard it and start over, or choose another out."
            )
        versions = _versions(job.device)
        changed = [k for k, v in stored["versions"].items() if versions.get(k) != v]
        if changed:
            warnings.warn(
                f"the store at {os.fspath(out)} was started with other "
                f"{', '.join(changed)} ({', '.join(str(stored['versions'][k]) for k in changed)}"
                f"): rows computed now may differ from earlier ones in the last bits",
                stacklevel=4,
            )
        group = zarr.open_group(out, mode="r+")
        _redo_units_lacking_chunks(group, stored, out)
        if adopted or stored["format"] != FORMAT_VERSION:
            # (After the units to redo are unmarked: a format 2 store's complete units have
            # every chunk file.)
            stored["format"] = FORMAT_VERSION
            group.attrs[METADATA_KEY] = stored
        metadata = stored
    else:
        first = Collate(item_format, job.user_collate)(
            IndexedItems(job.dataset, slices=job.user_collate is None).__getitems__(
                list(range(min(job.batch_size, length)))
            )
        )
        structure, columns, internal, seconds = job.probe(first)
        job.probed = columns
        specs = [
            ArraySpec(name, tuple(column.shape[1:]), _numpy_dtype(column.dtype))
            for name, column in columns.items()
        ]
        row_bytes = sum(s.row_bytes for s in specs)
        layout = Layout.choose(
            length, job.batch_size, row_bytes, seconds * job.batch_size / len(first)
        )
        metadata = {
            "format": FORMAT_VERSION,
            "job": identity,
            "results": _results_metadata(structure, columns),
            "arrays": [spec.as_json() for spec in specs],
            "layout": layout.as_json(),
            "internal_batch_size": internal,
            "seeds": "each batch runs with torch's generators seeded with its first index",
            "dataset_class": qualified_name(job.dataset),
            "versions": _versions(job.device),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "runs": [],
        }
        group = create_store(out, metadata, specs, layout, overwrite=stored is not None)
    FailureBoard(group, ranks).clear()
    remaining = np.flatnonzero(~completed_units(group)).tolist()
    return _Plan(metadata, remaining)


def _redo_units_lacking_chunks(group: Any, metadata: Mapping[str, Any], out: StoreLike) -> None:
    """Unmark the complete units that miss a chunk file, so that this run computes them again
    rather than leave their rows reading as the fill value. In a format 2 store that is damage
    (a file deleted, or not copied), and said; a format 1 store left out the chunks equal to
    the fill value, which are computed again (and written) without a word."""
    layout = Layout.from_json(metadata["layout"])
    names = [spec["name"] for spec in metadata["arrays"]]
    done = np.flatnonzero(completed_units(group)).tolist()
    lacking = units_lacking_chunks(group, names, layout, done)
    redo = sorted(set().union(*lacking.values()))
    if not redo:
        return
    if metadata["format"] >= 2:
        warnings.warn(
            f"the store at {os.fspath(out)} has examples {row_ranges(layout, redo)} marked "
            f"complete but chunk files of {', '.join(lacking)} missing (deleted, or not "
            "copied?): computing them again",
            stacklevel=5,
        )
    complete = group[COMPLETE]
    for unit in redo:
        complete[unit] = 0


def _check_same_job(job: _Job, plan: _Plan, ranks: Ranks) -> None:
    """Another rank's job is rank 0's (which rank 0 checked against the store)."""
    assert job.item_format is not None
    found = differences(plan.metadata["job"], job.identity(job.item_format), theirs="on rank 0")
    if found:
        raise ValueError(
            f"rank {ranks.rank} runs another job than rank 0 (every rank must run the same "
            f"model, dataset and arguments):{listed(found)}"
        )


class _HostRows:
    """A column on its way to the host: on a GPU a non-blocking copy into pinned memory, which
    the writer waits for, so the device is never synchronized for it."""

    def __init__(self, column: Tensor) -> None:
        if column.requires_grad:
            column = column.detach()
        if column.dtype == torch.bfloat16:
            column = column.to(_host_dtype(column.dtype))
        if column.device.type == "cpu":
            self.tensor, self.event = column, None
        else:
            self.tensor = torch.empty(column.shape, dtype=column.dtype, pin_memory=True)
            self.tensor.copy_(column, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()

    def numpy(self) -> np.ndarray:
        if self.event is not None:
            self.event.synchronize()
        return self.tensor.numpy()


class _Writer:
    """Writes whole units on a thread of its own behind a bounded queue, so the computing
    loop waits for the disk only when the disk falls behind by more than the queue. The loop
    hands over a unit at a time (its batches' results), so the two threads meet once per
    unit, not once per batch."""

    def __init__(self, unit_writer: UnitWriter, layout: Layout, specs: list[ArraySpec]) -> None:
        self.unit_writer = unit_writer
        self.layout = layout
        self.specs = specs
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=WRITE_QUEUE_UNITS)
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="fastattr-writer", daemon=True)
        self.thread.start()

    def _raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def put(self, unit: int, batches: list[dict[str, _HostRows]]) -> None:
        """Queue a whole unit: the results of its batches, in order."""
        while True:
            self._raise_error()
            try:
                self.queue.put((unit, batches), timeout=0.1)
                return
            except queue.Full:
                continue

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                item = self.queue.get()
                if item is None:
                    return
                unit, batches = item
                start, stop = self.layout.rows(unit)
                columns = {
                    spec.name: np.concatenate([b[spec.name].numpy() for b in batches])
                    for spec in self.specs
                }
                try:
                    self.unit_writer.write(unit, start, columns)
                except Exception as error:
                    raise StoreWriteError(
                        f"writing examples {start}..{stop - 1} into the store failed: "
                        f"{type(error).__name__}: {error}. The units already marked "
                        "complete are intact; run the same job again to resume."
                    ) from error
        except BaseException as error:
            self.error = error

    def close(self) -> None:
        """Write what is queued, then stop; raise the writer's error if it had one."""
        while self.thread.is_alive():
            self._raise_error()
            try:
                self.queue.put(None, timeout=0.1)
                break
            except queue.Full:
                continue
        self.thread.join()
        self._raise_error()

    def abort(self) -> None:
        """After a failure elsewhere: write the units already queued (at most the queue's
        few), unless writing is what failed; never raise."""
        if self.error is None:
            with contextlib.suppress(BaseException):
                self.close()
        self.stop.set()
        with contextlib.suppress(queue.Full):
            self.queue.put_nowait(None)
        self.thread.join(timeout=60)


class _Progress:
    """A tqdm bar where tqdm is installed, else a line every ten seconds, on stderr."""

    def __init__(self, total: int, enabled: bool, label: str) -> None:
        self.total, self.done, self.label = total, 0, label
        self.bar = None
        self.enabled = enabled
        self._next_line = time.monotonic() + 10
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, unit="ex", desc=label, dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, count: int) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
        elif self.enabled and time.monotonic() >= self._next_line:
            self._next_line = time.monotonic() + 10
            print(f"{self.label}: {self.done}/{self.total} examples", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextlib.contextmanager
def _reproducible_cudnn(device: torch.device) -> Iterator[None]:
    """cuDNN's deterministic algorithms, not benchmark-picked ones, for the job on a GPU (so a
    batch computes the same in every run); the caller's settings are restored after."""
    if device.type != "cuda":
        yield
        return
    cudnn = torch.backends.cudnn
    saved = cudnn.deterministic, cudnn.benchmark
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    finally:
        cudnn.deterministic, cudnn.benchmark = saved


def _batches(
    job: _Job, layout: Layout, units: list[int], settings: dict[str, Any]
) -> Iterator[Batch]:
    """The batches of ``units``, in order: through a DataLoader with workers, or, without
    workers, fetched and stacked here (a DataLoader would only add its own per-batch cost)."""
    assert job.item_format is not None
    items = IndexedItems(job.dataset, slices=job.user_collate is None)
    sampler = UnitBatches(layout, units)
    collate = Collate(job.item_format, job.user_collate)
    if settings["num_workers"] > 0:
        loader = DataLoader(
            items,
            batch_sampler=sampler,
            collate_fn=collate,
            # Its own generator for the workers' seeds: the caller's random state is left alone.
            generator=torch.Generator().manual_seed(0),
            **settings,
        )
        return iter(loader)
    pin = bool(settings.get("pin_memory"))
    return (
        batch.pin_memory() if pin else batch
        for batch in (collate(items.__getitems__(indices)) for indices in sampler)
    )


def _run_units(
    job: _Job,
    plan: _Plan,
    group: Any,
    board: FailureBoard,
    ranks: Ranks,
    settings: dict[str, Any],
    progress: bool,
) -> int:
    """Compute and write this rank's share of the remaining units; returns its example count."""
    layout = Layout.from_json(plan.metadata["layout"])
    specs = [ArraySpec.from_json(a) for a in plan.metadata["arrays"]]
    units = plan.remaining[ranks.rank :: ranks.world]
    if not units:
        return 0
    assert job.item_format is not None
    settings = {"num_workers": _default_workers(ranks, job.dataset, job.device), **settings}
    if job.device.type == "cuda":
        settings["pin_memory"] = True
    rows = sum(stop - start for start, stop in map(layout.rows, units))
    label = f"fastattr (rank 0 of {ranks.world})" if ranks.distributed else "fastattr"
    bar = _Progress(rows, progress and ranks.rank == 0, label)
    batches = _batches(job, layout, units, settings)  # workers start before the writer thread
    writer = _Writer(UnitWriter(group, specs), layout, specs)
    unit_batches: list[dict[str, _HostRows]] = []
    unit_rows = 0
    try:
        for batch in batches:
            board.check()
            if batch.first == 0 and job.probed is not None:
                columns, job.probed = job.probed, None
            else:
                _, columns = job.compute(batch, job.fixed_kwargs)
            for spec in specs:
                column = columns.get(spec.name)
                if column is None or tuple(column.shape[1:]) != spec.row_shape:
                    got = "nothing" if column is None else f"shape {list(column.shape)}"
                    raise ValueError(
                        f"attribute() returned {spec.name} of {got} for dataset items "
                        f"{batch.first}..{batch.first + len(batch) - 1}; the job's rows have "
                        f"shape {list(spec.row_shape)}"
                    )
            unit_batches.append({n: _HostRows(c) for n, c in columns.items()})
            unit_rows += len(batch)
            unit = batch.first // layout.rows_per_unit
            start, stop = layout.rows(unit)
            if unit_rows == stop - start:
                writer.put(unit, unit_batches)
                unit_batches, unit_rows = [], 0
            bar.update(len(batch))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
        del batches
    return rows


def attribute_dataset(
    attribution: Any,
    data: Dataset | DataLoader,
    out: StoreLike,
    *,
    target: Target = None,
    batch_size: int | None = None,
    resume: bool = True,
    progress: bool = True,
    **attribute_kwargs: Any,
) -> AttributionStore:
    """Attribute every example of a dataset and store the results, one row per example.

    The dataset is cut into batches of consecutive examples and the batches into units of
    work; each unit's results are written into a zarr store at ``out`` and then marked
    complete. Run again, the same call skips the complete units, so a job that was killed
    resumes where it stopped, and the finished store is the same bit for bit as one written
    without interruption (float32 on the same kind of device), whatever the number of
    processes: every batch is the same examples, computed with the same internal chunking and
    random seed in every run.

    When ``torch.distributed`` is initialized (e.g. under ``torchrun``), each rank takes its
    share of the units, computes them on its model's device and writes its own rows; rank 0
    checks or creates the store. A rank that fails stops the job on every rank with its error.

    Args:
        attribution: a fastattr attribution object (IntegratedGradients,
            LayerIntegratedGradients, NeuronIntegratedGradients, LRP, LayerLRP, NoiseTunnel).
            Inputs go to the device of its model.
        data: a map-style dataset, or a DataLoader over one (its workers, pinning and collate
            function are used; batches are always consecutive examples). An item is a tensor
            or a tuple of tensors (one per model input; a tuple of one tensor, as
            ``TensorDataset(x)`` gives, counts as that tensor); a dataset marked with
            [`fastattr.data.labeled`][fastattr.data.labeled] (or ``fastattr_labels = True``)
            has items ``(inputs, label)``. The dataset must give the same item for an index
            every time.
        out: the store's directory (created if missing).
        target: None, an int or a tuple of ints (the same output for every example),
            ``"label"`` (each example's label), ``"predicted"`` (the model's argmax on the
            inputs; the outputs are stored too), or a callable of the batch (the inputs, or
            ``(inputs, labels)`` for a labeled dataset) returning any target attribute()
            takes. Must be None for NeuronIntegratedGradients (use ``neuron_selector``).
        batch_size: examples per batch (default: the DataLoader's, else 32).
        resume: continue the job stored at ``out`` (an error if ``out`` holds a different
            job); False discards what ``out`` holds and starts over.
        progress: show a progress bar (rank 0).
        **attribute_kwargs: passed to ``attribution.attribute()`` for every batch (baselines,
            n_steps, method, return_convergence_delta, ...). Tensors among them are passed
            as they are to each batch, so they must not have one row per dataset example.

    Returns:
        The [`fastattr.AttributionStore`][fastattr.AttributionStore] at ``out``.

    Raises:
        ValueError: ``out`` holds a different job (the message lists the differences), a
            dataset item has the wrong shape (the message names its index), or the
            arguments can't serve a dataset job.
        StoreWriteError: the store could not be written (the rows already complete stay
            valid).
        JobFailed: another rank of a distributed job failed (the message is its error).
        ImportError: zarr 3 is missing (``pip install 'fastattr[data]'``).

    Examples:
        >>> import tempfile, torch
        >>> from torch import nn
        >>> import fastattr
        >>> from fastattr.data import labeled
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
        >>> data = labeled(torch.utils.data.TensorDataset(torch.randn(100, 8),
        ...                                               torch.randint(0, 3, (100,))))
        >>> store = fastattr.attribute_dataset(
        ...     fastattr.IntegratedGradients(model), data, tempfile.mkdtemp() + "/ig",
        ...     target="label", batch_size=16, n_steps=32, progress=False)
        >>> store.attributions[:5].shape, store.target[:5].tolist() == data[:5][1].tolist()
        ((5, 8), True)
    """
    zarr = import_zarr()
    dataset, settings, collate, loader_batch = _loader_settings(data)
    batch_size = batch_size if batch_size is not None else loader_batch or DEFAULT_BATCH_SIZE
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not hasattr(attribution, "attribute"):
        raise TypeError(
            f"attribution must be an attribution object with attribute(), got "
            f"{type(attribution).__name__}"
        )
    parameters, passes_on = attribute_parameters(attribution)
    for name in attribute_kwargs:
        if name in PER_BATCH_ARGUMENTS:
            raise TypeError(f"{name} is set per batch by attribute_dataset; don't pass it")
        if name not in parameters and not passes_on:
            raise TypeError(
                f"{name!r} is not an argument of {type(attribution).__name__}.attribute()"
            )
    ranks = current_ranks()
    job = _Job(
        attribution,
        dataset,
        collate,
        target,
        batch_size,
        dict(attribute_kwargs),
        _device_of(attribution, ranks),
    )
    check_target(target, has_labels(dataset), job.takes_target)
    if target == "predicted" and job.forward is None:
        raise ValueError("target='predicted' needs an attribution with a model to run")
    started = time.perf_counter()
    with _reproducible_cudnn(job.device), restored_generators(job.device):
        plan = from_rank0(ranks, lambda: _prepare(job, out, resume, ranks))
        job.item_format = ItemFormat.from_json(plan.metadata["job"]["dataset"]["items"])
        internal = plan.metadata["internal_batch_size"]
        job.fixed_kwargs = {} if internal is None else {"internal_batch_size": internal}
        group = zarr.open_group(out, mode="r+")
        board = FailureBoard(group, ranks)
        try:
            if ranks.rank != 0:
                _check_same_job(job, plan, ranks)
            computed = _run_units(job, plan, group, board, ranks, settings, progress)
            board.check(now=True)
            board.wait_for_all()
        except BaseException as error:
            board.post(error)
            raise
    if ranks.rank == 0:
        metadata = dict(group.attrs[METADATA_KEY])
        layout = Layout.from_json(metadata["layout"])
        metadata["runs"] = [
            *metadata.get("runs", []),
            {
                "processes": ranks.world,
                "device": str(job.device),
                "examples": sum(stop - start for start, stop in map(layout.rows, plan.remaining)),
                "examples_rank0": computed,
                "seconds": round(time.perf_counter() - started, 3),
                "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            },
        ]
        group.attrs[METADATA_KEY] = metadata
    return AttributionStore(zarr.open_group(out, mode="r"))
