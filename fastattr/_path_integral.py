"""The path engine shared by the integrated-gradients methods.

A path point is an example and a position ``alpha`` on its straight path from the baseline
(``alpha = 0``) to the input (``alpha = 1``), with a quadrature weight. The engine streams any
set of points through the model in chunks: for each chunk the ``interpolate_points`` op builds
the path rows, the caller's ``evaluate`` runs the model on them, one backward (or one per
target) gives the gradients, and the ``accumulate_points`` op folds them, weighted, into
per-example accumulators in place. A chunk holds points of any examples at any positions, so
memory is bounded by the chunk: never by the number of steps, of examples or of targets.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Hashable, Iterable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fastattr import ops
from fastattr._autograd import input_gradients
from fastattr._formatting import (
    ColumnIndices,
    as_int,
)
from fastattr._forward import (
    OutputShapeError,
    RowsCoupled,
    check_differentiable,
    row_sums,
    select_targets,
)
from fastattr._model_state import module_of, uses_batch_statistics
from fastattr._quadrature import check_steps, quadrature_table
from fastattr.ops._checks import row_layout

EXACT = "exact"

# How much the saved activations of one chunk may take. More buys no throughput: a chunk this
# size already keeps a GPU or the CPU's cores busy.
CUDA_CHUNK_BYTES = 1 << 30
CPU_CHUNK_BYTES = 1 << 29
# Before anything is measured, a point is assumed to keep this many times its path row's bytes
# for the backward (the models of the benchmark keep 9-53 times): the measuring chunk is sized
# from it.
ASSUMED_ACTIVATION_RATIO = 256


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def new_accumulator(end: Tensor, rows: int | None = None) -> Tensor:
    """Zeros for ``rows`` rows (default: ``end``'s) of ``end``'s gradients, in a layout the
    kernels take (zeros_like would copy any other strides, e.g. of a transposed input, which
    the kernels reject)."""
    size = (end.shape[0] if rows is None else rows, *end.shape[1:])
    layout = row_layout(end)
    return torch.zeros(size, dtype=accumulator_dtype(end.dtype), device=end.device).contiguous(
        memory_format=layout
    )


def _available_host_memory() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def chunk_budget(device: torch.device) -> int:
    """Bytes one chunk's activations may take on ``device``: a fraction of what is free,
    capped where larger chunks stop paying off."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return min(CUDA_CHUNK_BYTES, (free + cached) // 2)
    return min(CPU_CHUNK_BYTES, _available_host_memory() // 4)


class _SavedTensorMeter:
    """Counts the bytes autograd keeps for the backward pass (the activations), excluding the
    model's own parameters and buffers, which do not grow with the chunk."""

    def __init__(self, exclude: Iterable[Tensor]) -> None:
        self._seen = {t.untyped_storage().data_ptr() for t in exclude}
        self.bytes = 0

    def pack(self, tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._seen:
            self._seen.add(storage.data_ptr())
            self.bytes += storage.nbytes()
        return tensor

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor)


def model_state_tensors(forward_func: object) -> list[Tensor]:
    """Parameters and buffers of the module behind ``forward_func``, if there is one."""
    module = module_of(forward_func)
    return [] if module is None else [*module.parameters(), *module.buffers()]


def steps_per_chunk_for(internal_batch_size: int | None, batch: int) -> int | None:
    """Captum's meaning of internal_batch_size: how many steps of the whole batch fit in it."""
    if internal_batch_size is None:
        return None
    internal_batch_size = as_int(internal_batch_size, "internal_batch_size", "an int or None")
    if internal_batch_size < 1:
        raise ValueError(f"internal_batch_size must be at least 1, got {internal_batch_size}")
    if internal_batch_size < batch:
        warnings.warn(
            f"internal_batch_size ({internal_batch_size}) is smaller than the number of "
            f"examples ({batch}); each chunk holds one step of the whole batch instead",
            stacklevel=4,
        )
    return max(1, internal_batch_size // max(batch, 1))


# ----------------------------------------------------------------------------- points


@dataclass(frozen=True)
class Points:
    """Path points as host tables, one entry per point: the example (``examples``, int64),
    the position on its path (``alphas``, float64), the quadrature weight (``weights``,
    float64) and, when it is not the example's, the accumulator row its weighted gradient is
    added to (``rows``, int64: e.g. a row per point, to keep each point's gradient)."""

    examples: Tensor
    alphas: Tensor
    weights: Tensor
    rows: Tensor | None = None

    def __len__(self) -> int:
        return self.examples.numel()

    def slice(self, start: int, stop: int) -> Points:
        return Points(
            self.examples[start:stop],
            self.alphas[start:stop],
            self.weights[start:stop],
            None if self.rows is None else self.rows[start:stop],
        )


@dataclass(frozen=True)
class StepMajor:
    """Every example at every node of a quadrature rule, step-major (point ``k * B + b`` is
    example ``b`` at node ``k``), made into tables a chunk at a time."""

    alphas: Tensor
    weights: Tensor
    batch: int

    def __len__(self) -> int:
        return self.alphas.numel() * self.batch

    def slice(self, start: int, stop: int) -> Points:
        index = torch.arange(start, stop)
        steps = index // self.batch
        return Points(index - steps * self.batch, self.alphas[steps], self.weights[steps])


class PointRows:
    """The examples that a chunk's points belong to, for gathering what the forward function
    needs per point (targets, per-example arguments). ``whole_steps`` is the number of steps
    when the chunk holds whole steps of every example in order (then a repeat gathers).
    ``as_captum`` tells whether the chunk holds the rows captum's forward would see (captum's
    chunks of ``internal_batch_size``, or the whole path): only then may an output that is not
    one value per row be differentiated as captum does (see ``path_output``)."""

    def __init__(
        self, examples: Tensor, batch: int, whole_steps: int | None, as_captum: bool = False
    ) -> None:
        self.examples = examples
        self.batch = batch
        self.whole_steps = whole_steps
        self.as_captum = as_captum
        self._on_device: dict[torch.device, Tensor] = {}
        self._list: list[int] | None = None

    def __len__(self) -> int:
        return self.examples.numel()

    def index_on(self, device: torch.device) -> Tensor:
        """The examples as an index on ``device`` (copied once, without a synchronization)."""
        index = self._on_device.get(device)
        if index is None:
            index = self.examples
            if device.type == "cuda":
                index = index.pin_memory().to(device, non_blocking=True)
            elif device.type != "cpu":
                index = index.to(device)
            self._on_device[device] = index
        return index

    def take(self, tensor: Tensor) -> Tensor:
        """``tensor``'s rows (one per example) for the points."""
        if self.whole_steps is not None:
            return tensor.repeat(self.whole_steps, *([1] * (tensor.dim() - 1)))
        return tensor.index_select(0, self.index_on(tensor.device))

    def take_list(self, values: Sequence[Any]) -> list[Any]:
        """A per-example list's entries for the points."""
        if self.whole_steps is not None:
            return list(values) * self.whole_steps
        if self._list is None:
            self._list = self.examples.tolist()
        return [values[e] for e in self._list]


# Runs the model on a chunk of path rows: (paths, the points' examples) -> for each target, one
# value per point, differentiable with respect to the paths.
Evaluate = Callable[[tuple[Tensor, ...], PointRows], Sequence[Tensor]]


@dataclass
class PathIntegral:
    """What streaming a path produced."""

    # Per target, one tensor per path tensor.
    attributions: list[tuple[Tensor, ...]]
    # Per target, the per-example sum of every attribution (for the convergence delta).
    row_sums: list[Tensor]
    # Per target, the model's per-example output at the start and end of the path, when the
    # quadrature evaluated it there for every example (nodes at 0 or 1); else None.
    start_outputs: list[Tensor] | None
    end_outputs: list[Tensor] | None


class PathEngine:
    """Streams path points through ``evaluate`` in chunks and accumulates their weighted
    gradients per example and target.

    ``ends`` and ``starts`` are the path's two ends, one tensor pair per path tensor, each
    with ``batch`` examples along dimension 0 (a tensor may hold several rows per example,
    example-major: a layer run on every token). ``targets`` is how many outputs ``evaluate``
    returns per point, each with its own accumulators.

    Chunks are sized from free memory: the first chunk measures what autograd keeps per point
    (not counting ``model``'s parameters and buffers), the rest are as large as the budget
    allows. The measured cost is kept in ``step_costs`` under ``cost_key`` and the ends' row
    shapes, so later calls skip the measuring chunk. ``steps_per_chunk`` (captum's
    internal_batch_size) fixes chunks to that many whole steps of the batch instead.
    """

    def __init__(
        self,
        ends: tuple[Tensor, ...],
        starts: tuple[Tensor, ...],
        evaluate: Evaluate,
        *,
        batch: int,
        targets: int = 1,
        model: object = None,
        grad_kwargs: dict[str, Any] | None = None,
        steps_per_chunk: int | None = None,
        whole_steps: bool = False,
        step_costs: MutableMapping[Hashable, int] | None = None,
        cost_key: Hashable = None,
        accumulator_rows: int | None = None,
    ) -> None:
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "integrated gradients need autograd, which torch.inference_mode() turns off: "
                "call attribute outside it (torch.no_grad() is fine)"
            )
        self.ends = tuple(end.detach() for end in ends)
        self.starts = tuple(start.detach() for start in starts)
        self.evaluate = evaluate
        self.batch = batch
        self.targets = targets
        self.model = model
        self.grad_kwargs = grad_kwargs
        self.steps_per_chunk = steps_per_chunk
        self.whole_steps = whole_steps or steps_per_chunk is not None
        self.device = self.ends[0].device
        # Rows each path tensor holds per example.
        self.rows_per_example = [end.shape[0] // batch if batch else 1 for end in self.ends]
        # Rows of accumulators per target: one per example unless the points say otherwise.
        self.accumulator_rows = batch if accumulator_rows is None else accumulator_rows
        self.accumulators = [
            new_accumulator(end, targets * self.accumulator_rows * m)
            for end, m in zip(self.ends, self.rows_per_example)
        ]
        self.step_costs = step_costs
        self.cost_key = (
            cost_key,
            tuple(
                (tuple(e.shape[1:]), m, e.dtype, str(e.device))
                for e, m in zip(self.ends, self.rows_per_example)
            ),
        )
        self._point_cost = None if step_costs is None else step_costs.get(self.cost_key)
        # Outputs at the path's ends, per target, where a point sat there (alpha 0 or 1).
        self._end_values: dict[float, Tensor] = {}
        self._end_seen: dict[float, Tensor] = {}

    # -------------------------------------------------------------------- chunk sizes

    def _path_bytes_per_point(self) -> int:
        return max(
            1,
            sum(
                e[:1].numel() * e.element_size() * m
                for e, m in zip(self.ends, self.rows_per_example)
            ),
        )

    def _chunk_points(self, measuring: bool) -> int:
        """How many points the next chunk may hold."""
        if self.steps_per_chunk is not None:
            return self.steps_per_chunk * self.batch
        budget = chunk_budget(self.device)
        if measuring:
            guess = ASSUMED_ACTIVATION_RATIO * self._path_bytes_per_point()
            points = max(1, min(self.batch, budget // guess))
        else:
            points = max(1, budget // self._cost_per_point())
        if self.whole_steps or points >= self.batch:
            # Whole steps of the batch: the forward sees the batch as captum lays it out.
            points = max(1, points // self.batch) * self.batch
        return points

    def _cost_per_point(self) -> int:
        assert self._point_cost is not None
        # Several targets take their backwards one after the other over the one forward's
        # activations, which the retained graph keeps through each backward: measured, the peak
        # is then up to twice the activations, for any number of targets (their accumulators
        # are per example). Then the path rows, a gradient and that gradient in the
        # accumulator's layout.
        activations = self._point_cost * (2 if self.targets > 1 else 1)
        return activations + 3 * self._path_bytes_per_point()

    # -------------------------------------------------------------------- streaming

    def run(self, plan: Points | StepMajor, values: bool = False) -> tuple[Tensor, Tensor] | None:
        """Evaluates every point of ``plan`` and accumulates its weighted gradients.

        With ``values``, also returns what the model gave at each point, per target: its
        output and its directional derivative along the path (``point_slopes``), both (K, P)
        on the device (the slopes in float64).
        """
        total = len(plan)
        collected: list[tuple[Tensor, Tensor]] = []
        start = 0
        while start < total:
            measuring = self._point_cost is None
            points = self._chunk_points(measuring)
            stop = start + points
            if points >= self.batch and isinstance(plan, StepMajor):
                stop -= stop % self.batch  # end on a whole step
            stop = min(total, stop)
            chunk_values = self._run_chunk(plan.slice(start, stop), plan, start, measuring, values)
            if chunk_values is not None:
                collected.append(chunk_values)
            start = stop
        if not values:
            return None
        if not collected:
            return (
                torch.zeros(self.targets, 0, device=self.device),
                torch.zeros(self.targets, 0, dtype=torch.float64, device=self.device),
            )
        outputs, slopes = zip(*collected)
        return torch.cat(outputs, 1), torch.cat(slopes, 1)

    def outputs_at(self, points: Points) -> Tensor:
        """The model's outputs at ``points``, per target, (K, P), from forwards without a graph
        (in chunks no larger than those with one)."""
        size = self._chunk_points(self._point_cost is None)
        collected = []
        for start in range(0, len(points), size):
            chunk = points.slice(start, start + size)
            with torch.no_grad():
                paths = self._path_rows([self._expand(chunk, m) for m in self.rows_per_example])
                outputs = self.evaluate(paths, PointRows(chunk.examples, self.batch, None))
            collected.append(torch.stack(list(outputs)))
        return torch.cat(collected, 1)

    def _run_chunk(
        self,
        points: Points,
        plan: Points | StepMajor,
        start: int,
        measuring: bool,
        values: bool,
    ) -> tuple[Tensor, Tensor] | None:
        whole_steps = None
        if (
            isinstance(plan, StepMajor)
            and start % self.batch == 0
            and len(points) % self.batch == 0
        ):
            whole_steps = len(points) // self.batch
        # Fixed chunks are captum's (internal_batch_size, or the whole path); else a chunk
        # holding every point of the path is.
        as_captum = whole_steps is not None and (
            self.steps_per_chunk is not None or len(points) == len(plan)
        )
        rows = PointRows(points.examples, self.batch, whole_steps, as_captum)
        expanded = [self._expand(points, m) for m in self.rows_per_example]
        accumulated = [self._expand(points, m, points.rows)[0] for m in self.rows_per_example]
        meter = _SavedTensorMeter(model_state_tensors(self.model)) if measuring else None
        slopes = []
        with torch.enable_grad():
            paths = tuple(path.requires_grad_() for path in self._path_rows(expanded))
            if meter is not None:
                with meter.hooks():
                    outputs = self.evaluate(paths, rows)
            else:
                outputs = self.evaluate(paths, rows)
            if len(outputs) != self.targets:
                raise AssertionError("evaluate returned the wrong number of targets")
            for k, output in enumerate(outputs):
                check_differentiable(output)
                grads = self._gradients(output, paths, retain=k + 1 < len(outputs))
                slope = torch.zeros(len(points), dtype=torch.float64, device=self.device)
                for index, grad in enumerate(grads):
                    if grad is None:
                        continue
                    examples, _, weights = expanded[index]
                    m = self.rows_per_example[index]
                    offset = k * self.accumulator_rows * m
                    ops._unchecked_accumulate_points(
                        self.accumulators[index], grad, accumulated[index] + offset, weights
                    )
                    if values:
                        end, start_ = self.ends[index], self.starts[index]
                        per_row = ops._unchecked_point_slopes(grad, examples, end, start_)
                        slope += per_row.reshape(len(points), m).sum(1)
                slopes.append(slope)
                # This target's gradients go before the next target's backward makes its own.
                del grads, grad
        detached = [o.detach() for o in outputs]
        self._record_end_values(points, detached)
        if meter is not None:
            self._point_cost = max(1, meter.bytes // max(1, len(points)))
            if self.step_costs is not None:
                self.step_costs[self.cost_key] = self._point_cost
        return (torch.stack(detached), torch.stack(slopes)) if values else None

    def _path_rows(self, expanded: list[tuple[Tensor, Tensor, Tensor]]) -> tuple[Tensor, ...]:
        """The points' rows of every path tensor, from their tables (``_expand``'s)."""
        return tuple(
            ops._unchecked_interpolate_points(end, start, examples, alphas)
            for end, start, (examples, alphas, _) in zip(self.ends, self.starts, expanded)
        )

    @staticmethod
    def _expand(
        points: Points, rows_per_example: int, rows: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The points' tables over a tensor's rows, ``rows_per_example`` rows per point:
        ``rows`` (default: the points' examples) spread over them, alphas and weights."""
        rows = points.examples if rows is None else rows
        if rows_per_example == 1:
            return rows, points.alphas, points.weights
        offsets = torch.arange(rows_per_example)
        return (
            (rows[:, None] * rows_per_example + offsets).reshape(-1),
            points.alphas.repeat_interleave(rows_per_example),
            points.weights.repeat_interleave(rows_per_example),
        )

    def _gradients(
        self, output: Tensor, paths: tuple[Tensor, ...], retain: bool
    ) -> tuple[Tensor | None, ...]:
        seed = torch.ones_like(output)
        if self.grad_kwargs or retain:
            kwargs = {"allow_unused": True, **(self.grad_kwargs or {})}
            if retain:
                kwargs["retain_graph"] = True
            return torch.autograd.grad(output, paths, grad_outputs=seed, **kwargs)
        return input_gradients(output, paths, seed)

    def _record_end_values(self, points: Points, outputs: list[Tensor]) -> None:
        """Keeps the outputs of points at the path's ends (alpha 0 or 1), per example (when
        the outputs are one value per point: not for captum's batch-reducing outputs)."""
        if any(output.numel() != len(points) for output in outputs):
            return
        for alpha in (0.0, 1.0):
            at_end = points.alphas == alpha
            if not bool(at_end.any()):
                continue
            positions = at_end.nonzero().squeeze(1)
            examples = points.examples[positions]
            if alpha not in self._end_values:
                self._end_values[alpha] = torch.zeros(
                    self.targets, self.batch, dtype=outputs[0].dtype, device=self.device
                )
                self._end_seen[alpha] = torch.zeros(self.batch, dtype=torch.bool)
            taken = torch.stack(outputs).index_select(
                1, PointRows(positions, len(points), None).index_on(self.device)
            )
            at = PointRows(examples, self.batch, None).index_on(self.device)
            self._end_values[alpha].index_copy_(1, at, taken)
            self._end_seen[alpha][examples] = True

    def _end_outputs(self, alpha: float) -> list[Tensor] | None:
        seen = self._end_seen.get(alpha)
        if seen is None or not bool(seen.all()):
            return None
        return list(self._end_values[alpha].unbind(0))

    # -------------------------------------------------------------------- results

    def fold_kept(self, accumulators: list[Tensor], points: Points) -> None:
        """Adds kept gradients (the accumulator row ``points.rows`` holding each point's own
        gradient, one target) into per-example ``accumulators``, weighted by
        ``points.weights``."""
        for index, (accumulator, m) in enumerate(zip(accumulators, self.rows_per_example)):
            kept_rows, _, weights = self._expand(points, m, points.rows)
            examples, _, _ = self._expand(points, m)
            kept = self.accumulators[index].index_select(0, kept_rows.to(self.device))
            ops._unchecked_accumulate_points(accumulator, kept, examples, weights)

    def finish(
        self, multiply_by_inputs: bool, accumulators: list[Tensor] | None = None
    ) -> PathIntegral:
        """The attributions of every target, from the accumulators (by default the engine's,
        one row per example)."""
        attributions: list[tuple[Tensor, ...]] = []
        row_sums: list[Tensor] = []
        accumulators = self.accumulators if accumulators is None else accumulators
        for k in range(self.targets):
            per_tensor, sums = [], None
            for accumulator, end, start, m in zip(
                accumulators, self.ends, self.starts, self.rows_per_example
            ):
                rows = end.shape[0]
                attribution, row_sum = ops._unchecked_quadrature_finish(
                    accumulator[k * rows : (k + 1) * rows], end, start, multiply_by_inputs
                )
                per_tensor.append(attribution)
                if m > 1:  # several rows per example: the example's sum is theirs
                    row_sum = row_sum.reshape(self.batch, m).sum(1)
                sums = row_sum if sums is None else sums + row_sum
            attributions.append(tuple(per_tensor))
            row_sums.append(sums)
        return PathIntegral(attributions, row_sums, self._end_outputs(0.0), self._end_outputs(1.0))


# ----------------------------------------------------------------------------- the methods' side


def integrate(
    ends: tuple[Tensor, ...],
    starts: tuple[Tensor, ...],
    evaluate: Evaluate,
    *,
    batch: int,
    method: str,
    n_steps: int | str,
    multiply_by_inputs: bool,
    targets: int = 1,
    steps_per_chunk: int | None = None,
    adaptive: tuple[float, int] | None = None,
    **engine_options: Any,
) -> tuple[PathIntegral, list[Tensor]]:
    """Integrate the gradients of ``evaluate`` along the straight paths ``starts -> ends``:
    with ``method``'s ``n_steps``-node rule (captum's tables, bit for bit); with
    ``method="exact"``, over the affine pieces of each path (``fastattr._exact``); or, given
    ``adaptive`` (a tolerance and a step cap, for ``n_steps="auto"``), with the points each
    example needs (``fastattr._adaptive``; each target separately). Returns the integral and,
    per target, the gradient evaluations each example took, (B,) int64 on the device.

    With a rule, the path is chunked as captum chunks it wherever the result depends on the
    chunking: a model normalizing with batch statistics gets all steps in one forward (or
    ``steps_per_chunk``, captum's internal_batch_size), and so does a selected output that is
    not one value per row (found at the first chunk, which then starts again).
    """
    device = ends[0].device
    if adaptive is not None or method == EXACT:
        what = "n_steps='auto'" if adaptive is not None else "method='exact'"
        if engine_options.get("whole_steps"):
            raise ValueError(
                f"{what} gives each example its own points: additional_forward_args must "
                "hold one row per example"
            )
        # (method="exact" names the module itself, see fastattr._exact.check_eval_mode.)
        if adaptive is not None and uses_batch_statistics(engine_options.get("model")):
            raise ValueError(
                f"{what} gives each example its own points, which a model normalizing with "
                "the statistics of its batch (batch norm in training mode or without running "
                "statistics) would mix: call model.eval() first"
            )
        try:
            return _integrate_per_example(
                ends,
                starts,
                evaluate,
                batch=batch,
                method=method,
                adaptive=adaptive,
                targets=targets,
                multiply_by_inputs=multiply_by_inputs,
                steps_per_chunk=steps_per_chunk,
                **engine_options,
            )
        except RowsCoupled:
            raise OutputShapeError(
                f"{what} needs the selected output to hold one value per example"
            ) from None
    # On the CPU even for a GPU: the kernels check the tables there and copy them without a
    # synchronization.
    alphas, weights = quadrature_table(method, n_steps)
    whole_path = alphas.numel()
    if steps_per_chunk is None and uses_batch_statistics(engine_options.get("model")):
        steps_per_chunk = whole_path

    def run(steps_per_chunk: int | None) -> PathEngine:
        engine = PathEngine(
            ends,
            starts,
            evaluate,
            batch=batch,
            targets=targets,
            steps_per_chunk=steps_per_chunk,
            **engine_options,
        )
        engine.run(StepMajor(alphas, weights, batch))
        return engine

    try:
        engine = run(steps_per_chunk)
    except RowsCoupled:
        # Found at the first chunk: the whole path again, in one chunk as captum runs it.
        engine = run(whole_path)
    steps = torch.full((batch,), whole_path, dtype=torch.long, device=device)
    return engine.finish(multiply_by_inputs), [steps] * targets


def _integrate_per_example(
    ends: tuple[Tensor, ...],
    starts: tuple[Tensor, ...],
    evaluate: Evaluate,
    *,
    batch: int,
    method: str,
    adaptive: tuple[float, int] | None,
    targets: int,
    multiply_by_inputs: bool,
    **engine_options: Any,
) -> tuple[PathIntegral, list[Tensor]]:
    """``method="exact"`` (its pieces serve every target) or ``n_steps="auto"`` (each target
    its own points)."""
    if adaptive is None:
        from fastattr._exact import integrate_exact

        return integrate_exact(
            ends,
            starts,
            evaluate,
            batch=batch,
            targets=targets,
            multiply_by_inputs=multiply_by_inputs,
            **engine_options,
        )
    from fastattr._adaptive import integrate_adaptive

    tolerance, max_steps = adaptive
    parts = [
        integrate_adaptive(
            ends,
            starts,
            (lambda paths, rows, k=k: [evaluate(paths, rows)[k]]) if targets > 1 else evaluate,
            batch=batch,
            method=method,
            tolerance=tolerance,
            max_steps=max_steps,
            multiply_by_inputs=multiply_by_inputs,
            **engine_options,
        )
        for k in range(targets)
    ]
    results = [result for result, _ in parts]
    ends_known = all(r.start_outputs is not None and r.end_outputs is not None for r in results)
    merged = PathIntegral(
        [a for r in results for a in r.attributions],
        [s for r in results for s in r.row_sums],
        [o for r in results for o in r.start_outputs] if ends_known else None,
        [o for r in results for o in r.end_outputs] if ends_known else None,
    )
    return merged, [steps for _, steps in parts]


def targets_for_points(target: Any, rows: PointRows) -> Any:
    """A target as it applies to the points: per-example targets gathered, others as given."""
    if isinstance(target, list):
        return rows.take_list(target)
    if isinstance(target, ColumnIndices):
        return ColumnIndices(rows.take(target.indices), target.low, target.high)
    return target


def args_for_points(args: tuple[Any, ...] | None, rows: PointRows) -> tuple[Any, ...]:
    """Additional forward arguments for the points: tensors with a batch dimension gathered
    (repeated per step for whole steps), anything else as it is."""
    if args is None:
        return ()
    return tuple(
        rows.take(arg) if isinstance(arg, Tensor) and arg.dim() > 0 else arg for arg in args
    )


def needs_whole_steps(args: tuple[Any, ...] | None, batch: int) -> bool:
    """Whether a tensor argument lacks a batch dimension (it is repeated per step, captum's way,
    which needs chunks of whole steps of the batch)."""
    return any(
        isinstance(arg, Tensor) and arg.dim() > 0 and arg.shape[0] != batch for arg in args or ()
    )


def outputs_per_example(
    forward_func: Callable[..., Any],
    inputs: tuple[Tensor, ...],
    targets: Sequence[Any],
    args: tuple[Any, ...] | None,
) -> list[Tensor]:
    """Each target's selected output summed over all but its first dimension (one row per
    example, or captum's rows of a batch-reducing output), from one forward without a graph
    (captum's delta convention)."""
    with torch.no_grad():
        output = forward_func(*inputs, *(args or ()))
        return [row_sums(select_targets(output, target)) for target in targets]


def convergence_deltas(
    row_sums_: list[Tensor], end_outputs: list[Tensor], start_outputs: list[Tensor]
) -> list[Tensor]:
    """Captum's delta per target: the attributions' sum per example minus the output's change,
    whose rows (one per example, or one for all, as captum broadcasts them) come from the
    forward."""
    deltas = []
    for sums, end_out, start_out in zip(row_sums_, end_outputs, start_outputs):
        change = end_out - start_out
        if change.shape[0] not in (1, sums.shape[0]):
            raise ValueError(
                f"the convergence delta needs one output row per example ({sums.shape[0]}) or "
                f"one in all, got {change.shape[0]} rows from forward_func"
            )
        deltas.append(sums - change)
    return deltas


@dataclass(frozen=True)
class PathOptions:
    """The integration arguments of the IG methods' ``attribute``: how many steps (or
    ``"auto"``, with its tolerance and step cap), the rule and captum's internal batch size."""

    n_steps: Any
    method: str
    internal_batch_size: Any = None
    tolerance: Any = None
    max_steps: Any = None

    def check(self) -> tuple[float, int] | None:
        """Checks the arguments; returns ``(tolerance, max_steps)`` for ``n_steps="auto"``."""
        from fastattr._adaptive import check_auto

        auto, tolerance, max_steps = check_auto(
            self.method, self.n_steps, self.tolerance, self.max_steps
        )
        if not auto:
            # (With "exact" the pieces decide the points: n_steps is not used.)
            if self.method != EXACT:
                check_steps(self.method, self.n_steps)
            return None
        return tolerance, max_steps


def with_extras(attributions: Any, deltas: Tensor | None, steps: Tensor | None) -> Any:
    """An ``attribute`` result: the attributions, then the delta and the steps when asked."""
    extras = [extra for extra in (deltas, steps) if extra is not None]
    return (attributions, *extras) if extras else attributions
