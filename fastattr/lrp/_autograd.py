"""The three autograd nodes LRP inserts around a module; their backward runs the compiled ops.

A module with a relevance rule becomes ``output = Ratio(module(Product(input)))``: the backward
divides the relevance arriving at the output by the stabilized output (``epsilon_ratio``), lets
ATen's own backward of the module apply the transposed linear map, and multiplies what arrives
at the input by the input (``input_relevance``). Modules that pass relevance through get a
``Pass`` node that hands the relevance at the output straight to the input.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastattr import ops


def _forward_value(value: Tensor, copy: bool) -> Tensor:
    # A copy protects the saved tensors when the model later modifies the output in place
    # (nn.ReLU(inplace=True)); without one, autograd hands out a cheap view.
    return value.clone() if copy else value.view_as(value)


class Product(torch.autograd.Function):
    """Identity forward; backward ``input * relevance``: the relevance at a module's input."""

    @staticmethod
    def forward(ctx, activation: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(activation)
        return activation.view_as(activation)

    @staticmethod
    def backward(ctx, contribution: Tensor) -> Tensor:  # type: ignore[override]
        (activation,) = ctx.saved_tensors
        return ops.input_relevance(activation, contribution.to(activation.dtype))


class Ratio(torch.autograd.Function):
    """Forward shows ``shown`` (``z`` itself when None); backward sends ``relevance / (z +
    epsilon * sign(z))`` into ``z``'s graph.

    Rules with modified weights pass the modified output as ``z`` and the module's true output as
    ``shown``, so that the model continues on the true values.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, z: Tensor, shown: Tensor | None, epsilon: float, copy: bool
    ) -> Tensor:
        ctx.save_for_backward(z)
        ctx.epsilon = epsilon
        return _forward_value(z if shown is None else shown, copy)

    @staticmethod
    def backward(ctx, relevance: Tensor):  # type: ignore[override]
        (z,) = ctx.saved_tensors
        return ops.epsilon_ratio(relevance.to(z.dtype), z, ctx.epsilon), None, None, None


class Pass(torch.autograd.Function):
    """Forward shows ``shown``; backward hands the relevance to ``source`` unchanged."""

    @staticmethod
    def forward(ctx, source: Tensor, shown: Tensor, copy: bool) -> Tensor:  # type: ignore[override]
        return _forward_value(shown, copy)

    @staticmethod
    def backward(ctx, relevance: Tensor):  # type: ignore[override]
        return relevance, None, None
