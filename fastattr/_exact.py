"""Exact integrated gradients on piecewise-linear models (``method="exact"``).

A model built of affine operations (linear layers, convolutions, eval-mode batch norm, average
pooling, sums, reshapes) and kinks (ReLU, LeakyReLU, max pooling, ...) is affine on each piece
of the straight path from a baseline to an input (ExactLine: Sotoudeh and Thakur, NeurIPS
2019). Its integrated gradients are then a finite sum: each piece's length times the gradient
inside it, with completeness to float rounding.

The pieces are found in rounds. Each open segment of a path is evaluated at both of its ends in
one forward pass, during which a dispatch mode watches every aten operation on values that
depend on the path:

- an operation that is not piecewise linear is an error naming the module that ran it;
- at a kink, the switch values (pre-activation minus threshold, or the difference of the two
  competing maxima of a pooling window) are compared between the segment's ends. If every
  earlier kink kept its sign along the segment, every earlier operation was affine on it, so
  this kink's inputs are affine too and its crossings are exact linear interpolations between
  the two ends. The first kink (in execution order) whose switch values change sign splits the
  segment at all its crossings; the pieces are checked again in the next round.

A segment whose switch values keep their signs at every kink is affine: a piece. Values within
rounding of a threshold count as on it (no sign), so rounding neither splits a piece nor hides
a crossing that matters beyond rounding. Finally the path engine (``fastattr._path_integral``)
takes the gradient at the middle of every piece, weighted by the piece's length.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

from fastattr import ops
from fastattr._model_state import module_of
from fastattr._path_integral import (
    Evaluate,
    PathEngine,
    PathIntegral,
    PointRows,
    Points,
    chunk_budget,
)

# Switch values within this many units of rounding (of the largest magnitude among the kink's
# inputs at that point) of zero count as zero: rounding must not split pieces.
ROUNDING_UNITS = 32
# Crossings closer than this many units of rounding (in alpha, along the whole path) to a
# segment's end or to each other are merged: such pieces are below what the model resolves.
GAP_UNITS = 16
# How much of a chunk's memory budget one point may take, in units of the bytes its
# activations take: the activations, the kink comparisons' copies, the gradients.
BYTES_PER_ACTIVATION_BYTE = 3
# More rounds than kinks in a forward pass (times this) means something is not what the
# rounds assume, rather than a long path.
ROUNDS_PER_KINK = 8
MIN_ROUNDS = 64

aten = torch.ops.aten


# ------------------------------------------------------------------------------ path points


def _points(
    ends: tuple[Tensor, ...], starts: tuple[Tensor, ...], examples: Tensor, alphas: Tensor
) -> tuple[Tensor, ...]:
    """``start + alpha * (end - start)`` of each point's example, in float64 and rounded once
    to the inputs' dtype."""
    paths = []
    for end, start in zip(ends, starts):
        index = examples.to(end.device)
        end_rows = end.detach()[index].double()
        start_rows = start.detach().expand_as(end)[index].double()
        alpha = alphas.to(end.device).view(-1, *([1] * (end.dim() - 1)))
        paths.append((start_rows + alpha * (end_rows - start_rows)).to(end.dtype))
    return tuple(paths)


# ------------------------------------------------------------------------------------ kinks


class _Segments:
    """The open segments of one forward pass, and the crossings found at their first kink
    whose switch values change sign between their ends."""

    def __init__(
        self, rows: int, row_a: Tensor, row_b: Tensor, alpha_a: Tensor, alpha_b: Tensor, gap: float
    ) -> None:
        self.rows = rows
        self.row_a, self.row_b = row_a, row_b
        self.alpha_a, self.alpha_b = alpha_a, alpha_b
        self.gap = gap
        self.pending = torch.ones_like(row_a, dtype=torch.bool)
        self.pending_index = torch.arange(row_a.numel(), device=row_a.device)
        self.crossing_segments: list[Tensor] = []
        self.crossing_alphas: list[Tensor] = []
        self._kink_segments: list[Tensor] = []
        self._kink_alphas: list[Tensor] = []

    def any_pending(self) -> bool:
        return self.pending_index.numel() > 0

    def by_row(self, value: Tensor, what: str) -> Tensor:
        """``value`` viewed as (rows, per-row shape ...): the points must lie along dimension
        0, each point's values contiguous there (as the model's batch)."""
        if value.dim() == 0 or value.shape[0] % self.rows:
            raise ValueError(
                f"method='exact' needs the path's points along dimension 0 of every kink's "
                f"input; {what} got shape {list(value.shape)} for {self.rows} points"
            )
        return value.unflatten(0, (self.rows, value.shape[0] // self.rows))

    def pending_ends(self) -> tuple[Tensor | None, Tensor, Tensor]:
        """The rows the pending segments need (None: all of them) and, as positions among
        those rows, each pending segment's two ends."""
        ends_a = self.row_a[self.pending_index]
        ends_b = self.row_b[self.pending_index]
        if 2 * ends_a.numel() >= self.rows:
            return None, ends_a, ends_b
        rows, positions = torch.unique(torch.cat([ends_a, ends_b]), return_inverse=True)
        return rows, positions[: ends_a.numel()], positions[ends_a.numel() :]

    def flat_rows(self, value: Tensor, rows: Tensor | None, what: str) -> Tensor:
        """``value``'s values per row, (rows, units), for the given rows (None: all)."""
        flat = self.by_row(value, what).flatten(1)
        return flat if rows is None else flat.index_select(0, rows)

    @staticmethod
    def tolerance(*values: Tensor) -> Tensor:
        """Per row of (rows, units) tensors, how close to zero a switch value counts as zero:
        a few units of rounding of the largest magnitude among them."""
        # (amax and amin run several times faster than aminmax over rows.)
        scale = torch.stack([bound for v in values for bound in (v.amax(1), -v.amin(1))])
        return ROUNDING_UNITS * torch.finfo(values[0].dtype).eps * scale.amax(0)

    def crossings(self, pending: Tensor, value_a: Tensor, value_b: Tensor) -> None:
        """Switch values of strictly opposite signs at the two ends of pending segments
        (``pending`` positions among them): each crosses zero in between, where linear
        interpolation puts it."""
        segment = self.pending_index[pending]
        value_a, value_b = value_a.double(), value_b.double()
        alpha_a, alpha_b = self.alpha_a[segment], self.alpha_b[segment]
        alpha = alpha_a + value_a / (value_a - value_b) * (alpha_b - alpha_a)
        inside = (alpha - alpha_a >= self.gap) & (alpha_b - alpha >= self.gap)
        self._kink_segments.append(segment[inside])
        self._kink_alphas.append(alpha[inside])

    def end_kink(self) -> None:
        """The segments with crossings at this kink split there and are pending no more."""
        if not self._kink_segments:
            return
        segments = torch.cat(self._kink_segments)
        alphas = torch.cat(self._kink_alphas)
        self._kink_segments, self._kink_alphas = [], []
        if segments.numel() == 0:
            return
        self.crossing_segments.append(segments)
        self.crossing_alphas.append(alphas)
        self.pending[segments] = False
        self.pending_index = self.pending.nonzero().squeeze(1)


def _elementwise_kink(
    segments: _Segments, switches: Sequence[Tensor], operands: Sequence[Tensor], what: str
) -> None:
    """Kinks where each element of each switch tensor (an operand minus a threshold, or the
    difference of two operands) is zero."""
    rows, end_a, end_b = segments.pending_ends()
    operand_rows = [segments.flat_rows(o, rows, what) for o in operands]
    tolerance = segments.tolerance(*operand_rows)
    for switch in switches:
        reused = [r for o, r in zip(operands, operand_rows) if o is switch]
        values = reused[0] if reused else segments.flat_rows(switch, rows, what)
        flips = ops._unchecked_kink_flips(values, tolerance, end_a, end_b)
        pending, unit = flips.nonzero(as_tuple=True)
        segments.crossings(pending, values[end_a[pending], unit], values[end_b[pending], unit])
    segments.end_kink()


def _group_max_kink(segments: _Segments, value: Tensor, winners: Tensor, what: str) -> None:
    """Kinks where the winner of a group changes: ``value`` is (rows * k, G, n), groups of n
    competing elements; ``winners`` (rows * k, G, m) indexes into the n the largest element
    of each of m windows (outputs). Where an output's winner differs between a segment's
    ends, the switch is the difference of the two winners."""
    rows, end_a, end_b = segments.pending_ends()
    values = segments.by_row(value, what).flatten(1, 2)
    winners = segments.by_row(winners, what).flatten(1, 2)
    if rows is not None:
        values, winners = values.index_select(0, rows), winners.index_select(0, rows)
    tolerance = segments.tolerance(values.flatten(1))
    winner_a, winner_b = winners.index_select(0, end_a), winners.index_select(0, end_b)
    pending, group, output = (winner_a != winner_b).nonzero(as_tuple=True)
    first, second = winner_a[pending, group, output], winner_b[pending, group, output]
    row_a, row_b = end_a[pending], end_b[pending]
    switch_a = values[row_a, group, first] - values[row_a, group, second]
    switch_b = values[row_b, group, first] - values[row_b, group, second]
    flips = (switch_a > tolerance[row_a]) & (switch_b < -tolerance[row_b])
    segments.crossings(pending[flips], switch_a[flips], switch_b[flips])
    segments.end_kink()


def _scalar(
    args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str, default: Any
) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _relu(segments, func, args, kwargs, what):
    _elementwise_kink(segments, [args[0]], [args[0]], what)


def _leaky_relu(segments, func, args, kwargs, what):
    if _scalar(args, kwargs, 1, "negative_slope", 0.01) != 1:
        _relu(segments, func, args, kwargs, what)


def _thresholds(segments, value, thresholds, what):
    _elementwise_kink(segments, [value - t for t in thresholds if t is not None], [value], what)


def _hardtanh(segments, func, args, kwargs, what):
    low = _scalar(args, kwargs, 1, "min_val", -1.0)
    high = _scalar(args, kwargs, 2, "max_val", 1.0)
    _thresholds(segments, args[0], [low, high], what)


def _clamp(segments, func, args, kwargs, what):
    low = _scalar(args, kwargs, 1, "min", None)
    high = _scalar(args, kwargs, 2, "max", None)
    _thresholds(segments, args[0], [low, high], what)


def _clamp_one_side(segments, func, args, kwargs, what):
    if isinstance(args[1], Tensor):
        _pairwise(segments, func, args, kwargs, what)
    else:
        _thresholds(segments, args[0], [args[1]], what)


def _pairwise(segments, func, args, kwargs, what):
    first, second = torch.broadcast_tensors(args[0], args[1])
    _elementwise_kink(segments, [first - second], [first, second], what)


def _max_pool(segments: _Segments, value: Tensor, indices: Tensor, spatial: int, what: str) -> None:
    if value.dim() != spatial + 2:
        raise ValueError(
            f"method='exact' needs batched input at {what}, got shape {list(value.shape)}"
        )
    _group_max_kink(segments, value.flatten(2), indices.flatten(2), what)


def _reduction_max(
    segments: _Segments, value: Tensor, dims: Sequence[int], keepdim: bool, largest: bool, what: str
) -> None:
    """``value.amax(dims)`` (or amin): the winner of each reduced group."""
    dims = sorted({d % value.dim() for d in dims} if dims else range(value.dim()))
    if 0 in dims:
        raise ValueError(
            f"method='exact' can't attribute {what}: it reduces over dimension 0, which holds "
            "the path's points"
        )
    kept = [d for d in range(value.dim()) if d not in dims]
    grouped = value.permute(*kept, *dims).flatten(len(kept))
    grouped = grouped.flatten(1, -2) if grouped.dim() > 2 else grouped.unsqueeze(1)
    signed = grouped if largest else -grouped
    winners = signed.argmax(-1, keepdim=True)
    _group_max_kink(segments, signed, winners, what)


def _max_dim(segments, func, args, kwargs, what):
    dim = _scalar(args, kwargs, 1, "dim", None)
    _reduction_max(segments, args[0], [dim], False, func.overloadpacket is aten.max, what)


def _amax(segments, func, args, kwargs, what):
    dims = _scalar(args, kwargs, 1, "dim", [])
    _reduction_max(segments, args[0], list(dims), False, func.overloadpacket is aten.amax, what)


# Kinks: (rule, recorded before the op runs). Rules of pooling ops take the op's output too.
_KINKS: dict[Any, Callable[..., None]] = {
    aten.relu: _relu,
    aten.relu_: _relu,
    aten.leaky_relu: _leaky_relu,
    aten.leaky_relu_: _leaky_relu,
    aten.hardtanh: _hardtanh,
    aten.hardtanh_: _hardtanh,
    aten.clamp: _clamp,
    aten.clamp_: _clamp,
    aten.clamp_min: _clamp_one_side,
    aten.clamp_min_: _clamp_one_side,
    aten.clamp_max: _clamp_one_side,
    aten.clamp_max_: _clamp_one_side,
    aten.abs: _relu,
    aten.abs_: _relu,
    aten.maximum: _pairwise,
    aten.minimum: _pairwise,
    aten.fmax: _pairwise,
    aten.fmin: _pairwise,
    aten._prelu_kernel: _relu,
    aten.amax: _amax,
    aten.amin: _amax,
}
# Max pooling (with the winners' indices) and how many spatial dimensions it pools. (The
# other max pooling ops decompose into these before they reach a dispatch mode.)
_MAX_POOLS = {
    aten.max_pool2d_with_indices: 2,
    aten.max_pool3d_with_indices: 3,
    aten.adaptive_max_pool2d: 2,
    aten.adaptive_max_pool3d: 3,
}

# Affine in the path's values, whichever of the operands depend on it.
_AFFINE = {
    aten.add, aten.add_, aten.sub, aten.sub_, aten.rsub, aten.neg, aten.neg_, aten.sum,
    aten.mean, aten.cumsum, aten.cat, aten.stack, aten.view, aten._unsafe_view,
    aten._reshape_alias, aten.permute, aten.transpose, aten.transpose_, aten.t, aten.t_,
    aten.expand, aten.squeeze, aten.squeeze_, aten.unsqueeze, aten.unsqueeze_, aten.select,
    aten.slice, aten.split, aten.split_with_sizes, aten.unbind,
    aten.clone, aten._to_copy, aten.copy_, aten.alias, aten.detach, aten.lift_fresh,
    aten.as_strided, aten.diagonal, aten.unfold, aten.im2col, aten.col2im, aten.roll,
    aten.flip, aten.repeat, aten.constant_pad_nd, aten.reflection_pad1d, aten.reflection_pad2d,
    aten.reflection_pad3d, aten.replication_pad1d, aten.replication_pad2d,
    aten.replication_pad3d, aten.avg_pool1d, aten.avg_pool2d, aten.avg_pool3d,
    aten.adaptive_avg_pool1d, aten._adaptive_avg_pool2d, aten._adaptive_avg_pool3d,
    aten.upsample_nearest1d, aten.upsample_nearest2d, aten.upsample_nearest3d,
    aten._upsample_nearest_exact1d, aten._upsample_nearest_exact2d,
    aten._upsample_nearest_exact3d, aten.upsample_linear1d, aten.upsample_bilinear2d,
    aten.upsample_trilinear3d, aten.upsample_bicubic2d, aten.pixel_shuffle,
    aten.pixel_unshuffle, aten.channel_shuffle, aten.slice_scatter, aten.select_scatter,
    aten.diagonal_scatter, aten.fill_, aten.zero_,
}  # fmt: skip
# Linear in each of the operands at these positions: affine when at most one depends on the
# path.
_PRODUCTS = {
    aten.mul: (0, 1), aten.mul_: (0, 1), aten.mm: (0, 1), aten.addmm: (1, 2),
    aten.addmm_: (1, 2), aten.bmm: (0, 1), aten.baddbmm: (1, 2), aten.mv: (0, 1),
    aten.addmv: (1, 2), aten.dot: (0, 1), aten.linear: (0, 1), aten.convolution: (0, 1),
    aten._convolution: (0, 1),
}  # fmt: skip
# Affine in the operand at position 0 when the operands at these positions do not depend on
# the path (divisors, normalization statistics and scales, indices, masks, conditions).
_CONSTANT_OPERANDS = {
    aten.div: (1,), aten.div_: (1,), aten.gather: (2,), aten.index: (1,),
    aten._unsafe_index: (1,), aten.index_select: (2,), aten.index_put: (1,),
    aten.index_put_: (1,), aten.masked_fill: (1,), aten.masked_fill_: (1,),
    aten.scatter: (2,), aten.scatter_add: (2,), aten.index_add: (2,), aten.take: (1,),
    aten.embedding: (1,), aten.where: (0,),
    aten.native_batch_norm: (1, 2, 3, 4), aten._native_batch_norm_legit: (1, 2, 3, 4),
    aten._native_batch_norm_legit_no_training: (1, 2, 3, 4), aten.cudnn_batch_norm: (1, 2, 3, 4),
    aten.miopen_batch_norm: (1, 2, 3, 4), aten._batch_norm_no_update: (1, 2, 3, 4),
}  # fmt: skip
# Batch norm with its ``training`` flag at this position: batch statistics couple the points.
_BATCH_NORMS = {
    aten.native_batch_norm: 5, aten._native_batch_norm_legit: 5, aten.cudnn_batch_norm: 5,
    aten.miopen_batch_norm: 5,
}  # fmt: skip
# Their outputs do not depend on the values of their operands.
_VALUE_FREE = {
    aten.zeros_like, aten.ones_like, aten.empty_like, aten.full_like, aten.new_zeros,
    aten.new_ones, aten.new_empty, aten.new_full, aten.new_empty_strided, aten.rand_like,
    aten.randn_like, aten.randint_like,
}  # fmt: skip


def _caller(model: Any) -> str:
    """The innermost module (by its name in ``model``) and the source line outside torch and
    fastattr that led to the operation now running."""
    root = module_of(model)
    names = {} if root is None else {id(m): name for name, m in root.named_modules()}
    torch_dir = os.path.dirname(torch.__file__)
    fastattr_dir = os.path.dirname(__file__)
    bench_dir = os.path.join(fastattr_dir, "bench")
    module = location = None
    frame = sys._getframe(1)
    while frame is not None and (module is None or location is None):
        filename = frame.f_code.co_filename
        ours = filename.startswith((torch_dir, fastattr_dir)) and not filename.startswith(bench_dir)
        if location is None and not ours:
            location = f"{filename}:{frame.f_lineno}"
        candidate = frame.f_locals.get("self") if module is None else None
        if isinstance(candidate, nn.Module):
            module = candidate
        frame = frame.f_back
    parts = []
    if module is not None:
        name = names.get(id(module))
        label = type(module).__name__
        if name is None:
            parts.append(f"a {label} module")
        elif name == "":
            parts.append(f"the model ({label})")
        else:
            parts.append(f"module {name!r} ({label})")
    if location is not None:
        parts.append(f"at {location}")
    return ", ".join(parts) or "the forward function"


# torch.utils._python_dispatch is private, its TorchDispatchMode the documented way to see aten
# ops: each once, with func.overloadpacket and func.__name__, views with their _base
# (tests/test_torch_private_api.py; checked on torch 2.13 and 2.14).
class _PathOperations(TorchDispatchMode):
    """Follows which tensors depend on the path (from the points through every aten op),
    checks that every op on them is piecewise linear, and hands kinks to ``segments``."""

    def __init__(self, points: tuple[Tensor, ...], segments: _Segments, model: Any) -> None:
        super().__init__()
        self._on_path = WeakIdKeyDictionary()
        for point in points:
            self._on_path[point] = True
        self._segments = segments
        self._model = model
        self.kinks = 0
        self.activation_bytes = 0
        self._storages: set[int] = set()

    def _depends(self, value: Any) -> bool:
        if isinstance(value, Tensor):
            base = value._base
            return value in self._on_path or (base is not None and base in self._on_path)
        if isinstance(value, (list, tuple)):
            return any(self._depends(v) for v in value)
        return False

    def _mark(self, value: Any) -> None:
        if isinstance(value, (list, tuple)):
            for item in value:
                self._mark(item)
        elif isinstance(value, Tensor):
            self._on_path[value] = True
            if value._base is not None:  # a view written to: its base depends on the path now
                self._on_path[value._base] = True
            storage = value.untyped_storage()
            if storage.data_ptr() not in self._storages:
                self._storages.add(storage.data_ptr())
                self.activation_bytes += storage.nbytes()

    def _refuse(self, func: Any, why: str) -> ValueError:
        return ValueError(
            f"method='exact' needs a piecewise-linear model, but {_caller(self._model)} "
            f"applies {func} to values that depend on the input: {why}. Models built of "
            "Linear, Conv, ReLU, LeakyReLU, MaxPool, AvgPool, eval-mode BatchNorm, Flatten, "
            "residual sums and similar are piecewise linear; use a quadrature method for "
            "this one"
        )

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not any(self._depends(a) for a in (*args, *kwargs.values())):
            return func(*args, **kwargs)
        packet = func.overloadpacket
        what = f"{func}"
        if packet in (aten.max, aten.min):
            if func.__name__.split(".")[-1] in ("other", "binary"):
                packet = aten.maximum if packet is aten.max else aten.minimum
            elif func.__name__.split(".")[-1] != "dim":
                raise self._refuse(func, "it reduces over the path's points (dimension 0)")
        if packet in _VALUE_FREE:
            return func(*args, **kwargs)
        if packet in _BATCH_NORMS and _scalar(
            args, kwargs, _BATCH_NORMS[packet], "training", False
        ):
            raise self._refuse(
                func,
                "batch norm in training mode normalizes with the statistics of the "
                "batch, coupling the path's points; call model.eval()",
            )
        if packet is aten.bernoulli or (
            packet is aten.native_dropout and _scalar(args, kwargs, 2, "train", True)
        ):
            raise self._refuse(func, "dropout in training mode is random; call model.eval()")
        if packet is aten.div and (
            kwargs.get("rounding_mode") is not None or func.__name__.endswith("mode")
        ):
            raise self._refuse(func, "rounding division is not continuous")

        if packet in _KINKS or packet is aten.max or packet is aten.min:
            self.kinks += 1
            if self._segments.any_pending():
                rule = _max_dim if packet in (aten.max, aten.min) else _KINKS[packet]
                rule(self._segments, func, args, kwargs, what)
            output = func(*args, **kwargs)
            self._mark(output[0] if isinstance(output, tuple) else output)
            return output
        if packet in _MAX_POOLS:
            self.kinks += 1
            values, indices = func(*args, **kwargs)
            if self._segments.any_pending():
                _max_pool(self._segments, args[0], indices, _MAX_POOLS[packet], what)
            self._mark(values)
            return values, indices
        if packet in _PRODUCTS:
            if sum(self._depends(args[i]) for i in _PRODUCTS[packet] if i < len(args)) > 1:
                raise self._refuse(func, "it multiplies two values that depend on the input")
        elif packet in _CONSTANT_OPERANDS:
            for i in _CONSTANT_OPERANDS[packet]:
                if i < len(args) and self._depends(args[i]):
                    raise self._refuse(
                        func,
                        f"its operand {i} (a divisor, normalization statistic, index, "
                        "mask or condition) depends on the input",
                    )
        elif packet not in _AFFINE:
            raise self._refuse(
                func, "it is not piecewise linear (or not an operation method='exact' knows to be)"
            )
        output = func(*args, **kwargs)
        self._mark(output)
        # In-place ops (named with a trailing underscore) write their first operand; out=
        # variants their output.
        if packet.__name__.endswith("_"):
            self._mark(args[0])
        self._mark(kwargs.get("out"))
        return output


def check_eval_mode(model: Any) -> None:
    """Batch norm and dropout modules in training mode: refused before any forward pass
    (which would count a batch in their statistics)."""
    root = module_of(model)
    if root is None:
        return
    batch_norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    dropouts = (
        nn.Dropout,
        nn.Dropout1d,
        nn.Dropout2d,
        nn.Dropout3d,
        nn.AlphaDropout,
        nn.FeatureAlphaDropout,
    )
    for name, module in root.named_modules():
        if not module.training:
            continue
        label = f"module {name!r} ({type(module).__name__})" if name else "the model"
        if isinstance(module, batch_norms):
            raise ValueError(
                f"method='exact' needs batch norm in eval mode: {label} is in training mode, "
                "where batch statistics couple the path's points; call model.eval()"
            )
        if isinstance(module, dropouts) and module.p > 0:
            raise ValueError(
                f"method='exact' needs dropout in eval mode: {label} is in training mode, "
                "where it is random; call model.eval()"
            )


# ----------------------------------------------------------------------------------- pieces


@dataclass
class _Pieces:
    examples: Tensor  # (P,) int64, sorted, with the pieces of each example in path order
    starts: Tensor  # (P,) float64 alphas
    stops: Tensor
    start_output: Tensor  # (K, B) the model's output per target at alpha 0 and 1
    end_output: Tensor


def _points_needed(examples: Tensor, starts: Tensor, stops: Tensor) -> Tensor:
    """For each segment, how many points the segments up to it take (two segments that meet
    share their point)."""
    new_start = torch.ones_like(examples)
    if examples.numel() > 1:
        meets = (examples[1:] == examples[:-1]) & (starts[1:] == stops[:-1])
        new_start[1:] = (~meets).long()
    return torch.cumsum(new_start + 1, 0)


def _split(
    examples: Tensor, starts: Tensor, stops: Tensor, segments: Tensor, alphas: Tensor, gap: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The children of split segments (``segments`` index them; ``alphas`` the crossings),
    in path order, crossings closer than ``gap`` to the previous one dropped."""
    split = torch.unique(segments)
    points_segment = torch.cat([segments, split, split])
    points_alpha = torch.cat([alphas, starts[split], stops[split]])
    order = torch.argsort(points_alpha, stable=True)
    order = order[torch.argsort(points_segment[order], stable=True)]
    points_segment, points_alpha = points_segment[order], points_alpha[order]
    keep = torch.ones_like(points_alpha, dtype=torch.bool)
    keep[1:] = (points_segment[1:] != points_segment[:-1]) | (
        points_alpha[1:] - points_alpha[:-1] >= gap
    )
    points_segment, points_alpha = points_segment[keep], points_alpha[keep]
    pair = points_segment[1:] == points_segment[:-1]
    return examples[points_segment[:-1][pair]], points_alpha[:-1][pair], points_alpha[1:][pair]


class _Splitter:
    """Runs the rounds: one forward pass (in chunks) over the ends of every open segment,
    then each segment is either a piece or split into the next round's segments."""

    def __init__(
        self,
        ends: tuple[Tensor, ...],
        starts: tuple[Tensor, ...],
        evaluate: Evaluate,
        rows_per_chunk: int | None,
        model: Any,
    ) -> None:
        self.ends, self.starts, self.evaluate, self.model = ends, starts, evaluate, model
        self.rows_per_chunk = rows_per_chunk
        self.device = ends[0].device
        self.gap = GAP_UNITS * torch.finfo(ends[0].dtype).eps
        batch = ends[0].shape[0]
        self.start_output: Tensor | None = None
        self.end_output: Tensor | None = None
        self.kinks: int | None = None
        self.pieces: list[tuple[Tensor, Tensor, Tensor]] = []
        self.children: list[tuple[Tensor, Tensor, Tensor]] = []
        self.batch = batch

    def run_chunk(self, examples: Tensor, starts: Tensor, stops: Tensor) -> None:
        count = examples.numel()
        keys = torch.stack(
            [torch.cat([examples, examples]).double(), torch.cat([starts, stops])], 1
        )
        points, inverse = torch.unique(keys, dim=0, return_inverse=True)
        point_examples, point_alphas = points[:, 0].long(), points[:, 1]
        segments = _Segments(
            points.shape[0],
            inverse[:count].to(self.device),
            inverse[count:].to(self.device),
            starts.to(self.device),
            stops.to(self.device),
            self.gap,
        )
        paths = _points(self.ends, self.starts, point_examples, point_alphas)
        mode = _PathOperations(paths, segments, self.model)
        index = point_examples.to(self.device)
        with torch.no_grad(), mode:
            outputs = torch.stack(
                list(self.evaluate(paths, PointRows(point_examples, self.batch, None)))
            )
        if self.start_output is None:
            self.start_output = outputs.new_zeros(outputs.shape[0], self.batch)
            self.end_output = outputs.new_zeros(outputs.shape[0], self.batch)
        at_start, at_end = (point_alphas == 0).to(self.device), (point_alphas == 1).to(self.device)
        self.start_output[:, index[at_start]] = outputs[:, at_start]
        self.end_output[:, index[at_end]] = outputs[:, at_end]
        if self.rows_per_chunk is None:
            per_point = max(1, mode.activation_bytes // points.shape[0])
            budget = chunk_budget(self.device) // BYTES_PER_ACTIVATION_BYTE
            self.rows_per_chunk = max(2, budget // per_point)
        if self.kinks is None:
            self.kinks = mode.kinks
        pending = segments.pending.cpu()
        self.pieces.append((examples[pending], starts[pending], stops[pending]))
        if segments.crossing_segments:
            self.children.append(
                _split(
                    examples, starts, stops,
                    torch.cat(segments.crossing_segments).cpu(),
                    torch.cat(segments.crossing_alphas).cpu(),
                    self.gap,
                )
            )  # fmt: skip

    def run_round(self, examples: Tensor, starts: Tensor, stops: Tensor) -> None:
        position, total = 0, examples.numel()
        needed = None
        while position < total:
            if self.rows_per_chunk is None:
                stop = position + 1  # while the chunk size is unknown: one segment, measured
            else:
                if needed is None:
                    needed = _points_needed(examples, starts, stops)
                before = int(needed[position - 1]) if position else 0
                limit = torch.tensor([before + self.rows_per_chunk])
                stop = max(position + 1, int(torch.searchsorted(needed, limit, right=True)))
            self.run_chunk(examples[position:stop], starts[position:stop], stops[position:stop])
            position = stop

    def run(self) -> _Pieces:
        examples = torch.arange(self.batch)
        starts = torch.zeros(self.batch, dtype=torch.float64)
        stops = torch.ones(self.batch, dtype=torch.float64)
        rounds = 0
        while examples.numel():
            rounds += 1
            if self.kinks is not None and rounds > MIN_ROUNDS + ROUNDS_PER_KINK * self.kinks:
                raise RuntimeError(
                    f"method='exact' did not finish splitting the path after {rounds - 1} rounds; "
                    "an operation of the model may not be what it appears to be"
                )
            self.children = []
            self.run_round(examples, starts, stops)
            if not self.children:
                break
            examples, starts, stops = (torch.cat(parts) for parts in zip(*self.children))
        examples, starts, stops = (torch.cat(parts) for parts in zip(*self.pieces))
        order = torch.argsort(starts, stable=True)
        order = order[torch.argsort(examples[order], stable=True)]
        assert self.start_output is not None and self.end_output is not None
        return _Pieces(
            examples[order], starts[order], stops[order], self.start_output, self.end_output
        )


# -------------------------------------------------------------------------------- gradients


def integrate_exact(
    ends: tuple[Tensor, ...],
    starts: tuple[Tensor, ...],
    evaluate: Evaluate,
    *,
    batch: int,
    targets: int,
    multiply_by_inputs: bool,
    steps_per_chunk: int | None = None,
    model: Any = None,
    **engine_options: Any,
) -> tuple[PathIntegral, list[Tensor]]:
    """Integrated gradients of ``evaluate`` (the path engine's: one value per point and
    target) along the straight paths ``starts -> ends``, exactly, for a piecewise-linear
    ``evaluate``: the pieces are found once for every target, then the engine takes one
    gradient per piece. Returns the integral and, per target, the pieces of each example's
    path, (B,) int64 on the device.

    ``steps_per_chunk`` (captum's internal_batch_size over the batch) bounds the points per
    forward pass (at least 2: a segment's two ends); None sizes the chunks from free memory,
    measured on the first forward pass.
    """
    rows = None if steps_per_chunk is None else max(2, steps_per_chunk * batch)
    # (The engine refuses inference mode.)
    engine = PathEngine(
        ends,
        starts,
        evaluate,
        batch=batch,
        targets=targets,
        model=model,
        steps_per_chunk=steps_per_chunk,
        **engine_options,
    )
    check_eval_mode(model)
    if batch == 0:
        pieces = torch.zeros(0, dtype=torch.long, device=ends[0].device)
        return engine.finish(multiply_by_inputs), [pieces] * targets
    found = _Splitter(ends, starts, evaluate, rows, model).run()
    widths = found.stops - found.starts
    engine.run(Points(found.examples, (found.starts + found.stops) / 2, widths))
    result = engine.finish(multiply_by_inputs)
    result.start_outputs = list(found.start_output.unbind(0))
    result.end_outputs = list(found.end_output.unbind(0))
    pieces = torch.bincount(found.examples, minlength=batch).to(ends[0].device)
    return result, [pieces] * targets
