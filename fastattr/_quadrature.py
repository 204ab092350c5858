"""Quadrature rules for the path integral: where on the path to take gradients (alphas) and
how to weigh them (weights), as float64 tables on the CPU.

Gauss-Legendre tables come from numpy's ``leggauss`` (as captum's do, so the tables are
captum's bit for bit) up to `LEGGAUSS_MAX_STEPS` nodes. ``leggauss`` solves an
eigenproblem of the n x n companion matrix: O(n^2) memory and O(n^3) time (1.5 GiB and minutes
at 10,000 nodes). Above that, `gauss_legendre` computes them in O(n): Newton's method on
an asymptotic expansion of the Legendre polynomial for the interior nodes, and on the
polynomial itself (torch's recurrence, O(n) per node) for the few nodes near the ends.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from fastattr._formatting import as_int

# Up to here the Gauss-Legendre tables are leggauss's (captum's, bit for bit): a few tens of
# milliseconds at most, and n_steps beyond a few hundred are rare.
LEGGAUSS_MAX_STEPS = 512
# The interior expansion's terms and where it takes over: with 30 terms it is exact to float64
# rounding once n * sin(theta) >= 25 (its m-th term shrinks about as m! / (50)^m there).
_EXPANSION_TERMS = 30
_INTERIOR_FROM = 25.0
_NEWTON_STEPS = 12

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
        if n_steps <= LEGGAUSS_MAX_STEPS:
            nodes, gauss_weights = np.polynomial.legendre.leggauss(n_steps)
        else:
            nodes, gauss_weights = gauss_legendre(n_steps)
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


def _expansion(theta: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """P_n(cos theta) / C_n and its derivative in theta, from the interior asymptotic expansion
    (Stieltjes; Hale & Townsend 2013, eq. 3.1), where C_n = sqrt(4/pi) Gamma(n+1)/Gamma(n+3/2):

        P_n(cos t) = C_n sum_m h_m cos((n+m+1/2) t - (m+1/2) pi/2) / (2 sin t)^(m+1/2),
        h_0 = 1, h_m = h_(m-1) (m-1/2)^2 / (m (n+m+1/2)).
    """
    sin, cos = np.sin(theta), np.cos(theta)
    phase = (n + 0.5) * theta - math.pi / 4
    cos_m, sin_m = np.cos(phase), np.sin(phase)
    scale = 1 / np.sqrt(2 * sin)
    value = np.zeros_like(theta)
    slope = np.zeros_like(theta)
    h = 1.0
    for m in range(_EXPANSION_TERMS):
        value += h * scale * cos_m
        slope -= h * scale * ((n + m + 0.5) * sin_m + (m + 0.5) * cos / sin * cos_m)
        # The next phase is this one plus theta - pi/2: a rotation, cheaper than cos and sin.
        cos_m, sin_m = cos_m * sin + sin_m * cos, sin_m * sin - cos_m * cos
        h *= (m + 0.5) ** 2 / ((m + 1) * (n + m + 1.5))
        scale = scale / (2 * sin)
    return value, slope


def _recurrence(theta: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """P_n(cos theta) and P_(n-1)(cos theta), from torch's three-term recurrence."""
    x = torch.from_numpy(np.cos(theta))
    return (
        torch.special.legendre_polynomial_p(x, n).numpy(),
        torch.special.legendre_polynomial_p(x, n - 1).numpy(),
    )


def _newton(theta: np.ndarray, step: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Newton's method from ``theta``, until the steps reach float64 resolution or stop
    shrinking (the function's rounding then decides them)."""
    previous = math.inf
    for _ in range(_NEWTON_STEPS):
        delta = step(theta)
        theta = theta - delta
        size = float(np.max(np.abs(delta), initial=0.0))
        if np.all(np.abs(delta) <= 4 * np.finfo(np.float64).eps * theta) or size > previous / 2:
            break
        previous = size
    return theta


def gauss_legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes (ascending) and weights of the n-point Gauss-Legendre rule on [-1, 1], in O(n)
    time and memory. The nodes equal numpy's ``leggauss``'s to about 1e-16, and so do the
    weights but for the few nearest the ends, where ``leggauss`` loses digits as n grows (6e-14
    at n = 1000) and these stay within 1e-16 of the exact values.

    Args:
        n: the number of nodes, at least 1.

    Returns:
        ``(nodes, weights)``, two float64 arrays of ``n`` values; the weights sum to 2.

    Examples:
        >>> import numpy as np
        >>> nodes, weights = gauss_legendre(1000)
        >>> expected = np.polynomial.legendre.leggauss(1000)
        >>> bool(np.abs(nodes - expected[0]).max() < 1e-14)
        True
        >>> bool(np.abs(weights - expected[1])[10:-10].max() < 1e-14)
        True
        >>> float(weights.sum())
        2.0
    """
    n = as_int(n, "n")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    # The nodes x = cos(theta) in (0, pi/2], nearest to x = 1 first; the rest by symmetry.
    half = (n + 1) // 2
    k = np.arange(1, half + 1, dtype=np.float64)
    rho = n + 0.5
    near_end = k * math.pi < _INTERIOR_FROM + math.pi
    theta = np.empty(half)

    # Near the end: from the zeros of J0 (McMahon's expansion) over n + 1/2, by Newton's
    # method on the polynomial itself (O(n) per node, for a fixed number of nodes).
    beta = (k[near_end] - 0.25) * math.pi
    bessel_zeros = beta + 1 / (8 * beta) - 124 / (3 * (8 * beta) ** 3)

    def polynomial_slope(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # P_n(cos t) and its derivative in t, n (cos t P_n - P_(n-1)) / sin t, which (unlike
        # P_(n-1) alone) is stationary at a node: a weight from it does not inherit the rounding
        # of cos t (1e-8 relative near the ends at n = 1000).
        p, p_previous = _recurrence(t, n)
        return p, n * (np.cos(t) * p - p_previous) / np.sin(t)

    end = _newton(bessel_zeros / rho, lambda t: np.divide(*polynomial_slope(t)))
    end_weights = 2 / polynomial_slope(end)[1] ** 2

    # The interior: from Tricomi's estimate, by Newton's method on the expansion.
    interior = _newton(
        math.pi * (4 * k[~near_end] - 1) / (4 * n + 2), lambda t: np.divide(*_expansion(t, n))
    )
    _, slope = _expansion(interior, n)
    interior_weights = 2 / slope**2  # times 1 / C_n^2, found below from the weights' sum

    theta[near_end], theta[~near_end] = end, interior
    weights = np.empty(half)
    weights[near_end] = end_weights
    if interior.size:
        # The weights sum to 2, each node but a middle one (odd n) counted on both sides.
        counted = np.ones(interior.size)
        if n % 2:
            counted[-1] = 0.5
        interior_weights *= (1 - math.fsum(end_weights)) / math.fsum(counted * interior_weights)
        weights[~near_end] = interior_weights
    nodes = np.cos(theta)
    if n % 2:
        nodes[-1] = 0.0
    middle = half - n % 2
    return (
        np.concatenate([-nodes, nodes[:middle][::-1]]),
        np.concatenate([weights, weights[:middle][::-1]]),
    )
