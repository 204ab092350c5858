"""Quadrature rules for the path integral: where on the path to take gradients (alphas) and
how to weigh them (weights), as float64 tables on the CPU."""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor

from fastattr._formatting import as_int

RIEMANN_METHODS = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")
METHODS = (*RIEMANN_METHODS, "gausslegendre")


def check_steps(method: str, n_steps: int) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    n_steps = as_int(n_steps, "n_steps")
    least = 2 if method in RIEMANN_METHODS else 1
    if n_steps < least:
        raise ValueError(f"n_steps must be at least {least} for method {method!r}, got {n_steps}")


def quadrature_table(method: str, n_steps: int) -> tuple[Tensor, Tensor]:
    """``(alphas, weights)``, each (n_steps,) float64 on the CPU. Shared between calls: read
    them, never write them.

    The values are captum's to the bit: Riemann nodes come from a linspace in the default
    dtype and every rule's weights are rounded to float32, as captum rounds them. Using the
    same tables is what lets the attributions agree with captum's to float64 rounding.
    """
    check_steps(method, n_steps)
    return _table(method, as_int(n_steps, "n_steps"), torch.get_default_dtype())


# Gauss-Legendre nodes cost more to compute than a small attribution takes.
@functools.lru_cache(maxsize=64)
def _table(method: str, n_steps: int, default_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    if method == "gausslegendre":
        nodes, gauss_weights = np.polynomial.legendre.leggauss(n_steps)
        alphas = torch.from_numpy(0.5 * (1 + nodes))
        weights = torch.from_numpy(0.5 * gauss_weights)
    else:
        n = n_steps
        start, stop = {
            "riemann_left": (0.0, 1 - 1 / n),
            "riemann_right": (1 / n, 1.0),
            "riemann_middle": (1 / (2 * n), 1 - 1 / (2 * n)),
            "riemann_trapezoid": (0.0, 1.0),
        }[method]
        alphas = torch.linspace(start, stop, n, dtype=default_dtype)
        weights = torch.full((n,), 1 / n, dtype=torch.float64)
        if method == "riemann_trapezoid":
            weights[0] /= 2
            weights[-1] /= 2
    return alphas.to(torch.float64), weights.to(torch.float32).to(torch.float64)
