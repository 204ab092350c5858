"""The path integral shared by the integrated-gradients methods.

Steps are streamed in chunks: for each chunk the interpolation op builds the path, the caller's
``evaluate`` runs the model on it, one backward of the summed per-example outputs gives the
gradients, and the quadrature op folds them into one in-place accumulator. Memory is bounded
by the chunk, not by ``n_steps``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Hashable, Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fastattr import ops
from fastattr._autograd import input_gradients
from fastattr._formatting import as_int
from fastattr._quadrature import quadrature_table
from fastattr.ops.reference import row_layout

# How much the saved activations of one chunk may take. More buys no throughput: a chunk this
# size already keeps a GPU or the CPU's cores busy.
CUDA_CHUNK_BYTES = 1 << 30
CPU_CHUNK_BYTES = 1 << 29

# Evaluates the model on a chunk of the path: (paths, steps in the chunk) -> one value per row,
# differentiable with respect to the paths.
Evaluate = Callable[[tuple[Tensor, ...], int], Tensor]


@dataclass
class PathIntegral:
    """What streaming the path produced."""

    attributions: tuple[Tensor, ...]
    # Per-example sum of every attribution (for the convergence delta), from the finishing pass.
    row_sums: Tensor
    # The model's per-example output at the start and end of the path, when the quadrature
    # evaluated it there (Riemann left/right/trapezoid nodes include 0 or 1); else None.
    start_output: Tensor | None
    end_output: Tensor | None


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def new_accumulator(end: Tensor) -> Tensor:
    """Zeros for ``end``'s gradients in a layout the kernels take (zeros_like would copy any
    other strides, e.g. of a transposed input, which the kernels reject)."""
    return torch.zeros_like(end, dtype=accumulator_dtype(end.dtype), memory_format=row_layout(end))


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


def module_of(forward_func: object) -> nn.Module | None:
    """The module behind ``forward_func``: the module itself, or the owner of a bound method
    such as ``model.forward``."""
    if isinstance(forward_func, nn.Module):
        return forward_func
    owner = getattr(forward_func, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


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


def integrate_path(
    ends: tuple[Tensor, ...],
    starts: tuple[Tensor, ...],
    evaluate: Evaluate,
    *,
    method: str,
    n_steps: int,
    steps_per_chunk: int | None,
    multiply_by_inputs: bool,
    model: object = None,
    grad_kwargs: dict[str, Any] | None = None,
    step_costs: MutableMapping[Hashable, int] | None = None,
    cost_key: Hashable = None,
) -> PathIntegral:
    """Integrate the gradients of ``evaluate`` along the straight paths ``starts -> ends``.

    ``steps_per_chunk=None`` sizes the chunks from free memory: the first chunk (one step)
    measures what autograd keeps per step (not counting ``model``'s parameters and buffers),
    the rest are as large as the budget allows. The measured cost is kept in ``step_costs``
    under ``cost_key`` and the ends' shapes, so later calls of the same shape skip the
    measuring chunk.
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "integrated gradients need autograd, which torch.inference_mode() turns off: call "
            "attribute outside it (torch.no_grad() is fine)"
        )
    # On the CPU even for a GPU: the kernels check the tables there and copy them without a
    # synchronization.
    alphas, weights = quadrature_table(method, n_steps)
    n_steps = as_int(n_steps, "n_steps")  # plain int chunk bounds, whatever integer came in
    batch = ends[0].shape[0]
    device = ends[0].device
    accumulators = [new_accumulator(end) for end in ends]
    start_output = end_output = None
    step = 0
    cost_key = (cost_key, tuple((tuple(e.shape), e.dtype, str(e.device)) for e in ends))
    known_cost = None if step_costs is None else step_costs.get(cost_key)
    meter = None
    if steps_per_chunk is not None:
        chunk = steps_per_chunk
    elif known_cost is not None:
        chunk = max(1, chunk_budget(device) // known_cost)
    else:
        chunk = 1
        meter = _SavedTensorMeter(model_state_tensors(model))
    while step < n_steps and batch > 0:
        stop = min(step + chunk, n_steps)
        chunk_alphas = alphas[step:stop]
        with torch.enable_grad():
            paths = tuple(
                ops.interpolate_path(end.detach(), start.detach(), chunk_alphas).requires_grad_()
                for end, start in zip(ends, starts)
            )
            if meter is not None:
                with meter.hooks():
                    outputs = evaluate(paths, stop - step)
            else:
                outputs = evaluate(paths, stop - step)
            seed = torch.ones_like(outputs)
            if grad_kwargs:
                grads = torch.autograd.grad(
                    outputs, paths, grad_outputs=seed, **{"allow_unused": True, **grad_kwargs}
                )
            else:
                grads = input_gradients(outputs, paths, seed)
        for accumulator, grad in zip(accumulators, grads):
            if grad is not None:
                ops.quadrature_accumulate(accumulator, grad, weights[step:stop])
        # (A layer's values may hold several rows per example: then the outputs, one per
        # example, don't line up with the path's rows.)
        if outputs.numel() == (stop - step) * batch:
            per_step = outputs.detach().reshape(stop - step, batch)
            for k, alpha in enumerate(chunk_alphas.tolist()):
                if alpha == 0.0:
                    start_output = per_step[k]
                elif alpha == 1.0:
                    end_output = per_step[k]
        if meter is not None:
            path_bytes = sum(p.numel() * p.element_size() for p in paths)
            # The path, its gradient and that gradient in the accumulator's layout live too.
            step_cost = max(1, meter.bytes + 3 * path_bytes)
            if step_costs is not None:
                step_costs[cost_key] = step_cost
            chunk = max(1, chunk_budget(device) // step_cost)
            meter = None
        del paths, outputs, grads
        step = stop

    attributions, row_sums = [], None
    for accumulator, end, start in zip(accumulators, ends, starts):
        attribution, sums = ops.quadrature_finish(
            accumulator, end.detach(), start.detach(), multiply_by_inputs
        )
        attributions.append(attribution)
        row_sums = sums if row_sums is None else row_sums + sums
    return PathIntegral(tuple(attributions), row_sums, start_output, end_output)
