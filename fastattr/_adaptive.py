"""``n_steps="auto"``: each example's path gets the points it needs.

What makes this cheap is what every evaluation already gives: the model's output ``f`` at the
point and, from the gradient, its directional derivative ``d = f'`` along the path
(``point_slopes``). Since ``f`` is known at every point, the exact integral of ``d`` over any
interval between two points is known too, so the error of the trapezoid rule on each interval
(its *local* error) and the completeness error of the whole rule are known exactly, not
estimated.

The outputs at the path's two ends come from forwards without a graph: no gradient is taken
at the ends (from a zero baseline every ReLU of a bias-free network sits on its kink at alpha
0, where the gradient is not the path's). Each example starts with the midpoint and is then
refined in rounds, all examples of a round evaluated together through the path engine:

- while its path looks smooth it takes the next level of nested Gauss-Patterson nodes (1, 3,
  7, 15, 31, ... points, exact for polynomials of degree 1, 5, 11, 23, 47, ...: about
  Gauss-Legendre's accuracy, whose own nodes do not nest; see ``fastattr._patterson``), whose
  error falls geometrically on a smooth path;
- when a level fails to cut the error by a factor ``STALL`` (a kink: on ReLU networks the
  path gradient is piecewise constant, and every fixed rule's error falls only like 1/n), it
  switches to adaptive bisection: each round halves the intervals with the largest exact
  local errors, which are those holding the gradient's jumps (the trapezoid rule between
  points, each end interval given to its one point).

An example stops as soon as its completeness error ``|sum(attributions) - (f(x) - f(x'))|``,
with the Patterson weights or the trapezoid weights on its points, is at most
``tolerance * max(|f(x) - f(x')|, 1)`` (relative for output changes above 1, absolute below),
when it has ``max_steps`` points, or when no interval's local error stands above float
rounding. Points are never moved or dropped: the gradient of each is kept (one row per point)
until the example stops and its final weights are known; then the kept rows are folded into
its accumulator. Examples go through in groups whose kept gradients fit the engine's memory
budget, so memory stays bounded by it whatever the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fastattr._formatting import as_int
from fastattr._path_integral import (
    Evaluate,
    PathEngine,
    PathIntegral,
    Points,
    chunk_budget,
    new_accumulator,
)
from fastattr._patterson import LEVELS as PATTERSON_LEVELS
from fastattr._patterson import patterson

DEFAULT_TOLERANCE = 1e-3
DEFAULT_MAX_STEPS = 128
# The methods whose refinement nests, and how: Gauss-Patterson levels then bisection, or
# bisection (the trapezoid rule) from the start.
NESTED_METHODS = ("gausslegendre", "riemann_trapezoid")
# A Patterson level counts as converging when it cuts the error by this factor.
STALL = 4.0
# Each bisection round halves this fraction of an example's intervals (those with the
# largest local errors): fewer rounds than one interval at a time, about as few points.
REFINE_FRACTION = 0.25
# Errors up to this many units of rounding of the outputs and slopes are rounding: an
# example stops there, and local errors below it are not refined.
ROUNDING_UNITS = 2
# Nested levels that stall within this many units of rounding have converged (kinks stall
# them far above it).
STALLED_UNITS = 64


def check_auto(
    method: str, n_steps: Any, tolerance: Any, max_steps: Any
) -> tuple[bool, float, int]:
    """Whether ``n_steps`` asks for adaptive steps, with the tolerance and step cap to use.

    Raises:
        ValueError: ``tolerance`` or ``max_steps`` given with a fixed ``n_steps``, a method
            that cannot nest with ``"auto"``, a tolerance that is not positive, or
            ``max_steps`` below 2.
        TypeError: ``tolerance`` is not a number or ``max_steps`` not an int.
    """
    if not (isinstance(n_steps, str) and n_steps == "auto"):
        for name, value in (("tolerance", tolerance), ("max_steps", max_steps)):
            if value is not None:
                raise ValueError(
                    f"{name} is only used with n_steps='auto', got n_steps={n_steps!r}"
                )
        return False, DEFAULT_TOLERANCE, DEFAULT_MAX_STEPS
    if method not in NESTED_METHODS:
        raise ValueError(
            "n_steps='auto' refines nested rules: method must be 'gausslegendre' (refined "
            "through nested Gauss-Patterson levels, then bisection where the path has kinks) or "
            f"'riemann_trapezoid' (bisection), got {method!r}, whose nodes do not nest"
        )
    if tolerance is None:
        tolerance = DEFAULT_TOLERANCE
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)):
        raise TypeError(f"tolerance must be a number, got {type(tolerance).__name__}")
    if not (math.isfinite(tolerance) and tolerance > 0):
        raise ValueError(f"tolerance must be positive and finite, got {tolerance}")
    max_steps = DEFAULT_MAX_STEPS if max_steps is None else as_int(max_steps, "max_steps")
    if max_steps < 2:
        raise ValueError(f"max_steps must be at least 2, got {max_steps}")
    return True, float(tolerance), max_steps


def _intervals(
    alphas: np.ndarray, outputs: np.ndarray, slopes: np.ndarray, start: float, end: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The intervals between the (ascending) points and the path's ends, whose outputs are
    ``start`` and ``end``: their starts, widths and exact errors under the trapezoid rule
    between points, each end interval given whole to its one point (no gradient is taken at
    the ends), and that rule's weights on the points."""
    widths = np.diff(np.concatenate([[0.0], alphas, [1.0]]))
    ruled = np.concatenate([[slopes[0]], (slopes[:-1] + slopes[1:]) / 2, [slopes[-1]]])
    local = widths * ruled - np.diff(np.concatenate([[start], outputs, [end]]))
    weights = np.zeros_like(alphas)
    weights[:-1] += widths[1:-1] / 2
    weights[1:] += widths[1:-1] / 2
    weights[0] += widths[0]
    weights[-1] += widths[-1]  # (the same point when there is one)
    return np.concatenate([[0.0], alphas]), widths, local, weights


@dataclass
class _Path:
    """One example's points so far (in the order evaluated), its outputs at the path's two
    ends, and where its refinement is."""

    example: int
    first_slot: int
    start_output: float
    end_output: float
    alphas: list[float] = field(default_factory=list)
    outputs: list[float] = field(default_factory=list)
    slopes: list[float] = field(default_factory=list)
    # The Gauss-Patterson level its points form while the path looks smooth; None once it
    # is refined by bisection.
    level: int | None = None
    level_error: float = math.inf
    weights: np.ndarray | None = None  # final, in evaluation order

    def next_points(self, tolerance: float, max_steps: int, rounding: float) -> list[float]:
        """The positions to evaluate next; none (with the final weights set) when done."""
        order = np.argsort(self.alphas, kind="stable")
        alphas = np.asarray(self.alphas)[order]
        slopes = np.asarray(self.slopes)[order]
        outputs = np.asarray(self.outputs)[order]
        change = self.end_output - self.start_output
        target = tolerance * max(abs(change), 1.0)
        lows, widths, local, trapezoid = _intervals(
            alphas, outputs, slopes, self.start_output, self.end_output
        )
        rules = [(abs(local.sum()), trapezoid)]
        if self.level is not None:
            # (Its points are the level's nodes in the order the table adds them.)
            nested = patterson(self.level)[1][order]
            nested_error = abs(float(nested @ slopes) - change)
            rules.append((nested_error, nested))
        error, weights = min(rules, key=lambda rule: rule[0])
        # A unit of rounding of the outputs and slopes: errors within a few are not the
        # rule's, and no refinement removes them.
        largest = max(np.abs(outputs).max(), abs(self.start_output), abs(self.end_output))
        unit = rounding * (largest + float(trapezoid @ np.abs(slopes)))
        noise = ROUNDING_UNITS * unit
        count = len(alphas)
        # Past the second level, nested levels that stop converging have either reached
        # rounding (a smooth path: done) or met kinks, across which they fall like 1/n as the
        # trapezoid rule does (then bisection takes over).
        converging = beats_trapezoid = True
        converged = False
        if self.level is not None and self.level >= 2:
            converging = nested_error * STALL <= self.level_error
            beats_trapezoid = nested_error * STALL <= rules[0][0]
            no_room = count + 2 ** (self.level + 1) > max_steps
            converged = nested_error <= STALLED_UNITS * unit and (not converging or no_room)
        if (
            error <= max(target, noise)
            or count >= max_steps
            or not math.isfinite(error)
            or not (np.abs(local) > noise).any()
            or converged
        ):
            final = np.empty(count)
            final[order] = weights
            self.weights = final
            return []
        if self.level is not None:
            added = 2 ** (self.level + 1)
            if (
                (converging or beats_trapezoid)
                and count + added <= max_steps
                and self.level + 1 < PATTERSON_LEVELS
            ):
                self.level_error = nested_error
                self.level += 1
                return patterson(self.level)[0][count:].tolist()
            self.level = None
        # Bisect the intervals with the largest local errors above rounding.
        candidates = np.flatnonzero(np.abs(local) > noise)
        take = min(max(1, math.ceil(REFINE_FRACTION * len(widths))), max_steps - count)
        chosen = candidates[np.argsort(-np.abs(local[candidates]), kind="stable")[:take]]
        return (lows[chosen] + widths[chosen] / 2).tolist()


def integrate_adaptive(
    ends: tuple[Tensor, ...],
    starts: tuple[Tensor, ...],
    evaluate: Evaluate,
    *,
    batch: int,
    method: str,
    tolerance: float,
    max_steps: int,
    multiply_by_inputs: bool,
    **engine_options: Any,
) -> tuple[PathIntegral, Tensor]:
    """Integrate along each example's path with as many points as it needs (see the module's
    docstring); returns the integral and the points each example took, (B,) int64."""
    ends = tuple(end.detach() for end in ends)
    device = ends[0].device
    rows_per_example = [end.shape[0] // batch if batch else 1 for end in ends]
    # Bytes of one point's kept gradient (in the accumulators' float32 or float64).
    row_bytes = sum(
        end[:1].numel() * m * (8 if end.dtype == torch.float64 else 4)
        for end, m in zip(ends, rows_per_example)
    )
    # Kept gradients take at most half the budget: a group's examples can all reach max_steps.
    group = max(1, min(batch, chunk_budget(device) // 2 // max(1, max_steps * row_bytes)))
    engine = PathEngine(
        ends, starts, evaluate, batch=batch, accumulator_rows=group * max_steps, **engine_options
    )
    finals = [new_accumulator(end) for end in ends]
    steps = torch.zeros(batch, dtype=torch.long)
    end_outputs = []
    rounding = max(torch.finfo(end.dtype).eps for end in ends)
    for low in range(0, batch, group):
        for kept in engine.accumulators:
            kept.zero_()
        examples = torch.arange(low, min(batch, low + group))
        # The outputs at both ends, from forwards without a graph: the gradient at the
        # baseline is never taken (from a zero baseline, every ReLU of a bias-free network sits
        # on its kink there).
        count = len(examples)
        at_ends = engine.outputs_at(
            Points(
                examples.repeat(2),
                torch.cat([torch.zeros(count), torch.ones(count)]).double(),
                torch.ones(2 * count, dtype=torch.float64),
            )
        )[0]
        end_outputs.append(at_ends)
        values = at_ends.double().cpu().tolist()
        start_level = 0 if method == "gausslegendre" else None
        paths = [
            _Path(
                int(example),
                (int(example) - low) * max_steps,
                values[i],
                values[count + i],
                level=start_level,
            )
            for i, example in enumerate(examples)
        ]
        initial = patterson(0)[0].tolist()
        pending = [(path, list(initial)) for path in paths]
        while pending:
            outputs, slopes = engine.run(_points(pending), values=True)
            outputs = outputs[0].double().cpu().tolist()
            slopes = slopes[0].cpu().tolist()
            position = 0
            for path, new in pending:
                for alpha in new:
                    path.alphas.append(alpha)
                    path.outputs.append(outputs[position])
                    path.slopes.append(slopes[position])
                    position += 1
            pending = []
            for path in paths:
                if path.weights is not None:
                    continue
                new = path.next_points(tolerance, max_steps, rounding)
                if new:
                    pending.append((path, new))
        done = Points(
            torch.tensor([p.example for p in paths for _ in p.alphas], dtype=torch.long),
            torch.tensor([a for p in paths for a in p.alphas], dtype=torch.float64),
            torch.tensor(np.concatenate([p.weights for p in paths]), dtype=torch.float64),
            torch.tensor(
                [p.first_slot + i for p in paths for i in range(len(p.alphas))], dtype=torch.long
            ),
        )
        engine.fold_kept(finals, done)
        for path in paths:
            steps[path.example] = len(path.alphas)
    result = engine.finish(multiply_by_inputs, finals)
    if end_outputs:  # each group's starts, then its ends
        pairs = [outputs.reshape(2, -1) for outputs in end_outputs]
        result.start_outputs = [torch.cat([pair[0] for pair in pairs])]
        result.end_outputs = [torch.cat([pair[1] for pair in pairs])]
    return result, steps.to(device)


def _points(pending: list[tuple[_Path, list[float]]]) -> Points:
    """The round's new points, each kept in its example's next free row."""
    examples, alphas, slots = [], [], []
    for path, new in pending:
        for i, alpha in enumerate(new):
            examples.append(path.example)
            alphas.append(alpha)
            slots.append(path.first_slot + len(path.alphas) + i)
    count = len(examples)
    return Points(
        torch.tensor(examples, dtype=torch.long),
        torch.tensor(alphas, dtype=torch.float64),
        torch.ones(count, dtype=torch.float64),
        torch.tensor(slots, dtype=torch.long),
    )
