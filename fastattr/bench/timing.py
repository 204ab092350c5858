"""Side-by-side timing: implementations interleaved round by round, so drift on the machine
(clock, cache, other processes) hits them all alike, after warm-ups, reported as medians."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(
    candidates: Mapping[str, Callable[[], Any]],
    *,
    device: torch.device | str = "cpu",
    warmup: int = 2,
    repeats: int = 7,
) -> dict[str, float]:
    """Median wall time in seconds of each candidate.

    Every round runs each candidate once, in a rotating order; the first ``warmup`` rounds
    are discarded. On CUDA each run is bracketed by synchronizations, so the time is the
    device's as well as the host's.

    Args:
        candidates: The calls to time, by name.
        device: Where they run (CUDA calls are synchronized).
        warmup: Untimed rounds first.
        repeats: Timed rounds.

    Returns:
        The median seconds of each candidate, by name.

    Examples:
        >>> from fastattr.bench.timing import interleaved_medians
        >>> medians = interleaved_medians({"sum": lambda: sum(range(100))}, warmup=0, repeats=3)
        >>> sorted(medians)
        ['sum']
    """
    device = torch.device(device)
    names = list(candidates)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            _synchronize(device)
            start = time.perf_counter()
            candidates[name]()
            _synchronize(device)
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(samples) for name, samples in times.items()}
