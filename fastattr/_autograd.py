"""Gradients of a seeded backward, taken straight from the autograd engine."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import Variable


def input_gradients(
    output: Tensor, inputs: tuple[Tensor, ...], seed: Tensor, keep_graph: bool = False
) -> tuple[Tensor | None, ...]:
    """``torch.autograd.grad(output, inputs, seed, retain_graph=keep_graph, allow_unused=True)``.

    Plain tensors go straight to the engine: the wrapper's argument handling costs about as
    much as the backward of a small model. Tensor subclasses take the wrapper, which honours
    their ``__torch_function__``.
    """
    if type(output) is Tensor and all(type(t) is Tensor for t in inputs):
        # Private: the engine call torch.autograd.grad itself ends in, with its positional
        # arguments (tensors, grad_tensors, keep_graph, create_graph, inputs,
        # allow_unreachable, accumulate_grad). Checked on torch 2.13 and 2.14;
        # tests/test_torch_private_api.py fails if it moves.
        return Variable._execution_engine.run_backward(  # type: ignore[attr-defined]
            (output,), (seed,), keep_graph, False, inputs, True, False
        )
    return torch.autograd.grad(output, inputs, seed, retain_graph=keep_graph, allow_unused=True)
