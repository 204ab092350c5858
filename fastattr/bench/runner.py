"""Runs the benchmark cases: fastattr, Captum (when installed), the case's other contenders
and the floor, side by side.

For every case and batch size each implementation first runs once on its own (which checks it
works and gives the attributions to compare), then all that worked are timed together with
[fastattr.bench.timing.interleaved_times][]: medians, and ratios taken round by round with
their confidence intervals ([fastattr.bench.timing.paired_ratio][]). Running out of memory,
or any other failure, is recorded for that implementation and batch; the benchmark goes on.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import gc
import importlib
import json
import math
import os
import platform
import statistics
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Union

import torch
from torch import Tensor

import fastattr
from fastattr.bench import memory
from fastattr.bench.cases import BUILT_IN, Arguments, Case, load
from fastattr.bench.timing import interleaved_times, paired_ratio

__all__ = [
    "Config",
    "batch_arguments",
    "device_name",
    "failed_checks",
    "implementations",
    "relative_error",
    "run",
]

# fastattr's float32 attributions must agree this closely with the reference backend's and
# Captum's; a larger error is reported as a failed check.
TOLERANCE = 1e-4


@dataclass(frozen=True)
class Config:
    """What one run measures, and how.

    Attributes:
        device: Where everything runs.
        batch_sizes: The batch sizes, each case at each.
        n_steps: Integration steps of the path methods.
        cases: The cases, all from ``source``.
        warmup: Untimed rounds before the timed ones.
        repeats: Timed rounds; each time is their median.
        measure_memory: Measure peak memory (on the CPU in a worker process).
        progress: Show a progress bar (when tqdm is installed).
        source: Where the cases come from, as [fastattr.bench.cases.load][] takes it: the CPU
            memory worker, a fresh process, loads them from there.
    """

    device: torch.device
    batch_sizes: tuple[int, ...]
    n_steps: int
    cases: tuple[Case, ...]
    warmup: int
    repeats: int
    measure_memory: bool = True
    progress: bool = True
    source: str = BUILT_IN


def _import_captum() -> tuple[ModuleType | None, str | None]:
    """``captum.attr``, or why it cannot be used (not installed, or broken on this torch)."""
    try:
        return importlib.import_module("captum.attr"), None
    except ImportError:
        return None, "captum is not installed: no Captum column"
    except Exception as error:
        return (
            None,
            f"captum could not be imported ({type(error).__name__}: {error}): no Captum column",
        )


def _captum_attr() -> ModuleType | None:
    return _import_captum()[0]


def captum_version() -> str | None:
    """Captum's version, or None when it cannot be used."""
    if _captum_attr() is None:
        return None
    return importlib.import_module("captum").__version__


def _fastattr_class(method: str) -> type | None:
    return getattr(fastattr, method, None)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation failure, on either device."""
    if isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    # Allocation failures inside the CPU allocator and cuBLAS arrive as RuntimeErrors.
    text = str(error)
    return isinstance(error, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _failure(error: BaseException) -> dict[str, Any]:
    _release_memory()
    if is_out_of_memory(error):
        return {"status": "oom"}
    return {"status": "error", "message": f"{type(error).__name__}: {error}"[:300]}


# A contender set up for a case: one batch's arguments -> the call to time.
Prepare = Callable[[Arguments], Callable[[], Any]]
# A contender that cannot run at all is its failure record instead.
Contender = Union[Prepare, dict[str, Any]]


def _attributor_call(attributor: Any, quiet: bool) -> Prepare:
    def prepare(arguments: Arguments) -> Callable[[], Any]:
        def call() -> Any:
            if not quiet:
                return attributor.attribute(**arguments)
            # Captum warns on every call that it set requires_grad on the inputs.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return attributor.attribute(**arguments)

        return call

    return prepare


def _on_own_copy(contender: Callable[..., Callable[[], Any]], model: torch.nn.Module) -> Prepare:
    return lambda arguments: contender(model, arguments)


def implementations(case: Case, device: torch.device) -> dict[str, Contender]:
    """Each contender of ``case``, set up on its own copy of the model.

    Args:
        case: The case.
        device: Where its model runs.

    Returns:
        By name (fastattr, Captum when installed, the case's others, the floor): a function
        from a batch's arguments to the call to time, or the failure record of a contender
        that cannot be set up. Empty when fastattr has no such method.
    """
    if _fastattr_class(case.method) is None:
        return {}
    model = case.make_model().to(device)
    contenders: dict[str, Contender] = {}
    libraries = {"fastattr": fastattr, "captum": _captum_attr()}
    for name, library in libraries.items():
        if library is None:
            continue
        try:
            attributor = case.build(library, copy.deepcopy(model))
            contenders[name] = _attributor_call(attributor, quiet=name != "fastattr")
        except Exception as error:
            contenders[name] = _failure(error)
    for name, other in case.others.items():
        contenders[name] = _on_own_copy(other, copy.deepcopy(model))
    contenders["floor"] = _on_own_copy(case.floor, copy.deepcopy(model))
    return contenders


def _flat(result: Any) -> Tensor:
    tensors = result if isinstance(result, (tuple, list)) else (result,)
    return torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])


def relative_error(result: Any, reference: Any) -> float:
    """``max |result - reference| / max |reference|`` (the absolute error if the reference is 0).

    Args:
        result: A tensor or a tuple of tensors.
        reference: The same structure; a different number of elements gives ``inf``.
    """
    got, want = _flat(result), _flat(reference)
    if got.shape != want.shape:
        return math.inf
    if got.numel() == 0:
        return 0.0
    scale = want.abs().max().item()
    error = (got - want).abs().max().item()
    return error / scale if scale > 0 else error


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """TF32 off for cuBLAS and cuDNN while the attributions to compare are computed: with it
    (cuDNN's default on Ampere and later), float32 products keep 10 mantissa bits, and two
    batchings of the same work differ by far more than the check's tolerance. Timings run
    under the caller's settings."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = matmul.allow_tf32, cudnn.allow_tf32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # newer torch prefers its fp32_precision settings
        matmul.allow_tf32 = cudnn.allow_tf32 = False
        try:
            yield
        finally:
            matmul.allow_tf32, cudnn.allow_tf32 = saved


def _converted(value: Any, **to: Any) -> Any:
    """``value`` with its tensors (inside tuples too) moved or cast by ``Tensor.to(**to)``;
    ``dtype`` casts floating tensors only."""
    if isinstance(value, tuple):
        return tuple(_converted(item, **to) for item in value)
    if not isinstance(value, Tensor):
        return value
    if "dtype" in to and not value.is_floating_point():
        return value
    return value.to(**to)


def _float64_attributions(case: Case, arguments: Arguments) -> Any:
    """fastattr's attributions of the case's model and batch, computed in float64."""
    device = arguments["inputs"].device
    model = case.make_model().to(device=device, dtype=torch.float64)
    attributor = case.build(fastattr, model)
    in_float64 = {key: _converted(value, dtype=torch.float64) for key, value in arguments.items()}
    return attributor.attribute(**in_float64)


def batch_arguments(case: Case, batch: int, n_steps: int, device: torch.device) -> Arguments:
    """The case's ``attribute()`` arguments for one batch, seeded by its size.

    Args:
        case: The case.
        batch: The batch size.
        n_steps: Integration steps (for path methods, unless the case fixes them).
        device: Where the tensors go.
    """
    generator = torch.Generator().manual_seed(batch)
    made = case.make_batch(batch, generator)
    on_device = {key: _converted(value, device=device) for key, value in made.items()}
    return case.arguments(on_device, n_steps)


class _Guarded:
    """A timed call that records its failure (running out of memory, mostly) instead of raising,
    and is not run again after it."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self.call = call
        self.failure: dict[str, Any] | None = None

    def __call__(self) -> None:
        if self.failure is not None:
            return
        try:
            self.call()
        except Exception as error:
            self.failure = _failure(error)


def _compared(records: Mapping[str, Any]) -> list[str]:
    """The contenders whose results are compared with fastattr's: all but fastattr and floor."""
    return [name for name in records if name not in ("fastattr", "floor")]


def _check(
    case: Case,
    arguments: Arguments,
    outputs: dict[str, Any],
    records: dict[str, dict[str, Any]],
    fastattr_call: Callable[[], Any],
) -> None:
    """fastattr's errors against its reference backend and each compared contender."""
    fast = records["fastattr"]
    try:
        with fastattr.use_backend("reference"), full_float32():
            reference = fastattr_call()
        fast["rel_err_reference"] = relative_error(outputs["fastattr"], reference)
    except Exception as error:
        fast["reference_error"] = f"{type(error).__name__}: {error}"[:300]
    exact = None
    for name in _compared(outputs):
        error = fast[f"rel_err_{name}"] = relative_error(outputs["fastattr"], outputs[name])
        if not error <= TOLERANCE:
            # More apart than float32 rounding: float64 tells which is off (a deep model can
            # amplify rounding past the tolerance in both).
            if exact is None:
                exact = _float64_attributions(case, arguments)
                fast["rel_err_float64"] = relative_error(outputs["fastattr"], exact)
            records[name]["rel_err_float64"] = relative_error(outputs[name], exact)


def _measure_batch(
    case: Case,
    contenders: dict[str, Contender],
    batch: int,
    config: Config,
) -> dict[str, Any]:
    device = config.device
    arguments = batch_arguments(case, batch, config.n_steps, device)
    records: dict[str, dict[str, Any]] = {}
    calls: dict[str, Callable[[], Any]] = {}
    outputs: dict[str, Any] = {}
    for name, contender in contenders.items():
        if isinstance(contender, dict):
            records[name] = dict(contender)
            continue
        try:
            call = contender(arguments)
            with full_float32():
                outputs[name] = call()
            record: dict[str, Any] = {"status": "ok"}
            if device.type == "cuda" and config.measure_memory:
                record["peak_bytes"] = memory.peak_bytes(call, device)
        except Exception as error:
            outputs.pop(name, None)
            records[name] = _failure(error)
            continue
        records[name] = record
        calls[name] = call
    outputs.pop("floor", None)
    if "fastattr" in outputs:
        _check(case, arguments, outputs, records, calls["fastattr"])
    outputs.clear()

    guarded = {name: _Guarded(call) for name, call in calls.items()}
    times = interleaved_times(guarded, device=device, warmup=config.warmup, repeats=config.repeats)
    for name, guard in guarded.items():
        if guard.failure is not None:
            records[name] = guard.failure
        else:
            records[name]["seconds"] = statistics.median(times[name])
            records[name]["examples_per_s"] = batch / records[name]["seconds"]
    _release_memory()

    timed = [name for name in times if "seconds" in records[name]]
    for name in timed:
        record = records[name]
        # Ratios round by round (see paired_ratio), each with its confidence interval.
        for other in _compared(records):
            if other in timed and other != name:
                ratio, interval = paired_ratio(times[other], times[name])
                record[f"speedup_vs_{other}"] = ratio
                record[f"speedup_vs_{other}_interval"] = interval
        if "floor" in timed:
            ratio, interval = paired_ratio(times[name], times["floor"])
            record["time_over_floor"] = ratio
            record["time_over_floor_interval"] = interval
    return {
        "case": case.name,
        "method": case.method,
        "model": case.model,
        "batch": batch,
        "n_steps": config.n_steps if case.uses_path else None,
        "implementations": records,
    }


def memory_worker(request: dict[str, Any]) -> dict[str, Any]:
    """Peak bytes of every contender on every case and batch of ``request`` (see ``run``)."""
    device = torch.device(request["device"])
    cases = {case.name: case for case in load(request["source"])}
    peaks: dict[str, dict[str, dict[str, Any]]] = {}
    for case_name in request["cases"]:
        case = cases[case_name]
        contenders = implementations(case, device)
        peaks[case_name] = {}
        for batch in request["batch_sizes"]:
            arguments = batch_arguments(case, batch, request["n_steps"], device)
            per_batch: dict[str, Any] = {}
            for name, contender in contenders.items():
                if isinstance(contender, dict):
                    continue
                try:
                    call = contender(arguments)
                    call()  # first call: lazy set-up, hooks, caches
                    per_batch[name] = memory.peak_bytes(call, device)
                except Exception as error:
                    per_batch[name] = _failure(error)["status"]
            peaks[case_name][str(batch)] = per_batch
    return peaks


def _cpu_peaks(config: Config, cases: list[Case], notes: list[str]) -> dict[str, Any]:
    if not memory.cpu_measurement_supported():
        notes.append("peak memory not measured: needs Linux's /proc/self/clear_refs")
        return {}
    request = {
        "device": "cpu",
        "source": config.source,
        "cases": [case.name for case in cases],
        "batch_sizes": list(config.batch_sizes),
        "n_steps": config.n_steps,
        "threads": torch.get_num_threads(),
    }
    try:
        return memory.measure_in_worker(request)
    except Exception as error:
        notes.append(f"peak memory not measured: {error}")
        return {}


def _progress(total: int, enabled: bool) -> Any:
    if enabled:
        try:
            from tqdm import tqdm

            return tqdm(total=total, desc="fastattr bench", unit="run", file=sys.stderr)
        except ImportError:
            pass
    return None


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model and core count, for the reports.

    Args:
        device: A CPU or CUDA device.
    """
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    processor = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            processor = next(
                line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    return f"{processor}, {os.cpu_count()} CPU cores"


def run(config: Config) -> dict[str, Any]:
    """Measures every case of ``config`` at every batch size.

    Args:
        config: What to measure.

    Returns:
        The report ``fastattr bench`` saves as ``bench.json``: ``meta`` (machine, versions,
        settings), ``notes`` and ``results``, one per case and batch, each with a record per
        contender (``status``, ``seconds``, ``examples_per_s``, ``peak_bytes``,
        ``speedup_vs_<name>``, ``time_over_floor``, and on fastattr's ``rel_err_<name>``).
    """
    notes: list[str] = []
    if fastattr.current_backend() != "compiled":
        notes.append(
            "fastattr runs on its reference kernels (fastattr._C not built, or "
            "FASTATTR_BACKEND=reference): its times are not the compiled ones"
        )
    captum_problem = _import_captum()[1]
    if captum_problem:
        notes.append(captum_problem)
    runnable: list[Case] = []
    for case in config.cases:
        if _fastattr_class(case.method) is None:
            note = f"skipped {case.method}: fastattr.{case.method} does not exist yet"
            if note not in notes:
                notes.append(note)
        else:
            runnable.append(case)

    results: list[dict[str, Any]] = []
    bar = _progress(len(runnable) * len(config.batch_sizes), config.progress)
    try:
        for case in runnable:
            contenders = implementations(case, config.device)
            for batch in config.batch_sizes:
                if bar is not None:
                    bar.set_postfix_str(f"{case.name} batch {batch}")
                results.append(_measure_batch(case, contenders, batch, config))
                if bar is not None:
                    bar.update()
            del contenders
            _release_memory()
    finally:
        if bar is not None:
            bar.close()

    failed = {}
    for result in results:
        for name, record in result["implementations"].items():
            if record["status"] == "error":
                failed.setdefault((name, result["case"]), record["message"])
    notes += [f"{name} failed on {case}: {message}" for (name, case), message in failed.items()]
    notes += float32_notes(results)

    memory_method = None
    if config.measure_memory and runnable:
        if config.device.type == "cuda":
            memory_method = memory.CUDA_METHOD
        else:
            print("measuring peak memory in a worker process ...", file=sys.stderr)
            peaks = _cpu_peaks(config, runnable, notes)
            if peaks:
                memory_method = memory.CPU_METHOD
            for result in results:
                by_impl = peaks.get(result["case"], {}).get(str(result["batch"]), {})
                for name, record in result["implementations"].items():
                    if isinstance(by_impl.get(name), int) and record["status"] == "ok":
                        record["peak_bytes"] = by_impl[name]

    return {
        "meta": {
            "device": config.device.type,
            "device_name": device_name(config.device),
            "torch_version": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "captum_version": captum_version(),
            "fastattr_version": fastattr.__version__,
            "build": fastattr.build_info(),
            "python_version": platform.python_version(),
            "batch_sizes": list(config.batch_sizes),
            "n_steps": config.n_steps,
            "cases": config.source,
            "warmup": config.warmup,
            "repeats": config.repeats,
            "timing": (
                "median of interleaved repeats after warm-ups"
                + (", CUDA-synchronized" if config.device.type == "cuda" else "")
                + "; ratios: median of per-round ratios, 95% interval"
            ),
            "memory_method": memory_method,
            "tolerance": TOLERANCE,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
        "notes": notes,
        "results": results,
    }


def _as_close_to_float64(fast: dict[str, Any], other: dict[str, Any]) -> bool:
    """Whether fastattr, though apart from the other contender, is no further from the
    float64 result."""
    ours, theirs = fast.get("rel_err_float64"), other.get("rel_err_float64")
    return ours is not None and theirs is not None and ours <= theirs + TOLERANCE


def float32_notes(results: list[dict[str, Any]]) -> list[str]:
    """A line for each batch where fastattr and another contender differ by more than the
    tolerance while fastattr is no further from float64: rounding the model amplifies when
    both are as far, the other contender's error when it is the further."""
    notes = []
    for result in results:
        impls = result["implementations"]
        fast = impls.get("fastattr", {})
        for name in _compared(impls):
            other = impls[name]
            apart = fast.get(f"rel_err_{name}", 0)
            if not (apart > TOLERANCE and _as_close_to_float64(fast, other)):
                continue
            ours, theirs = fast["rel_err_float64"], other["rel_err_float64"]
            where = f"{result['case']} batch {result['batch']}: fastattr and {name} differ by"
            distances = f"(fastattr {ours:.1e}, {name} {theirs:.1e})"
            if theirs > ours + TOLERANCE:
                notes.append(f"{where} {apart:.1e}; {name} is the further from float64 {distances}")
            else:
                notes.append(
                    f"{where} {apart:.1e}, and each is as far from float64 {distances}: float32 "
                    "rounding that this model amplifies"
                )
    return notes


def failed_checks(report: dict[str, Any]) -> list[str]:
    """fastattr results that errored or disagree with the reference backend or another
    contender (unless float64 showed the other contender to be no closer).

    Args:
        report: A report of [fastattr.bench.runner.run][].

    Returns:
        One line per problem; empty when every check passed.
    """
    problems = []
    for result in report["results"]:
        impls = result["implementations"]
        fast = impls.get("fastattr")
        if fast is None:
            continue
        where = f"{result['case']} batch {result['batch']}"
        if fast["status"] == "error":
            problems.append(f"{where}: fastattr failed: {fast.get('message')}")
        if "reference_error" in fast:
            problems.append(f"{where}: reference backend failed: {fast['reference_error']}")
        for key, error in fast.items():
            if not key.startswith("rel_err_") or key == "rel_err_float64" or error <= TOLERANCE:
                continue
            name = key[len("rel_err_") :]
            if name != "reference" and _as_close_to_float64(fast, impls.get(name, {})):
                continue
            problems.append(f"{where}: {key} = {error:.3g} > {TOLERANCE:g}")
    return problems


def _main_memory_worker(lines: Iterable[str]) -> None:
    request = json.loads("".join(lines))
    torch.set_num_threads(request["threads"])
    print(json.dumps(memory_worker(request)))


if __name__ == "__main__" and sys.argv[1:] == ["--memory-worker"]:
    _main_memory_worker(sys.stdin)
