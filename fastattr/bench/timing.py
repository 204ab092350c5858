"""Side-by-side timing: implementations interleaved round by round, so drift on the machine
(clock, cache, other processes) hits them all alike, after warm-ups, reported as medians; two
implementations compared round by round, with a confidence interval that says whether their
difference is beyond the machine's noise."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times(
    candidates: Mapping[str, Callable[[], Any]],
    *,
    device: torch.device | str = "cpu",
    warmup: int = 2,
    repeats: int = 7,
) -> dict[str, list[float]]:
    """Wall time in seconds of each candidate in each timed round.

    Every round runs each candidate once, in a rotating order; the first ``warmup`` rounds
    are discarded. On CUDA each run is bracketed by synchronizations, so the time is the
    device's as well as the host's.

    Args:
        candidates: The calls to time, by name.
        device: Where they run (CUDA calls are synchronized).
        warmup: Untimed rounds first.
        repeats: Timed rounds.

    Returns:
        The seconds of each candidate, by name, one per timed round in order.

    Examples:
        >>> from fastattr.bench.timing import interleaved_times
        >>> times = interleaved_times({"sum": lambda: sum(range(100))}, warmup=0, repeats=3)
        >>> len(times["sum"])
        3
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
    return times


def interleaved_medians(
    candidates: Mapping[str, Callable[[], Any]],
    *,
    device: torch.device | str = "cpu",
    warmup: int = 2,
    repeats: int = 7,
) -> dict[str, float]:
    """Median wall time in seconds of each candidate, timed as
    [interleaved_times][fastattr.bench.timing.interleaved_times] times them.

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
    times = interleaved_times(candidates, device=device, warmup=warmup, repeats=repeats)
    return {name: statistics.median(samples) for name, samples in times.items()}


def paired_ratio(
    numerators: Sequence[float], denominators: Sequence[float], confidence: float = 0.95
) -> tuple[float, tuple[float, float] | None]:
    """The median over rounds of ``numerators[i] / denominators[i]``, and a distribution-free
    confidence interval for it.

    Timed in the same round, two implementations meet the same state of the machine, so
    their ratio round by round varies far less than either time does. The interval is the
    pair of order statistics of the ratios that covers the median of their distribution with
    probability at least ``confidence`` whatever that distribution is (rounds independent):
    an interval that excludes 1 says the two differ beyond the machine's noise.

    Args:
        numerators: One time per round.
        denominators: The other implementation's time in the same rounds.
        confidence: The interval's coverage, in (0, 1).

    Returns:
        The median ratio, and the interval (None with too few rounds for that coverage:
        fewer than 6 at 0.95).

    Raises:
        ValueError: The sequences are empty or of different lengths, a time is not positive,
            or ``confidence`` is not in (0, 1).

    Examples:
        >>> from fastattr.bench.timing import paired_ratio
        >>> paired_ratio([2.0, 2.2, 1.8, 2.1, 2.0, 1.9], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
        (2.0, (1.8, 2.2))
    """
    if not len(numerators) == len(denominators) > 0:
        raise ValueError(
            f"need one numerator per denominator, at least one: got {len(numerators)} and "
            f"{len(denominators)}"
        )
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if any(not t > 0 for t in (*numerators, *denominators)):
        raise ValueError("times must be positive")
    ratios = sorted(a / b for a, b in zip(numerators, denominators))
    n = len(ratios)
    # [ratios[k - 1], ratios[n - k]] misses the median when at most k - 1 ratios fall below
    # it or at most k - 1 above: probability 2 * P(Binomial(n, 1/2) <= k - 1).
    below, k = 0.0, 0
    while k < n // 2 and 2 * (below + math.comb(n, k) / 2**n) <= 1 - confidence:
        below += math.comb(n, k) / 2**n
        k += 1
    interval = (ratios[k - 1], ratios[n - k]) if k else None
    return statistics.median(ratios), interval
