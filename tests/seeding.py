"""Reproducible parameters for the path-method tests' models."""

from __future__ import annotations

import torch
from torch import nn


def seeded(module: nn.Module, dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    """Re-draw ``module``'s parameters from ``seed`` (normal, scale 0.5), cast it to ``dtype``
    and put it in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return module.to(dtype).eval()
