"""The shared solvers: nonnegative / box / simplex QPs against quadprog and known answers, Nash Newton, trace normalisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from matrix_cases import jacobians

from mojax.combiners.qp import box_qp, log_barrier_newton, nonnegative_qp, simplex_min_norm, trace_normalized

box_rows = jax.jit(jax.vmap(box_qp, in_axes=(None, 0)))
simplex = jax.jit(simplex_min_norm)
newton = jax.jit(log_barrier_newton, static_argnames="max_iters")


def normalized_gram(jac: np.ndarray, reg: float = 1e-4) -> np.ndarray:
    """G / tr(G) + reg I in float64."""
    gram = jac.astype(np.float64) @ jac.T.astype(np.float64)
    return gram / np.trace(gram) + reg * np.eye(len(gram))


@settings(max_examples=20, deadline=None)
@given(jacobians(5, 7))
def test_box_qp_matches_quadprog_and_satisfies_kkt(jac):
    """v = argmin v^T G v s.t. v >= u equals quadprog's; v >= u, G v >= 0, (v - u) . G v = 0."""
    solve_qp = pytest.importorskip("qpsolvers").solve_qp
    gram = normalized_gram(jac)
    lower = np.eye(5) / 5
    got = np.asarray(box_rows(jnp.asarray(gram, jnp.float32), jnp.asarray(lower, jnp.float32)), np.float64)
    want = np.stack([solve_qp(gram, np.zeros(5), -np.eye(5), -u, solver="quadprog") for u in lower])
    # Weight errors along G's 1e-4 (regulariser) directions are fp32-limited; what J^T v sees is tight.
    np.testing.assert_allclose(got, want, atol=2e-3)
    directions = lambda v: v @ jac.astype(np.float64)
    np.testing.assert_allclose(directions(got), directions(want), atol=1e-4 * np.abs(directions(want)).max() + 1e-6)
    assert np.all(got >= lower - 1e-7)
    slopes = got @ gram
    assert np.all(slopes >= -1e-5)
    np.testing.assert_allclose(np.sum((got - lower) * slopes, axis=1), 0.0, atol=1e-5)


def test_nonnegative_qp_known_answers():
    """Unconstrained optimum inside the orthant, one coordinate clamped, and the origin when p >= 0."""
    q = jnp.array([[2.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(nonnegative_qp(q, jnp.array([-2.0, -3.0])), [1.0, 3.0], rtol=1e-6)
    np.testing.assert_allclose(nonnegative_qp(q, jnp.array([2.0, -3.0])), [0.0, 3.0], rtol=1e-6)
    np.testing.assert_allclose(nonnegative_qp(q, jnp.array([1.0, 0.5])), [0.0, 0.0])
    coupled = jnp.array([[1.0, 1.0], [1.0, 1.0]])  # singular: any split of x1 + x2 = 1 is optimal
    x = np.asarray(nonnegative_qp(coupled, jnp.array([-1.0, -1.0])))
    assert np.all(x >= 0) and np.isclose(x.sum(), 1.0, atol=1e-6)


@pytest.mark.parametrize(
    ("rows", "want"),
    [
        ([[1.0, 0.0], [-1.0, 1.0]], [0.6, 0.4]),  # interior optimum
        ([[1.0, 0.0], [0.0, 2.0]], [0.8, 0.2]),  # orthogonal
        ([[2.0, 0.0], [0.0, 1.0], [-1.0, 1.0]], [0.4, 0.0, 0.6]),  # optimum on an edge
        ([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], [1 / 3, 1 / 3, 1 / 3]),  # basis
        ([[1.0, 2.0], [-3.0, -6.0]], [0.75, 0.25]),  # anti-parallel
        ([[3.0, 4.0]], [1.0]),  # n = 1
    ],
)
def test_simplex_min_norm_known_answers(rows, want):
    """argmin_{w in simplex} |J^T w|^2 on the hand-computed MGDA cases (exact, unlike Frank-Wolfe)."""
    jac = np.asarray(rows, np.float32)
    np.testing.assert_allclose(simplex_min_norm(jnp.asarray(jac @ jac.T)), want, atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(jacobians(4, 6))
def test_simplex_min_norm_is_optimal_on_the_simplex(jac):
    """KKT: w in the simplex and (G w)_i >= w^T G w for every i, with equality on the support."""
    gram = jac.astype(np.float64) @ jac.T.astype(np.float64)
    gram32 = gram / np.trace(gram)
    w = np.asarray(simplex(jnp.asarray(gram32, jnp.float32)), np.float64)
    assert np.all(w >= 0) and np.isclose(w.sum(), 1.0, atol=1e-6)
    slopes, value = gram32 @ w, w @ gram32 @ w
    assert np.all(slopes >= value - 1e-5)
    np.testing.assert_allclose(slopes[w > 1e-4], value, atol=1e-5)


def test_simplex_min_norm_identical_rows_is_a_valid_split():
    """G = 11^T is singular: any simplex point is optimal; the solver must still return one."""
    w = np.asarray(simplex_min_norm(jnp.ones((3, 3))))
    assert np.all(np.isfinite(w)) and np.all(w >= 0) and np.isclose(w.sum(), 1.0)


def test_log_barrier_newton_solves_the_nash_equation():
    """Orthogonal rows give a_i = 1/|g_i|; random Grams satisfy a_i (G a)_i = 1."""
    np.testing.assert_allclose(
        newton(jnp.diag(jnp.array([1.0, 4.0, 0.25])), jnp.ones(3), max_iters=50), [1.0, 0.5, 2.0], rtol=1e-6
    )
    jac = np.random.default_rng(0).standard_normal((5, 9))
    gram = jac @ jac.T / np.trace(jac @ jac.T)
    a = np.asarray(newton(jnp.asarray(gram, jnp.float32), jnp.ones(5), max_iters=50), np.float64)
    np.testing.assert_allclose(a * (gram @ a), 1.0, rtol=1e-5)


def test_log_barrier_newton_warm_start_and_iteration_cap():
    """One step from the solution stays there; one step from far away does not get there."""
    gram = jnp.diag(jnp.array([1.0, 4.0]))
    np.testing.assert_allclose(newton(gram, jnp.array([1.0, 0.5]), max_iters=1), [1.0, 0.5], rtol=1e-6)
    assert not np.allclose(newton(gram, jnp.array([50.0, 50.0]), max_iters=1), [1.0, 0.5], rtol=1e-2)


@pytest.mark.parametrize(
    ("scale", "trace", "norm_eps", "zeroed"),
    [
        (1.0, 2.0, 1e-4, False),
        (1.0, 5e-5, 1e-4, True),
        (1e-3, 50.0, 1e-4, True),
        (1e30, 1.0, 1e-4, False),
        (1.0, 0.0, 0.0, True),
    ],
)
def test_trace_normalized_thresholds_the_true_frobenius_norm(scale, trace, norm_eps, zeroed):
    """G -> G / tr G unless gram_scale^2 tr G < norm_eps (TorchJD's rule), without overflowing gram_scale^2."""
    gram = jnp.diag(jnp.array([trace / 2, trace / 2]))
    got = np.asarray(trace_normalized(gram, scale, norm_eps))
    np.testing.assert_allclose(got, np.zeros((2, 2)) if zeroed else np.eye(2) / 2)
