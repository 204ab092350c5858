"""NoiseTunnel: captum's API and noise; around the integrated-gradients methods, the noisy
copies stream through the path engine a group at a time, so memory stays bounded."""

from __future__ import annotations

import functools
import math
import numbers
import sys
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fastattr._formatting import as_int, baseline_tuple, check_target, format_additional_args
from fastattr._path_integral import chunk_budget
from fastattr.attr._base import Attribution, PathAttribution

NT_TYPES = ("smoothgrad", "smoothgrad_sq", "vargrad")
# A group's noisy copies are sized so that their points fill at least a chunk of the path
# engine: a point keeps its path row, its gradient and more, so a chunk holds at most the
# budget over this many path rows.
_ROWS_PER_POINT = 3
# CPU normal_ fills in blocks of 16 values: pieces of a draw come out bit for bit as the
# whole draw when every piece but the last holds a multiple of 16 values and the last at
# least 16 (checked at run time, see _pieces_match_whole_draws).
_NORMAL_BLOCK = 16
# Values drawn (and dropped) at a time when walking a generator past a draw.
_WALK_PIECE = 1 << 22


# ----------------------------------------------------------------------------- the noise


@functools.cache
def _pieces_match_whole_draws(dtype: torch.dtype) -> bool:
    """Whether this torch draws CPU noise in pieces exactly as in one call (captum's), for
    ``dtype``: checked once, on a private generator."""
    std = torch.tensor(0.5, dtype=dtype)
    for sizes in ((48, 35), (16, 32, 16), (32, 17)):
        generator = torch.Generator().manual_seed(12345)
        whole = torch.normal(0, std.repeat(sum(sizes)), generator=generator)
        state = generator.get_state()
        generator.manual_seed(12345)
        pieces = torch.cat([_standard_normal(n, dtype, generator, "cpu") * std for n in sizes])
        if not torch.equal(whole, pieces) or not torch.equal(state, generator.get_state()):
            return False
    return True


def _standard_normal(
    count: int, dtype: torch.dtype, generator: torch.Generator | None, device: torch.device | str
) -> Tensor:
    return torch.empty(count, dtype=dtype, device=device).normal_(0, 1, generator=generator)


class _NoiseDraw:
    """The noise captum draws for one input in one partition, ``torch.normal(0, stdev)`` of
    ``(rows, *row_shape)`` values in the default dtype from the device's default generator,
    handed out a block of rows at a time, in order.

    On the CPU (where pieces are proven to match) the blocks are drawn as they are asked
    for, from a generator at the draw's start state; elsewhere the draw is made whole, as
    captum makes it, and sliced.
    """

    def __init__(
        self,
        rows: int,
        row_shape: tuple[int, ...],
        stdev: float,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.rows, self.row_shape, self.device, self.dtype = rows, row_shape, device, dtype
        self.row_size = math.prod(row_shape)
        self.std = torch.tensor(stdev, dtype=dtype, device=device)
        self.numel = rows * self.row_size
        self.streamed = (
            device.type == "cpu"
            and self.numel >= _NORMAL_BLOCK
            and _pieces_match_whole_draws(dtype)
        )
        self.generator: torch.Generator | None = None
        self.whole: Tensor | None = None
        self.next_row = 0

    def start(self) -> None:
        """Begins the draw where the device's default generator stands, and moves that
        generator past it, as captum's call would (when streamed, by walking through the draw
        in pieces that are not kept)."""
        generator = _default_generator(self.device)
        if not self.streamed:
            self.whole = torch.normal(0, self.std.repeat(self.rows, *self.row_shape))
            return
        state = generator.get_state()
        self.generator = torch.Generator().set_state(state)
        walker = torch.Generator().set_state(state)
        low = 0
        while low < self.numel:
            count = min(_WALK_PIECE, self.numel - low)
            if self.numel - low - count < _NORMAL_BLOCK:
                count = self.numel - low  # the last piece takes the tail whole
            _standard_normal(count, self.dtype, walker, "cpu")
            low += count
        generator.set_state(walker.get_state())

    def take(self, rows: int) -> Tensor:
        """The next ``rows`` rows of the draw."""
        low = self.next_row
        self.next_row += rows
        if self.whole is not None:
            return self.whole[low : low + rows]
        count = rows * self.row_size
        noise = _standard_normal(count, self.dtype, self.generator, "cpu")
        return noise.mul_(self.std).add_(0).view(rows, *self.row_shape)


def _note_promotion(
    error: BaseException, inputs: tuple[Tensor, ...], noisy: tuple[Tensor, ...]
) -> None:
    """Adds to an error of the wrapped method why the noisy inputs have another dtype than the
    inputs (a half-precision model then fails on float32 inputs, token ids made floating
    point fail in the embedding, in captum too), and what to do. (Exception notes exist from
    Python 3.11.)"""
    promoted = [(x.dtype, n.dtype) for x, n in zip(inputs, noisy) if x.dtype != n.dtype]
    if not promoted or not hasattr(error, "add_note"):
        return
    ours, theirs = promoted[0]
    if ours.is_floating_point:
        advice = f"For noise in {ours}, call it under torch.set_default_dtype({ours})."
    else:  # no default dtype is an integer one
        advice = (
            "Integer inputs such as token ids take no noise: add it to their embeddings "
            "instead, with NoiseTunnel around IntegratedGradients on the embedding vectors "
            "(HuggingFace models take them as inputs_embeds)."
        )
    error.add_note(
        "NoiseTunnel draws the noise in the default dtype, as captum does: added to "
        f"{ours} inputs it made them {theirs}. {advice}"
    )


def _is_captum_gradient(method: Any) -> bool:
    """Whether ``method`` is one of captum's gradient methods (captum is not imported here:
    only a captum already loaded can have made it)."""
    captum_attr = sys.modules.get("captum.attr")
    gradient = getattr(captum_attr, "GradientAttribution", None)
    return gradient is not None and isinstance(method, gradient)


def _default_generator(device: torch.device) -> torch.Generator:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.default_generators[index]
    return torch.default_generator


def _alignment(draws: list[_NoiseDraw]) -> int:
    """Rows per group boundary such that every streamed draw splits on whole 16-blocks."""
    step = 1
    for draw in draws:
        if draw.streamed:
            step = math.lcm(step, _NORMAL_BLOCK // math.gcd(draw.row_size, _NORMAL_BLOCK))
    return step


def _groups(rows: int, size: int, draws: list[_NoiseDraw]) -> Iterator[tuple[int, int]]:
    """[low, high) blocks of ``rows``, ``size`` each (aligned for the draws); the last block
    big enough that each streamed draw's last piece holds a whole 16-block."""
    step = _alignment(draws)
    size = max(step, -(-size // step) * step)
    least = max((-(-_NORMAL_BLOCK // d.row_size) for d in draws if d.streamed), default=1)
    if rows == 0:
        yield 0, 0  # an empty batch: one call, which gives the result's shape
    low = 0
    while low < rows:
        high = min(rows, low + size)
        if 0 < rows - high < least:
            high = rows
        yield low, high
        low = high


# ----------------------------------------------------------------------------- results


def _flatten(result: Any) -> tuple[list[Tensor], Callable[[list[Tensor]], Any]]:
    """A method's attributions (a tensor, a tuple, or a list of those) as a flat list, and
    the function that gives the same structure back."""
    if isinstance(result, Tensor):
        return [result], lambda flat: flat[0]
    if isinstance(result, tuple):
        return list(result), tuple
    if isinstance(result, list):
        parts = [_flatten(item) for item in result]
        sizes = [len(flat) for flat, _ in parts]

        def rebuild(flat: list[Tensor]) -> list[Any]:
            out, low = [], 0
            for (_, rebuild_part), size in zip(parts, sizes):
                out.append(rebuild_part(flat[low : low + size]))
                low += size
            return out

        return [t for flat, _ in parts for t in flat], rebuild
    raise TypeError(
        f"the attribution method returned {type(result).__name__}: NoiseTunnel averages "
        "tensors, tuples of tensors or lists of those"
    )


# ----------------------------------------------------------------------------- the class


class NoiseTunnel(Attribution, captum_class="NoiseTunnel"):
    """SmoothGrad, SmoothGrad-squared and VarGrad, as ``captum.attr.NoiseTunnel``.

    Each example is attributed ``nt_samples`` times with Gaussian noise added to the inputs,
    and the attributions are averaged (``smoothgrad``), their squares averaged
    (``smoothgrad_sq``), or their variance taken (``vargrad``). The noise is captum's: the
    same draws from the same generator in the same order, so with the same seed the results
    equal captum's NoiseTunnel around the same method to float64 rounding.

    Around fastattr's integrated-gradients methods the noisy copies are not all made at once:
    they go through the path engine a group at a time (each group's points fill at least one
    chunk), so memory is bounded by a chunk whatever ``nt_samples``, the batch or ``n_steps``,
    with no need for ``nt_samples_batch_size`` or ``internal_batch_size``. On the CPU the
    noise itself is drawn a group at a time too (torch fills normal noise in blocks of 16
    values, so pieces cut on whole blocks give captum's draws bit for bit; this is checked
    once at run time). On a GPU each partition's noise (``nt_samples_batch_size`` samples per
    example, all by default) is drawn whole, as captum draws it: the inputs' size times the
    samples, not times the steps. Around other methods (LRP, LayerLRP) noise samples are
    batched as captum batches them, ``nt_samples_batch_size`` at a time.

    Args:
        attribution_method: the attribution object to smooth, e.g.
            ``IntegratedGradients(model)``.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from fastattr import IntegratedGradients, NoiseTunnel
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
        >>> nt = NoiseTunnel(IntegratedGradients(model))
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> smooth = nt.attribute(torch.randn(2, 4), nt_samples=8, stdevs=0.1, target=0)
        >>> smooth.shape
        torch.Size([2, 4])
    """

    def __init__(self, attribution_method: Any) -> None:
        for member in ("attribute", "has_convergence_delta", "forward_func"):
            if not hasattr(attribution_method, member):
                raise TypeError(
                    "attribution_method must be an attribution object (with attribute, "
                    f"has_convergence_delta and forward_func), got "
                    f"{type(attribution_method).__name__}"
                )
        super().__init__(attribution_method.forward_func)
        self.attribution_method = attribution_method
        self.is_delta_supported = bool(attribution_method.has_convergence_delta())
        self._multiply_by_inputs = bool(getattr(attribution_method, "multiplies_by_inputs", False))
        # captum's test is isinstance(method, GradientAttribution); every fastattr method is one.
        self.is_gradient_method = isinstance(
            attribution_method, Attribution
        ) or _is_captum_gradient(attribution_method)

    @property
    def multiplies_by_inputs(self) -> bool:
        """Whether the wrapped method multiplies by its inputs."""
        return self._multiply_by_inputs

    def has_convergence_delta(self) -> bool:
        """Whether the wrapped method gives a convergence delta.

        Returns:
            The wrapped method's ``has_convergence_delta()``.
        """
        return self.is_delta_supported

    def attribute(
        self,
        inputs: Tensor | tuple[Tensor, ...],
        nt_type: str = "smoothgrad",
        nt_samples: int = 5,
        nt_samples_batch_size: int | None = None,
        stdevs: float | tuple[float, ...] = 1.0,
        draw_baseline_from_distrib: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Attribute noisy copies of ``inputs`` with the wrapped method and combine them.

        Args:
            inputs: a tensor or a tuple of tensors, examples along dimension 0.
            nt_type: ``"smoothgrad"`` (the mean of the samples' attributions, default),
                ``"smoothgrad_sq"`` (the mean of their squares) or ``"vargrad"`` (their
                variance).
            nt_samples: noisy copies per example. Default: 5.
            nt_samples_batch_size: how many of an example's copies captum draws and
                attributes together (its partitions). The draws follow it, so that results
                equal captum's for the same seed; around fastattr's integrated-gradients
                methods memory does not depend on it. None (default): all at once.
            stdevs: the standard deviation of the noise, one number for every input or a
                tuple with one per input tensor. Default: 1.0.
            draw_baseline_from_distrib: draw each copy's baseline at random (numpy's global
                generator, as captum) from the rows of the ``baselines`` given.
            **kwargs: the wrapped method's further ``attribute`` arguments (``target``,
                ``baselines``, ``additional_forward_args``, ``n_steps``,
                ``return_convergence_delta``, ...); per-example ones follow their example's
                copies.

        Returns:
            The combined attributions, shaped as the wrapped method's; with
            ``return_convergence_delta=True`` (for a method that has a delta), also the
            deltas of every noisy copy, ``nt_samples * B`` of them in captum's order.

        Raises:
            ValueError: ``nt_type``, ``nt_samples``, ``nt_samples_batch_size``, ``stdevs``,
                the baselines for ``draw_baseline_from_distrib`` or a per-example ``target``
                (not one entry per example) are not valid.
            TypeError: ``inputs`` are not tensors, a count is not an int, or ``target`` is of
                a type no method takes.
        """
        is_tuple = isinstance(inputs, tuple)
        inputs = inputs if is_tuple else (inputs,)
        if not inputs or not all(isinstance(x, Tensor) and x.dim() > 0 for x in inputs):
            raise TypeError("inputs must be a tensor or a non-empty tuple of tensors, each batched")
        if nt_type not in NT_TYPES:
            raise ValueError(f"nt_type must be one of {NT_TYPES}, got {nt_type!r}")
        nt_samples = as_int(nt_samples, "nt_samples")
        if nt_samples < 1:
            raise ValueError(f"nt_samples must be at least 1, got {nt_samples}")
        per_partition = nt_samples
        if nt_samples_batch_size is not None:
            per_partition = as_int(nt_samples_batch_size, "nt_samples_batch_size", "an int or None")
            if per_partition < 1:
                raise ValueError(f"nt_samples_batch_size must be at least 1, got {per_partition}")
            per_partition = min(nt_samples, per_partition)
        stdev_tuple = self._stdevs(stdevs, len(inputs))
        batch = inputs[0].shape[0]
        if any(x.shape[0] != batch for x in inputs):
            raise ValueError(
                "every tensor in inputs must have the same batch size (dimension 0), got "
                f"{[x.shape[0] for x in inputs]}"
            )
        if "target" in kwargs:
            # Checked against the examples, not their noisy copies: a per-example target of
            # the wrong length would otherwise fail while being spread over the copies.
            check_target(kwargs["target"], batch)
        return_delta = (
            bool(kwargs.get("return_convergence_delta", False)) and self.is_delta_supported
        )
        baselines = self._baselines(kwargs, inputs, draw_baseline_from_distrib)

        partitions = [per_partition] * (nt_samples // per_partition)
        if nt_samples % per_partition:
            partitions.append(nt_samples % per_partition)
        # captum draws baseline rows once for the full partitions, once for the remainder.
        drawn = {}
        if draw_baseline_from_distrib and baselines is not None:
            for samples in dict.fromkeys(partitions):
                drawn[samples] = [
                    np.random.choice(b.shape[0], samples * batch).tolist()
                    if isinstance(b, Tensor)
                    else None
                    for b in baselines
                ]

        sums: list[Tensor] | None = None
        squares: list[Tensor] = []
        deltas: list[Tensor] = []
        rebuild: Callable[[list[Tensor]], Any] = tuple
        for samples in partitions:
            for (flat, group_rebuild), delta, examples in self._partition(
                inputs, samples, stdev_tuple, kwargs, baselines, drawn.get(samples), is_tuple
            ):
                with torch.no_grad():
                    if sums is None:
                        rebuild = group_rebuild
                        sums = [t.new_zeros((batch, *t.shape[1:])) for t in flat]
                        squares = [torch.zeros_like(s) for s in sums]
                    for total, square, t in zip(sums, squares, flat):
                        if t.shape[0] != examples.numel():
                            raise ValueError(
                                "NoiseTunnel combines attributions with one row per noisy "
                                f"copy ({examples.numel()}), got shape {list(t.shape)}"
                            )
                        index = examples.to(t.device)
                        total.index_add_(0, index, t)
                        square.index_add_(0, index, t * t)
                if delta is not None:
                    deltas.append(delta)
        assert sums is not None
        with torch.no_grad():
            means = [s * 1 / nt_samples for s in sums]
            if nt_type == "smoothgrad":
                combined = means
            else:
                mean_squares = [s * 1 / nt_samples for s in squares]
                combined = (
                    mean_squares
                    if nt_type == "smoothgrad_sq"
                    else [sq - m * m for sq, m in zip(mean_squares, means)]
                )
        attributions = rebuild(combined)
        if return_delta:
            return attributions, torch.cat(deltas)
        return attributions

    # ------------------------------------------------------------------------- helpers

    @staticmethod
    def _stdevs(stdevs: Any, count: int) -> tuple[float, ...]:
        def number(value: Any, name: str) -> float:
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{name} must be a number, got {type(value).__name__}")
            if not 0 <= value < math.inf:  # NaN fails too
                raise ValueError(f"{name} must be a finite standard deviation >= 0, got {value}")
            return float(value)

        if isinstance(stdevs, tuple):
            if len(stdevs) != count:
                raise ValueError(
                    f"stdevs must give one value per input tensor: {count} inputs, "
                    f"{len(stdevs)} stdevs"
                )
            return tuple(number(s, f"stdevs[{i}]") for i, s in enumerate(stdevs))
        return (number(stdevs, "stdevs"),) * count

    @staticmethod
    def _baselines(
        kwargs: dict[str, Any], inputs: tuple[Tensor, ...], draw: bool
    ) -> tuple[Any, ...] | None:
        if "baselines" not in kwargs:
            return None
        baselines = baseline_tuple(kwargs["baselines"], inputs)
        if draw:
            for i, (b, x) in enumerate(zip(baselines, inputs)):
                if isinstance(b, Tensor) and (b.dim() == 0 or b.shape[1:] != x.shape[1:]):
                    raise ValueError(
                        f"draw_baseline_from_distrib draws rows of baselines[{i}], which must "
                        f"be a number or have the shape of an input row {list(x.shape[1:])}, "
                        f"got shape {list(b.shape)}"
                    )
        return baselines

    def _group_rows(self, inputs: tuple[Tensor, ...], kwargs: dict[str, Any]) -> int | None:
        """Noisy copies per call to the wrapped method: for fastattr's path methods, enough
        that their points fill a chunk of the engine; None (a whole partition) otherwise."""
        if not isinstance(self.attribution_method, PathAttribution):
            return None
        n_steps = kwargs.get("n_steps", 50)
        steps = n_steps if isinstance(n_steps, int) and n_steps > 0 else 64
        row_bytes = max(1, sum(x[:1].numel() * x.element_size() for x in inputs))
        budget = chunk_budget(inputs[0].device)
        return max(1, -(-budget // (_ROWS_PER_POINT * row_bytes * steps)))

    def _partition(
        self,
        inputs: tuple[Tensor, ...],
        samples: int,
        stdevs: tuple[float, ...],
        kwargs: dict[str, Any],
        baselines: tuple[Any, ...] | None,
        drawn_rows: list[list[int] | None] | None,
        is_tuple: bool,
    ) -> Iterator[tuple[tuple[list[Tensor], Callable[[list[Tensor]], Any]], Tensor | None, Tensor]]:
        """Attributes one of captum's partitions (``samples`` copies of every example) a
        group of copies at a time; yields each group's flat attributions, deltas and the
        example of each copy."""
        batch = inputs[0].shape[0]
        rows = batch * samples
        noise_dtype = torch.get_default_dtype()
        draws = [
            _NoiseDraw(rows, tuple(x.shape[1:]), stdev, x.device, noise_dtype)
            for x, stdev in zip(inputs, stdevs)
        ]
        # Input after input, as captum draws them.
        for draw in draws:
            draw.start()

        args = format_additional_args(kwargs.get("additional_forward_args"))
        target = kwargs.get("target")
        groupable = self._groupable(batch, target, args)
        size = self._group_rows(inputs, kwargs) if groupable else None
        for low, high in _groups(rows, rows if size is None else size, draws):
            examples = torch.arange(low, high) // samples
            with torch.no_grad():
                noisy = tuple(
                    x.index_select(0, examples.to(x.device)) + draw.take(high - low)
                    for x, draw in zip(inputs, draws)
                )
            if self.is_gradient_method:
                noisy = tuple(n.requires_grad_() for n in noisy)
            call = dict(kwargs)
            if "target" in kwargs:
                call["target"] = self._rows_of(target, examples, samples, batch)
            if args is not None:
                call["additional_forward_args"] = tuple(
                    self._arg_rows_of(a, examples, samples, batch) for a in args
                )
            if kwargs.get("feature_mask") is not None:
                call["feature_mask"] = self._mask_rows_of(
                    kwargs["feature_mask"], examples, samples, batch
                )
            if baselines is not None:
                call["baselines"] = self._group_baselines(
                    baselines, inputs, examples, low, high, drawn_rows
                )
            try:
                result = self.attribution_method.attribute(noisy if is_tuple else noisy[0], **call)
            except RuntimeError as error:
                _note_promotion(error, inputs, noisy)
                raise
            delta = None
            if self.is_delta_supported and kwargs.get("return_convergence_delta", False):
                result, delta = result
            yield _flatten(result), delta, examples

    @staticmethod
    def _groupable(batch: int, target: Any, args: tuple[Any, ...] | None) -> bool:
        """Whether every per-example argument has one row per example, so that any group of
        copies can take its rows (else each partition goes whole, captum's way)."""
        tensors = [a for a in args or () if isinstance(a, Tensor) and a.dim() > 0]
        if isinstance(target, Tensor) and target.numel() > 1:
            tensors.append(target)
        if isinstance(target, list) and len(target) != batch:
            return False
        return all(t.shape[0] == batch for t in tensors)

    @staticmethod
    def _rows_of(value: Any, examples: Tensor, samples: int, batch: int) -> Any:
        """captum's expansion of a target to the copies (repeat_interleave), for the copies
        of ``examples``; targets without a row per example are expanded whole."""
        if isinstance(value, list):
            return [value[e] for e in examples.tolist()]
        if (
            isinstance(value, Tensor)
            and value.dim() > 0
            and (value.numel() > 1 or value.shape[0] == batch)
        ):
            if value.shape[0] == batch:
                return value.index_select(0, examples.to(value.device))
            return value.repeat_interleave(samples, dim=0)
        return value

    @staticmethod
    def _arg_rows_of(value: Any, examples: Tensor, samples: int, batch: int) -> Any:
        """captum's expansion of an additional forward argument to the copies: a tensor with
        a first dimension is repeated per copy (repeat_interleave); anything else (numbers,
        lists, 0-d tensors) is passed as it is, as captum passes it."""
        if not isinstance(value, Tensor) or value.dim() == 0:
            return value
        if value.shape[0] == batch:
            return value.index_select(0, examples.to(value.device))
        return value.repeat_interleave(samples, dim=0)

    @staticmethod
    def _mask_rows_of(mask: Any, examples: Tensor, samples: int, batch: int) -> Any:
        """captum's expansion of a ``feature_mask`` (for methods that take one, such as
        FeatureAblation) to the copies: a mask with one row per example follows its example's
        copies; one shared row is passed as it is."""

        def rows(m: Tensor) -> Tensor:
            # As a forward argument, but for the shared row (which arguments repeat per copy).
            if m.dim() > 0 and m.shape[0] <= 1:
                return m
            return NoiseTunnel._arg_rows_of(m, examples, samples, batch)

        return tuple(rows(m) for m in mask) if isinstance(mask, tuple) else rows(mask)

    @staticmethod
    def _group_baselines(
        baselines: tuple[Any, ...],
        inputs: tuple[Tensor, ...],
        examples: Tensor,
        low: int,
        high: int,
        drawn_rows: list[list[int] | None] | None,
    ) -> tuple[Any, ...]:
        out = []
        for i, (b, x) in enumerate(zip(baselines, inputs)):
            if not isinstance(b, Tensor):
                out.append(b)
            elif drawn_rows is not None:
                index = torch.tensor(drawn_rows[i][low:high], dtype=torch.long)
                out.append(b.index_select(0, index.to(b.device)))
            elif b.dim() == x.dim() and b.shape[0] == x.shape[0] and b.shape[0] > 1:
                out.append(b.index_select(0, examples.to(b.device)))
            else:
                out.append(b)
        return tuple(out)
