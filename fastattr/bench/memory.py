"""Peak memory of one call, measured honestly on either device.

CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated before the call.

CPU: the rise of the process's peak resident set size (``VmHWM``, reset through
``/proc/self/clear_refs``) above its resident size before the call. The calls run in a
separate worker process started with glibc's mmap threshold pinned at 64 KiB, so every
sizeable tensor is mapped on allocation and unmapped on free: memory the allocator kept from
an earlier call cannot hide a later call's peak, and the timing process keeps its allocator
untouched.
"""

from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

CPU_METHOD = (
    "rise of peak RSS (VmHWM) during the call, in a worker process with glibc's mmap "
    "threshold at 64 KiB"
)
CUDA_METHOD = "torch.cuda.max_memory_allocated during the call, above what was allocated before"

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def cpu_measurement_supported() -> bool:
    """Whether this system lets a process reset and read its peak resident size (Linux)."""
    return _CLEAR_REFS.exists() and _STATUS.exists()


def _status_bytes(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"{_STATUS} has no {field} field")
    return int(match.group(1)) * 1024


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Bytes the call needed at its peak beyond what was in use when it started.

    On the CPU the figure is the process's: run it in a process of its own (as
    [fastattr.bench.memory.measure_in_worker][] does) for a figure free of earlier calls.

    Args:
        fn: The call.
        device: Where it runs.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    before = _status_bytes("VmRSS")
    _CLEAR_REFS.write_text("5")  # "5" resets VmHWM to the current resident size
    fn()
    # Pages freed between the two readings can leave the peak a little below `before`.
    return max(0, _status_bytes("VmHWM") - before)


def measure_in_worker(request: dict[str, Any], timeout_s: float = 600.0) -> dict[str, Any]:
    """Peak bytes of the cases of ``request``, measured in a fresh process.

    Args:
        request: The device, the source of the cases and their names, the batch sizes,
            ``n_steps`` and the thread count.
        timeout_s: How long the worker may take.

    Returns:
        Peak bytes (or a failure status) by case, batch size and contender.

    Raises:
        RuntimeError: The worker failed.
    """
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    completed = subprocess.run(
        [sys.executable, "-m", "fastattr.bench.runner", "--memory-worker"],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout_s,
        check=False,
    )
    if completed.returncode != 0:
        tail = completed.stderr.strip().splitlines()[-5:]
        raise RuntimeError(f"memory worker exited with {completed.returncode}: " + " | ".join(tail))
    return json.loads(completed.stdout.strip().splitlines()[-1])
