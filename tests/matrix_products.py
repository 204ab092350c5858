"""A dispatch mode that notes the matrix products a computation runs, by operand shape."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class MatrixProducts(TorchDispatchMode):
    """The shapes of the operands of every ``aten.mm`` run under it, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.mm.default:
            self.shapes.append((tuple(args[0].shape), tuple(args[1].shape)))
        return func(*args, **(kwargs or {}))
