"""Gauss-Legendre tables: numpy's leggauss (captum's tables, bit for bit) up to
LEGGAUSS_MAX_STEPS nodes, fastattr's O(n) computation above, checked against leggauss where
it runs and against high-precision values (mpmath) where it does not."""

from __future__ import annotations

import tracemalloc

import mpmath
import numpy as np
import pytest
import torch
from captum.attr._utils.approximation_methods import approximation_parameters

from fastattr import _quadrature
from fastattr._quadrature import LEGGAUSS_MAX_STEPS, gauss_legendre, quadrature_table


@pytest.mark.parametrize("n", [*range(1, 24), 50, 64, 99, 128, 200])
def test_equal_to_leggauss(n):
    nodes, weights = gauss_legendre(n)
    expected_nodes, expected_weights = np.polynomial.legendre.leggauss(n)
    np.testing.assert_allclose(nodes, expected_nodes, rtol=0, atol=1e-14)
    np.testing.assert_allclose(weights, expected_weights, rtol=0, atol=1e-14)
    assert np.all(np.diff(nodes) > 0)
    np.testing.assert_array_equal(nodes, -nodes[::-1])
    np.testing.assert_array_equal(weights, weights[::-1])


@pytest.mark.parametrize("n", [300, LEGGAUSS_MAX_STEPS])
def test_closer_to_the_exact_weights_than_leggauss(n):
    # leggauss's weights nearest the ends lose digits as n grows (2.6e-14 at n = 400).
    nodes, weights = gauss_legendre(n)
    expected_nodes, expected_weights = np.polynomial.legendre.leggauss(n)
    np.testing.assert_allclose(nodes, expected_nodes, rtol=0, atol=1e-14)
    np.testing.assert_allclose(weights, expected_weights, rtol=0, atol=5e-14)
    for i in (0, 1, 2):
        _, weight = exact_pair(n, nodes[i])
        assert abs(weights[i] - weight) <= 1e-16
        assert abs(weights[i] - weight) < abs(expected_weights[i] - weight)


def exact_pair(n: int, node: float) -> tuple[mpmath.mpf, mpmath.mpf]:
    """The node (refined from ``node`` with 30 digits) and its weight."""
    with mpmath.workdps(30):
        x = mpmath.mpf(node)
        for _ in range(3):
            p, q = mpmath.legendre(n, x), mpmath.legendre(n - 1, x)
            x -= p * (x * x - 1) / (n * (x * p - q))
        p, q = mpmath.legendre(n, x), mpmath.legendre(n - 1, x)
        return x, 2 * (1 - x * x) / (n * (x * p - q)) ** 2


@pytest.mark.parametrize(
    "n, indices",
    [(1001, [0, 1, 5, 9, 40, 333, 500]), (100_000, [0, 1, 3, 7, 8, 12, 30])],
)
def test_against_high_precision(n, indices):
    nodes, weights = gauss_legendre(n)
    for i in indices:
        node, weight = exact_pair(n, nodes[i])
        assert abs(nodes[i] - node) <= 3e-16, i
        assert abs(weights[i] - weight) <= 1e-16, i
        if i >= 8:  # the interior nodes' weights are accurate relatively too
            assert abs(weights[i] / weight - 1) <= 1e-13, i


@pytest.mark.parametrize("n", [513, 4000, 100_000])
def test_integrates_polynomials_exactly(n):
    nodes, weights = gauss_legendre(n)
    assert abs(weights.sum() - 2) <= 1e-14
    for degree in range(0, 21, 2):
        assert abs(np.dot(weights, nodes**degree) - 2 / (degree + 1)) <= 1e-14, degree
        assert abs(np.dot(weights, nodes ** (degree + 1))) <= 1e-14, degree


def test_memory_is_linear():
    tracemalloc.start()
    try:
        gauss_legendre(100_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 40 * 100_000 * 8  # a few dozen arrays of n/2 values; leggauss: 80 GB


def test_tables_are_captums_bit_for_bit_up_to_the_switch():
    for n in (1, 7, 50, LEGGAUSS_MAX_STEPS):
        weights, alphas = (
            torch.tensor(f(n), dtype=torch.float64)
            for f in approximation_parameters("gausslegendre")
        )
        ours = quadrature_table("gausslegendre", n)
        assert torch.equal(ours[0], alphas) and torch.equal(ours[1], weights.float().double())


def test_tables_above_the_switch_come_from_gauss_legendre(monkeypatch):
    n = LEGGAUSS_MAX_STEPS + 1

    def refuse(n):
        raise AssertionError("leggauss must not run above the switch")

    _quadrature._table.cache_clear()
    monkeypatch.setattr(np.polynomial.legendre, "leggauss", refuse)
    try:
        alphas, weights = quadrature_table("gausslegendre", n)
    finally:
        _quadrature._table.cache_clear()
    nodes, gauss_weights = gauss_legendre(n)
    assert torch.equal(alphas, torch.from_numpy(0.5 * (1 + nodes)))
    assert torch.equal(weights, torch.from_numpy(0.5 * gauss_weights).float().double())


@pytest.mark.parametrize("n", [0, -3])
def test_bad_counts(n):
    with pytest.raises(ValueError, match="n must be at least 1"):
        gauss_legendre(n)
