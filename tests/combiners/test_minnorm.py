"""min_norm_weights: hand-computed known answers and TorchJD's golden value, degenerate inputs, KKT and symmetry properties."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mojax.combiners.minnorm import grad_log_norms, min_norm_weights, rescaled_gram

_jit_min_norm = jax.jit(min_norm_weights, static_argnames=("solver", "tol", "max_iters"))


def solve(gram, active=None, **kwargs):
    """Jitted min_norm_weights, always with an explicit mask so that each (n, solver) compiles once."""
    gram = jnp.asarray(gram)
    return _jit_min_norm(gram, active=jnp.ones(gram.shape[0], bool) if active is None else active, **kwargs)


SOLVERS = ("active_set", "frank_wolfe")
# Objective counts for property tests: n = 1, the n = 2 closed form, and the iterative solver at 3, 5, 8
# (a few shapes, so that the suite compiles each solver only a few times).
SIZES = st.sampled_from([1, 2, 3, 5, 8])


def reference_min_norm(gram: np.ndarray) -> np.ndarray:
    """float64 oracle: solve the KKT system on every support, keep the feasible point of least alpha^T G alpha."""
    gram = np.asarray(gram, np.float64)
    n = len(gram)
    best_value, best_alpha = np.inf, None
    for size in range(1, n + 1):
        for support in map(list, itertools.combinations(range(n), size)):
            kkt = np.zeros((size + 1, size + 1))
            kkt[:size, :size] = gram[np.ix_(support, support)]
            kkt[:size, size] = kkt[size, :size] = 1.0
            rhs = np.zeros(size + 1)
            rhs[size] = 1.0
            sub = np.linalg.lstsq(kkt, rhs, rcond=None)[0][:size]
            if np.any(sub < -1e-12):
                continue
            alpha = np.zeros(n)
            alpha[support] = np.clip(sub, 0.0, None) / np.clip(sub, 0.0, None).sum()
            value = alpha @ gram @ alpha
            if value < best_value - 1e-15:
                best_value, best_alpha = value, alpha
    return best_alpha


def random_jacobian(n: int, d: int, seed: int, spread: float = 1.0) -> np.ndarray:
    """J f32[n, d] with Gaussian rows whose norms span 10^-spread .. 10^spread."""
    rng = np.random.default_rng(seed)
    scales = 10.0 ** rng.uniform(-spread, spread, size=(n, 1))
    return (rng.normal(size=(n, d)) * scales).astype(np.float32)


def gram_of(jac: np.ndarray) -> np.ndarray:
    """J J^T in float64 (the oracle's Gram); the solver receives its fp32 rounding."""
    jac = np.asarray(jac, np.float64)
    return jac @ jac.T


def assert_kkt(gram64: np.ndarray, alpha: np.ndarray, rel_tol: float) -> None:
    """alpha on the simplex, (G alpha)_i = alpha^T G alpha on the support and >= it elsewhere (tolerance x max G_ii)."""
    alpha = np.asarray(alpha, np.float64)
    assert np.all(np.isfinite(alpha)) and np.all(alpha >= 0)
    np.testing.assert_allclose(alpha.sum(), 1.0, atol=1e-6)
    progress = gram64 @ alpha
    norm_sq = alpha @ progress
    tol = rel_tol * np.max(np.diag(gram64))
    assert np.min(progress) >= norm_sq - tol
    assert np.max(progress[alpha > 0]) <= norm_sq + tol


# Hand-computed min-norm points of small Jacobians and torchjd's J_base golden value.
KNOWN = {
    "interior optimum": ([[1, 0], [-1, 1]], [0.6, 0.4]),
    "orthogonal": ([[1, 0], [0, 2]], [0.8, 0.2]),
    "edge optimum": ([[2, 0], [0, 1], [-1, 1]], [0.4, 0.0, 0.6]),
    "basis": (np.eye(3), [1 / 3, 1 / 3, 1 / 3]),
    "anti-parallel": ([[1, 2], [-3, -6]], [0.75, 0.25]),
    "torchjd J_base": ([[-4, 1, 1], [6, 1, 1]], [0.6, 0.4]),
}


@pytest.mark.parametrize("case", KNOWN)
def test_known_answers_accurate_solver(case):
    jac, expected = (np.asarray(v, np.float32) for v in KNOWN[case])
    alpha = solve(jac @ jac.T)
    np.testing.assert_allclose(alpha, expected, atol=2e-6)


@pytest.mark.parametrize("case", KNOWN)
def test_known_answers_frank_wolfe(case):
    """Frank-Wolfe is sublinear: with torchjd's constants it stops a few 1e-2 off on a face; run longer ~1e-3."""
    jac, expected = (np.asarray(v, np.float32) for v in KNOWN[case])
    gram = jac @ jac.T
    coarse = solve(gram, solver="frank_wolfe")
    np.testing.assert_allclose(coarse, expected, atol=5e-2)
    fine = solve(gram, solver="frank_wolfe", tol=1e-6, max_iters=5000)
    np.testing.assert_allclose(fine, expected, atol=2e-3)


def test_known_directions():
    """d = J^T alpha: interior (0.2, 0.4), edge optimum (0.2, 0.6), torchjd J_base (0, 1, 1), anti-parallel zero."""
    directions = {
        "interior optimum": [0.2, 0.4],
        "edge optimum": [0.2, 0.6],
        "torchjd J_base": [0, 1, 1],
        "anti-parallel": [0, 0],
    }
    for case, direction in directions.items():
        jac = np.asarray(KNOWN[case][0], np.float32)
        np.testing.assert_allclose(solve(jac @ jac.T) @ jac, direction, atol=1e-5)


def test_support_solve_finishes_an_unconverged_run():
    """The exact KKT solve on the support found so far: the edge optimum exact after 10 steps, an interior optimum after 1."""
    jac = np.asarray(KNOWN["edge optimum"][0], np.float32)
    np.testing.assert_allclose(solve(jac @ jac.T, max_iters=10), [0.4, 0.0, 0.6], atol=1e-6)
    jac = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    expected = reference_min_norm(gram_of(jac))
    assert np.all(expected > 0)
    np.testing.assert_allclose(solve(jac @ jac.T, max_iters=1), expected, atol=1e-5)


def test_two_objectives_boundaries_are_exact():
    """v12 >= v11 gives exactly (1, 0), v12 >= v22 exactly (0, 1) (not 0.999 / 0.001 as in the official code)."""
    np.testing.assert_array_equal(solve(jnp.array([[1.0, 1.5], [1.5, 4.0]])), [1.0, 0.0])
    np.testing.assert_array_equal(solve(jnp.array([[4.0, 1.5], [1.5, 1.0]])), [0.0, 1.0])
    # Parallel gradients 3e-5 apart in length: ||g1 - g2||^2 cancels in fp32, the comparisons do not.
    nearly_parallel = np.array([[0.6736893], [0.6736698]], np.float32)
    np.testing.assert_array_equal(solve(nearly_parallel @ nearly_parallel.T), [0.0, 1.0])


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize(
    "jac",
    [
        pytest.param([[1.0, 2.0]], id="n=1"),
        pytest.param([[1.0, 2.0], [1.0, 2.0]], id="identical-2"),
        pytest.param([[1.0, 2.0]] * 5, id="identical-5"),
        pytest.param([[1.0, -1.0], [-2.0, 2.0], [3.0, -3.0]], id="anti-parallel-3"),
        pytest.param([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]], id="one-zero"),
        pytest.param([[0.0, 0.0], [0.0, 0.0]], id="all-zero-2"),
        pytest.param([[0.0, 0.0]] * 3, id="all-zero-3"),
    ],
)
def test_degenerate_inputs_give_finite_simplex_weights_at_the_min_norm(jac, solver):
    jac = np.asarray(jac, np.float32)
    alpha = np.asarray(solve(jac @ jac.T, solver=solver), np.float64)
    assert np.all(np.isfinite(alpha)) and np.all(alpha >= 0)
    np.testing.assert_allclose(alpha.sum(), 1.0, atol=1e-6)
    expected = reference_min_norm(gram_of(jac))
    np.testing.assert_allclose(alpha @ jac, expected @ jac, atol=1e-6)


@pytest.mark.parametrize("solver", SOLVERS)
def test_identical_gradients_give_a_valid_split(solver):
    """Every point of the simplex is optimal (any valid alpha gives d = g); the n = 2 closed form splits evenly."""
    np.testing.assert_allclose(solve(jnp.full((2, 2), 3.0)), [0.5, 0.5])
    jac = np.tile([[1.0, -2.0, 0.5]], (5, 1))
    alpha = np.asarray(solve(jnp.asarray(jac @ jac.T), solver=solver))
    assert np.all(alpha >= 0) and alpha.sum() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(alpha @ jac, jac[0], rtol=1e-6)


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_extreme_gram_scales(scale):
    """A Gram of entries ~1e-30 or ~1e30 (gradients ~1e-15 / 1e15) gives the unscaled answer."""
    jac = np.asarray(KNOWN["edge optimum"][0], np.float32)
    np.testing.assert_allclose(solve(jnp.asarray(jac @ jac.T) * scale), [0.4, 0.0, 0.6], atol=2e-6)


def test_active_mask_excludes_objectives():
    jac = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]], np.float32)
    gram = jac @ jac.T
    np.testing.assert_allclose(solve(gram), [0.0, 1.0, 0.0])
    for solver in SOLVERS:
        alpha = solve(gram, active=jnp.array([True, False, True]), solver=solver)
        np.testing.assert_allclose(alpha, [0.8, 0.0, 0.2], atol=3e-2 if solver == "frank_wolfe" else 1e-6)
    np.testing.assert_array_equal(solve(gram, active=jnp.zeros(3, bool)), [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(solve(gram[:2, :2], active=jnp.array([False, True])), [0.0, 1.0])


@settings(max_examples=40, deadline=None)
@given(n=SIZES, d=st.integers(1, 10), seed=st.integers(0, 2**31 - 1))
def test_property_kkt_and_optimality(n, d, seed):
    jac = random_jacobian(n, d, seed)
    gram64 = gram_of(jac)
    alpha = np.asarray(solve(jac @ jac.T), np.float64)
    assert_kkt(gram64, alpha, rel_tol=1e-5)
    best = reference_min_norm(gram64)
    assert alpha @ gram64 @ alpha <= best @ gram64 @ best + 1e-6 * np.max(np.diag(gram64))


@settings(max_examples=30, deadline=None)
@given(n=SIZES, d=st.integers(1, 10), seed=st.integers(0, 2**31 - 1), exponent=st.integers(-60, 60))
def test_property_scale_invariance(n, d, seed, exponent):
    """G -> 2^e G is exact in fp32, so the weights are bitwise equal; G -> 10^k G agrees to round-off."""
    gram = jnp.asarray(random_jacobian(n, d, seed) @ random_jacobian(n, d, seed).T)
    for solver in SOLVERS:
        base = solve(gram, solver=solver)
        np.testing.assert_array_equal(solve(gram * 2.0**exponent, solver=solver), base)
    jac = random_jacobian(n, d, seed)
    gram = jac @ jac.T
    alpha, scaled = solve(gram), solve(gram * np.float32(10.0 ** (exponent / 3)))
    np.testing.assert_allclose(
        np.asarray(scaled) @ jac, np.asarray(alpha) @ jac, atol=2e-3 * np.sqrt(np.max(np.diag(gram)))
    )


@settings(max_examples=30, deadline=None)
@given(n=SIZES, d=st.integers(1, 10), seed=st.integers(0, 2**31 - 1))
def test_property_permutation_equivariance(n, d, seed):
    jac = random_jacobian(n, d, seed)
    perm = np.random.default_rng(seed).permutation(n)
    alpha = np.asarray(solve(jac @ jac.T), np.float64)
    alpha_perm = np.asarray(solve(jac[perm] @ jac[perm].T), np.float64)
    max_norm = np.sqrt(np.max(np.diag(gram_of(jac))))
    np.testing.assert_allclose(alpha_perm @ jac[perm], alpha @ jac, atol=2e-3 * max_norm)
    if d >= n and np.linalg.cond(gram_of(jac)) < 1e2:  # unique and well-conditioned: weights permute too
        np.testing.assert_allclose(alpha_perm, alpha[perm], atol=1e-4)


@settings(max_examples=30, deadline=None)
@given(n=SIZES, d=st.integers(1, 10), seed=st.integers(0, 2**31 - 1))
def test_property_frank_wolfe_is_a_feasible_descent_approximation(n, d, seed):
    jac = random_jacobian(n, d, seed)
    gram64 = gram_of(jac)
    alpha = np.asarray(solve(jac @ jac.T, solver="frank_wolfe"), np.float64)
    assert np.all(alpha >= 0)
    np.testing.assert_allclose(alpha.sum(), 1.0, atol=1e-5)
    best = reference_min_norm(gram64)
    assert alpha @ gram64 @ alpha <= best @ gram64 @ best + 5e-2 * np.max(np.diag(gram64))


def test_rescaled_gram_is_scale_safe():
    """Gram of g_i / c_i from cosines and log-lengths: unit gradients for c = ||g||, even at 1e30 and 1e-30."""
    jac = np.array([[3.0, 4.0], [0.0, 2.0], [0.0, 0.0]], np.float32)
    for scale in (1.0, 1e30, 1e-30):
        gram = jnp.asarray(jac @ jac.T) / 4.0  # a Gram in units of gram_scale^2 = 4 scale^2
        log_norms = grad_log_norms(gram, 2.0 * scale)
        np.testing.assert_allclose(jnp.exp(log_norms) / scale, [5.0, 2.0, 0.0], rtol=1e-5)
        unit = rescaled_gram(gram, jnp.where(jnp.isfinite(log_norms), log_norms, 0.0))
        np.testing.assert_allclose(unit, [[1.0, 0.8, 0.0], [0.8, 1.0, 0.0], [0.0, 0.0, 0.0]], atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"gram": jnp.ones((2, 3))}, "square"),
        ({"gram": jnp.ones((3,))}, "square"),
        ({"gram": jnp.eye(2), "solver": "qp"}, "`solver` is 'qp'; expected one of"),
        ({"gram": jnp.eye(2), "active": jnp.ones(3, bool)}, "active"),
        ({"gram": jnp.eye(2), "max_iters": 0}, "max_iters"),
        ({"gram": jnp.eye(2), "tol": 0.0}, "tol"),
    ],
)
def test_bad_input_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        min_norm_weights(**kwargs)
