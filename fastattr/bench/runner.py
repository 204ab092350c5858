"""Runs the benchmark cases: fastattr, Captum (when installed) and the floor, side by side.

For every case and batch size each implementation first runs once on its own (which checks it
works and gives the attributions to compare), then all that worked are timed together with
:func:`fastattr.bench.timing.interleaved_medians`. Running out of memory, or any other
failure, is recorded for that implementation and batch; the benchmark goes on.
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
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Union

import torch
from torch import Tensor

import fastattr
from fastattr.bench import memory
from fastattr.bench.cases import Case, select
from fastattr.bench.timing import interleaved_medians

IMPLEMENTATIONS = ("fastattr", "captum", "floor")
# fastattr's float32 attributions must agree this closely with the reference backend's and
# Captum's; a larger error is reported as a failed check.
TOLERANCE = 1e-4


@dataclass(frozen=True)
class Config:
    device: torch.device
    batch_sizes: tuple[int, ...]
    n_steps: int
    cases: tuple[Case, ...]
    warmup: int
    repeats: int
    measure_memory: bool = True
    progress: bool = True


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
    if _captum_attr() is None:
        return None
    return importlib.import_module("captum").__version__


def _fastattr_class(method: str) -> type | None:
    return getattr(fastattr, method, None)


def is_out_of_memory(error: BaseException) -> bool:
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


# How a contender makes its call on a batch: (inputs, baselines, n_steps) -> the timed call.
Prepare = Callable[[Tensor, Tensor, int], Callable[[], Any]]
# A contender that cannot run at all is its failure record instead.
Contender = Union[Prepare, dict[str, Any]]


def _attributor_call(case: Case, attributor: Any, quiet: bool) -> Prepare:
    def prepare(inputs: Tensor, baselines: Tensor, n_steps: int) -> Callable[[], Any]:
        def call() -> Any:
            if not quiet:
                return case.attribute(attributor, inputs, baselines, n_steps)
            # Captum warns on every call that it set requires_grad on the inputs.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return case.attribute(attributor, inputs, baselines, n_steps)

        return call

    return prepare


def implementations(case: Case, device: torch.device) -> dict[str, Contender]:
    """Each contender of ``case``, each on its own copy of the model, or why it cannot run."""
    model = case.make_model().to(device)
    contenders: dict[str, Contender] = {}
    fast_cls = _fastattr_class(case.method)
    if fast_cls is None:
        return {}
    try:
        contenders["fastattr"] = _attributor_call(
            case, case.construct(fast_cls, copy.deepcopy(model)), quiet=False
        )
    except Exception as error:
        contenders["fastattr"] = _failure(error)
    captum_attr = _captum_attr()
    if captum_attr is not None:
        try:
            captum_cls = getattr(captum_attr, case.method)
            contenders["captum"] = _attributor_call(
                case, case.construct(captum_cls, copy.deepcopy(model)), quiet=True
            )
        except Exception as error:
            contenders["captum"] = _failure(error)
    floor_model = copy.deepcopy(model)
    contenders["floor"] = lambda inputs, baselines, n_steps: case.floor(
        floor_model, inputs, baselines, n_steps
    )
    return contenders


def _flat(result: Any) -> Tensor:
    tensors = result if isinstance(result, (tuple, list)) else (result,)
    return torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])


def relative_error(result: Any, reference: Any) -> float:
    """``max |result - reference| / max |reference|`` (the absolute error if the reference is 0)."""
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


def _float64_attributions(case: Case, inputs: Tensor, baselines: Tensor, n_steps: int) -> Any:
    """fastattr's attributions of the case's model and batch, computed in float64."""
    model = case.make_model().to(device=inputs.device, dtype=torch.float64)
    attributor = case.construct(_fastattr_class(case.method), model)
    floating = inputs.is_floating_point()
    return case.attribute(
        attributor,
        inputs.double() if floating else inputs,
        baselines.double() if floating else baselines,
        n_steps,
    )


def _batch(case: Case, batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(batch)
    inputs, baselines = case.make_batch(batch, generator)
    return inputs.to(device), baselines.to(device)


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


def _measure_batch(
    case: Case,
    contenders: dict[str, Contender],
    batch: int,
    config: Config,
) -> dict[str, Any]:
    device = config.device
    inputs, baselines = _batch(case, batch, device)
    records: dict[str, dict[str, Any]] = {}
    calls: dict[str, Callable[[], Any]] = {}
    outputs: dict[str, Any] = {}
    for name, contender in contenders.items():
        if isinstance(contender, dict):
            records[name] = dict(contender)
            continue
        try:
            call = contender(inputs, baselines, config.n_steps)
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
    if "fastattr" in outputs:
        fast = records["fastattr"]
        try:
            with fastattr.use_backend("reference"), full_float32():
                reference = calls["fastattr"]()
            fast["rel_err_reference"] = relative_error(outputs["fastattr"], reference)
        except Exception as error:
            fast["reference_error"] = f"{type(error).__name__}: {error}"[:300]
        if "captum" in outputs:
            fast["rel_err_captum"] = relative_error(outputs["fastattr"], outputs["captum"])
            if not fast["rel_err_captum"] <= TOLERANCE:
                # More apart than float32 rounding: float64 tells which is off (a deep model
                # can amplify rounding past the tolerance in both).
                exact = _float64_attributions(case, inputs, baselines, config.n_steps)
                fast["rel_err_float64"] = relative_error(outputs["fastattr"], exact)
                records["captum"]["rel_err_float64"] = relative_error(outputs["captum"], exact)
    outputs.clear()

    guarded = {name: _Guarded(call) for name, call in calls.items()}
    if guarded:
        medians = interleaved_medians(
            guarded, device=device, warmup=config.warmup, repeats=config.repeats
        )
        for name, guard in guarded.items():
            if guard.failure is not None:
                records[name] = guard.failure
            else:
                records[name]["seconds"] = medians[name]
                records[name]["examples_per_s"] = batch / medians[name]
    _release_memory()

    floor_s = records.get("floor", {}).get("seconds")
    captum_s = records.get("captum", {}).get("seconds")
    for record in records.values():
        seconds = record.get("seconds")
        if seconds:
            if captum_s:
                record["speedup_vs_captum"] = captum_s / seconds
            if floor_s:
                record["time_over_floor"] = seconds / floor_s
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
    cases = {case.name: case for case in select()}
    peaks: dict[str, dict[str, dict[str, Any]]] = {}
    for case_name in request["cases"]:
        case = cases[case_name]
        contenders = implementations(case, device)
        peaks[case_name] = {}
        for batch in request["batch_sizes"]:
            inputs, baselines = _batch(case, batch, device)
            per_batch: dict[str, Any] = {}
            for name, contender in contenders.items():
                if isinstance(contender, dict):
                    continue
                try:
                    call = contender(inputs, baselines, request["n_steps"])
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


def script_device(name: str, error: Callable[[str], Any]) -> tuple[torch.device, str]:
    """The benchmark scripts' ``--device``: the device, and the machine line of their reports
    (with the torch thread count on a CPU); ``error`` (argparse's) when CUDA is asked for and
    there is none."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        error("--device cuda needs a CUDA GPU")
    machine = device_name(device)
    if device.type == "cpu":
        machine += f", {torch.get_num_threads()} threads"
    return device, machine


def run(config: Config) -> dict[str, Any]:
    """Measures every case of ``config``; returns the report that ``report`` prints and saves."""
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
            "warmup": config.warmup,
            "repeats": config.repeats,
            "timing": (
                "median of interleaved repeats after warm-ups"
                + (", CUDA-synchronized" if config.device.type == "cuda" else "")
            ),
            "memory_method": memory_method,
            "tolerance": TOLERANCE,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
        "notes": notes,
        "results": results,
    }


def _as_close_to_float64(fast: dict[str, Any], captum: dict[str, Any]) -> bool:
    """Whether fastattr, though apart from Captum, is no further from the float64 result."""
    ours, theirs = fast.get("rel_err_float64"), captum.get("rel_err_float64")
    return ours is not None and theirs is not None and ours <= theirs + TOLERANCE


def float32_notes(results: list[dict[str, Any]]) -> list[str]:
    """A line for each batch where fastattr and Captum differ by more than the tolerance yet
    are equally close to float64: rounding the model amplifies, not a wrong result."""
    notes = []
    for result in results:
        fast = result["implementations"].get("fastattr", {})
        captum = result["implementations"].get("captum", {})
        if fast.get("rel_err_captum", 0) > TOLERANCE and _as_close_to_float64(fast, captum):
            notes.append(
                f"{result['case']} batch {result['batch']}: fastattr and Captum differ by "
                f"{fast['rel_err_captum']:.1e}, and each is as far from float64 (fastattr "
                f"{fast['rel_err_float64']:.1e}, Captum {captum['rel_err_float64']:.1e}): float32 "
                "rounding that this model amplifies"
            )
    return notes


def failed_checks(report: dict[str, Any]) -> list[str]:
    """fastattr results that errored or disagree with the reference backend or Captum."""
    problems = []
    for result in report["results"]:
        fast = result["implementations"].get("fastattr")
        if fast is None:
            continue
        where = f"{result['case']} batch {result['batch']}"
        if fast["status"] == "error":
            problems.append(f"{where}: fastattr failed: {fast.get('message')}")
        if "reference_error" in fast:
            problems.append(f"{where}: reference backend failed: {fast['reference_error']}")
        for key in ("rel_err_reference", "rel_err_captum"):
            error = fast.get(key)
            if error is None or error <= TOLERANCE:
                continue
            captum = result["implementations"].get("captum", {})
            if key == "rel_err_captum" and _as_close_to_float64(fast, captum):
                continue
            problems.append(f"{where}: {key} = {error:.3g} > {TOLERANCE:g}")
    return problems


def _main_memory_worker(lines: Iterable[str]) -> None:
    request = json.loads("".join(lines))
    torch.set_num_threads(request["threads"])
    print(json.dumps(memory_worker(request)))


if __name__ == "__main__" and sys.argv[1:] == ["--memory-worker"]:
    _main_memory_worker(sys.stdin)
