"""IntegratedGradients: fastattr against captum and the floor, the issue's figures in one run.

    python benchmarks/bench_ig.py                 # CPU: MLP and CNN times, peak memory
    python benchmarks/bench_ig.py --device cuda   # the same on a GPU, plus captum's OOM batch

Times are medians of interleaved rounds (fastattr.bench.timing.interleaved_medians): every
round runs the floor, fastattr and captum once each, in a rotating order, after warm-ups.
The floor is the model's own work: its forward over the prebuilt expanded path (n_steps * B
rows, requires_grad) and one ``torch.autograd.grad`` of the summed target outputs with respect
to the path.

Peak memory runs each implementation in a fresh process. CPU: ``ru_maxrss`` after the call
minus ``ru_maxrss`` after imports, model and input set-up and a warm-up forward on a small
batch (cross-checked by sampling the anonymous resident size every millisecond, which the
libraries' file-backed pages cannot disturb). CUDA: ``torch.cuda.max_memory_allocated`` during
the call minus what was allocated before it.

``--threads 1`` times with one torch thread: on a CPU shared with other work, two-thread
parallel regions stall whenever a thread is descheduled, which swamps the ratios.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

import fastattr
from fastattr.bench import models
from fastattr.bench.runner import script_device
from fastattr.bench.timing import interleaved_medians

N_STEPS = 50
MLP_BATCH = 256
CNN_BATCH = 32
MEMORY_SHAPE = (3, 64, 64)
MEMORY_BATCH = 64
# Targets of the issue.
TARGETS = {
    "fastattr/floor": ("<=", 1.10),
    "captum/fastattr (MLP)": (">=", 2.0),
    "captum/fastattr (CNN)": (">=", 1.0),
    "fastattr/captum peak memory": ("<=", 0.4),
}


class ImageCNN(nn.Module):
    """A small CNN for any image size: two conv + ReLU + max-pool stages, a global average
    pool and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, models.NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.fc(torch.flatten(self.gap(x), 1))


def image_cnn(device: torch.device) -> nn.Module:
    torch.manual_seed(4)
    return ImageCNN().eval().to(device)


def make_inputs(
    shape: tuple[int, ...], batch: int, device: torch.device, seed: int = 0
) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batch, *shape, generator=generator).to(device)
    target = torch.randint(0, models.NUM_CLASSES, (batch,), generator=generator).to(device)
    return inputs, target


def floor_fn(model: nn.Module, inputs: Tensor, target: Tensor) -> Callable[[], Any]:
    """The model's forward over the prebuilt path and one gradient of the target outputs."""
    alphas = torch.linspace(0, 1, N_STEPS, device=inputs.device, dtype=inputs.dtype)
    path = (alphas.view(-1, *([1] * inputs.dim())) * inputs).reshape(-1, *inputs.shape[1:])
    path = path.detach().requires_grad_(True)
    rows = target.repeat(N_STEPS).view(-1, 1)

    def run() -> Any:
        return torch.autograd.grad(model(path).gather(1, rows).sum(), path)

    return run


def attribute_fn(
    library: str, model: nn.Module, inputs: Tensor, target: Tensor, **kwargs: Any
) -> Callable[[], Any]:
    if library == "fastattr":
        explainer = fastattr.IntegratedGradients(model)
    else:
        import captum.attr

        explainer = captum.attr.IntegratedGradients(model)

    def run() -> Any:
        return explainer.attribute(inputs, target=target, n_steps=N_STEPS, **kwargs)

    return run


def time_case(
    label: str,
    model: nn.Module,
    inputs: Tensor,
    target: Tensor,
    device: torch.device,
    warmup: int,
    repeats: int,
) -> dict[str, Any]:
    candidates = {
        "floor": floor_fn(model, inputs, target),
        "fastattr": attribute_fn("fastattr", model, inputs, target),
        "captum": attribute_fn("captum", model, inputs, target),
    }
    # Same numbers first (float32: a loose check that both computed the same thing). On a GPU
    # with TF32 convolutions or matmuls (cuDNN's default), products keep 10 mantissa bits and
    # the two libraries' different batchings round differently.
    ours, theirs = candidates["fastattr"](), candidates["captum"]()
    relative_error = float((ours - theirs).abs().max() / theirs.abs().max())
    tf32 = device.type == "cuda" and (
        torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32
    )
    if not relative_error <= (1e-2 if tf32 else 1e-4):
        raise RuntimeError(f"{label}: fastattr differs from captum by {relative_error:.3g}")
    del ours, theirs
    medians = interleaved_medians(candidates, device=device, warmup=warmup, repeats=repeats)
    return {
        "case": label,
        "rows": inputs.shape[0] * N_STEPS,
        **{f"{name}_s": seconds for name, seconds in medians.items()},
        "fastattr/floor": medians["fastattr"] / medians["floor"],
        "captum/floor": medians["captum"] / medians["floor"],
        "captum/fastattr": medians["captum"] / medians["fastattr"],
        "max |fastattr - captum| / max |captum|": relative_error,
    }


# ----------------------------------------------------------------------------- memory


def memory_worker(
    library: str, device_name: str, batch: int, fresh_process: bool = True
) -> dict[str, Any]:
    """Runs in a fresh process: set up, warm up, then one attribution, measured.
    (``fresh_process=False`` skips the check that the process's peak is its own.)"""
    device = torch.device(device_name)
    model = image_cnn(device)
    inputs, target = make_inputs(MEMORY_SHAPE, batch, device)
    run = attribute_fn(library, model, inputs, target)
    with torch.no_grad():
        model(inputs[:2])
    gc.collect()
    result: dict[str, Any] = {"library": library, "batch": batch}
    # How the library split the path: rows of each forward call.
    forward_rows: list[int] = []
    model.register_forward_pre_hook(lambda _module, args: forward_rows.append(args[0].shape[0]))
    result["forward_rows"] = forward_rows
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        try:
            out = run()
            torch.cuda.synchronize(device)
        except (torch.cuda.OutOfMemoryError, RuntimeError) as error:
            # cuBLAS and cuDNN report failed allocations as RuntimeErrors.
            text = str(error)
            if not isinstance(error, torch.cuda.OutOfMemoryError) and not (
                "out of memory" in text or "ALLOC_FAILED" in text
            ):
                raise
            result["oom"] = True
            return result
        result["peak_bytes"] = torch.cuda.max_memory_allocated(device) - before
    else:
        # ru_maxrss is in KiB on Linux.
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        status_before = memory_status()
        rss = status_before.get("VmRSS")
        if fresh_process and rss is not None and before * 1024 > rss + (64 << 20):
            raise RuntimeError(
                f"ru_maxrss ({before >> 10} MiB) is far above the resident size before the "
                f"call ({rss >> 20} MiB): a peak inherited from the parent "
                "process would hide the call's own"
            )
        sampler = AnonymousPeak(status_before.get("RssAnon", 0))
        sampler.start()
        try:
            out = run()
        finally:
            sampler.stop()
        result["peak_bytes"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
        result["maxrss_before_bytes"] = before * 1024
        result["anonymous_peak_bytes"] = sampler.peak - status_before.get("RssAnon", 0)
        # ru_maxrss counts the libraries' file-backed pages too: if memory pressure evicted
        # some during the run, the call's own growth is partly hidden.
        result["file_pages_evicted_bytes"] = max(
            0, status_before.get("RssFile", 0) - memory_status().get("RssFile", 0)
        )
    result["oom"] = False
    result["finite"] = bool(torch.isfinite(out).all())
    return result


def memory_status() -> dict[str, int]:
    """The process's resident sizes (VmRSS, RssAnon, RssFile) in bytes; empty off Linux."""
    sizes = {}
    try:
        with open("/proc/self/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile"):
                    sizes[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return sizes


class AnonymousPeak(threading.Thread):
    """Samples the process's anonymous resident size every millisecond: a cross-check of
    ru_maxrss that file-backed pages (evicted or not) cannot disturb."""

    def __init__(self, initial: int) -> None:
        super().__init__(daemon=True)
        self.peak = initial
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.001):
            self.peak = max(self.peak, memory_status().get("RssAnon", 0))

    def stop(self) -> None:
        self._done.set()
        self.join()
        self.peak = max(self.peak, memory_status().get("RssAnon", 0))


def in_fresh_process(library: str, device: torch.device, batch: int) -> dict[str, Any]:
    # Linux carries a process's peak RSS across exec (and fork copies it), so a worker started
    # straight from this (large) process would begin with our ru_maxrss. A shell in between,
    # which forks the worker from its own small image, gives it a fresh one.
    completed = subprocess.run(
        [
            "/bin/sh",
            "-c",
            '"$@" & wait $!',
            "sh",
            sys.executable,
            os.path.abspath(__file__),
            "--memory-worker",
            library,
            "--device",
            str(device.type),
            "--batch",
            str(batch),
            "--threads",
            str(torch.get_num_threads()),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(
            f"memory worker for {library} exited with {completed.returncode}:\n"
            + completed.stderr[-2000:]
        )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return (
            "each library in a fresh process: torch.cuda.max_memory_allocated during the call "
            "minus memory_allocated before it"
        )
    return (
        "each library in a fresh process: ru_maxrss after the call minus ru_maxrss after "
        "imports, model and input set-up and a warm-up forward on 2 examples"
    )


def captum_oom_batch(device: torch.device, start: int, limit: int) -> dict[str, Any]:
    """Doubles the batch until captum runs out of GPU memory, then runs fastattr there."""
    batch = start
    while batch <= limit:
        captum = in_fresh_process("captum", device, batch)
        if captum["oom"]:
            ours = in_fresh_process("fastattr", device, batch)
            return {"batch": batch, "captum": captum, "fastattr": ours}
        batch *= 2
    return {"batch": None, "limit": limit}


# ----------------------------------------------------------------------------- report


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def check(name: str, value: float) -> str:
    op, bound = TARGETS[name]
    ok = value <= bound if op == "<=" else value >= bound
    return f"{op} {bound:g}: {'met' if ok else 'MISSED'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["mlp", "cnn", "memory", "oom"], help="sections"
    )
    parser.add_argument("--oom-limit", type=int, default=1 << 15, help="largest batch to try")
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads (default: torch's, one per core)"
    )
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=MEMORY_BATCH, help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.memory_worker:
        print(json.dumps(memory_worker(args.memory_worker, args.device, args.batch)))
        return

    device, machine = script_device(args.device, parser.error)
    import captum

    print(
        f"# IntegratedGradients on {device} ({machine}); torch {torch.__version__}, "
        f"captum {captum.__version__}, fastattr {fastattr.__version__} "
        f"({fastattr.current_backend()} kernels); n_steps {N_STEPS}, gausslegendre, "
        f"target per example; medians of {args.repeats} interleaved rounds after "
        f"{args.warmup} warm-ups"
    )
    figures: dict[str, Any] = {"device": str(device), "machine": machine}

    timings = []
    if "mlp" not in args.skip:
        inputs, target = make_inputs((models.MLP_FEATURES,), MLP_BATCH, device)
        model = models.mlp().to(device)
        label = f"MLP 64-256-256-10, batch {MLP_BATCH}"
        timings.append(time_case(label, model, inputs, target, device, args.warmup, args.repeats))
    if "cnn" not in args.skip:
        inputs, target = make_inputs(models.IMAGE_SHAPE, CNN_BATCH, device)
        model = models.cnn().to(device)
        label = f"CNN 2 conv + pool + 2 linear, 3x32x32, batch {CNN_BATCH}"
        timings.append(time_case(label, model, inputs, target, device, args.warmup, args.repeats))
    if timings:
        figures["timings"] = timings
        print()
        print(
            "| case | floor | fastattr | captum | fastattr/floor | captum/floor | captum/fastattr |"
        )
        print("|---|---|---|---|---|---|---|")
        for t in timings:
            print(
                f"| {t['case']} | {t['floor_s'] * 1e3:.1f} ms | {t['fastattr_s'] * 1e3:.1f} ms | "
                f"{t['captum_s'] * 1e3:.1f} ms | {t['fastattr/floor']:.2f} | "
                f"{t['captum/floor']:.2f} | {t['captum/fastattr']:.2f} |"
            )
        print()
        for t in timings:
            kind = "MLP" if t["case"].startswith("MLP") else "CNN"
            print(
                f"- {t['case']}: fastattr/floor {t['fastattr/floor']:.2f} "
                f"({check('fastattr/floor', t['fastattr/floor'])}); captum/fastattr "
                f"{t['captum/fastattr']:.2f} "
                f"({check(f'captum/fastattr ({kind})', t['captum/fastattr'])}); "
                f"max |fastattr - captum| / max |captum| "
                f"{t['max |fastattr - captum| / max |captum|']:.1e}"
            )

    if "memory" not in args.skip:
        peaks = {lib: in_fresh_process(lib, device, MEMORY_BATCH) for lib in ("fastattr", "captum")}
        figures["memory"] = {"method": memory_method(device), **peaks}
        print()
        shape = "x".join(map(str, MEMORY_SHAPE))
        print(
            f"Peak memory, {MEMORY_BATCH}x{shape} images, n_steps {N_STEPS}, "
            f"internal_batch_size=None, ImageCNN ({memory_method(device)}):"
        )
        if any(peaks[lib]["oom"] for lib in peaks):
            print(f"- out of memory: {[lib for lib in peaks if peaks[lib]['oom']]}")
        else:
            ratio = peaks["fastattr"]["peak_bytes"] / peaks["captum"]["peak_bytes"]
            figures["memory"]["fastattr/captum"] = ratio
            print(
                f"- fastattr {mib(peaks['fastattr']['peak_bytes'])}, captum "
                f"{mib(peaks['captum']['peak_bytes'])}: fastattr/captum {ratio:.2f} "
                f"({check('fastattr/captum peak memory', ratio)})"
            )
            steps = [rows // MEMORY_BATCH for rows in peaks["fastattr"]["forward_rows"]]
            print(f"- fastattr's chunks (steps per forward): {steps}")
            if device.type == "cpu":
                anonymous = {lib: peaks[lib]["anonymous_peak_bytes"] for lib in peaks}
                print(
                    f"- cross-check, sampled peak of anonymous memory (RssAnon every 1 ms): "
                    f"fastattr {mib(anonymous['fastattr'])}, captum {mib(anonymous['captum'])}: "
                    f"{anonymous['fastattr'] / anonymous['captum']:.2f}"
                )
                for lib in peaks:
                    evicted = peaks[lib]["file_pages_evicted_bytes"]
                    if evicted > 16 << 20:
                        print(
                            f"- WARNING: {mib(evicted)} of {lib}'s file-backed pages were evicted "
                            "during its run (memory pressure): its ru_maxrss figure is too low; "
                            "run again on a quieter machine"
                        )

    if device.type == "cuda" and "oom" not in args.skip:
        found = captum_oom_batch(device, MEMORY_BATCH, args.oom_limit)
        figures["oom"] = found
        print()
        if found["batch"] is None:
            print(f"captum did not run out of memory up to batch {found['limit']}")
        else:
            ours = found["fastattr"]
            outcome = (
                "ran out of memory too"
                if ours["oom"]
                else f"completed with a peak of {mib(ours['peak_bytes'])}"
            )
            print(
                f"Batch {found['batch']} of {'x'.join(map(str, MEMORY_SHAPE))} images: captum "
                f"runs out of GPU memory; fastattr {outcome}"
            )

    if args.json:
        with open(args.json, "w") as handle:
            json.dump(figures, handle, indent=2)


if __name__ == "__main__":
    main()
