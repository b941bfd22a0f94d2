"""gapo_rescale: the orthogonal table for p = 0, 1, 2, P-GAPO preferences, progress proportional to ||g_i||^p, exclusion below eps, extremes, jit/chain, errors."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mojax.combiners.gapo import gapo_rescale
from mojax.combiners.mgda import mgda


@functools.cache
def jitted(**config):
    """(combiner, jitted update) for one gapo_rescale configuration, built once so each shape compiles once."""
    tx = gapo_rescale(**config)
    return tx, jax.jit(lambda updates, state: tx.update(updates, state, None))


def run(jac, **config):
    """One jitted update of gapo_rescale(num_objectives=len(J), **config) on the rows of J: (direction, state)."""
    config.setdefault("num_objectives", len(jac))
    tx, update_fn = jitted(**config)
    update, state = update_fn({"w": jnp.asarray(jac)}, tx.init(None))
    return np.asarray(update["w"], np.float64), state


ORTHOGONAL = np.array([[1.0, 0.0], [0.0, 2.0]], np.float32)


@pytest.mark.parametrize(
    ("p", "alpha", "direction", "improvements"),
    [
        pytest.param(0.0, [0.8, 0.2], [0.8, 0.4], [0.8, 0.8], id="p=0 (MGDA) 1:1"),
        pytest.param(1.0, [0.5, 0.5], [0.5, 0.5], [0.5, 1.0], id="p=1 1:2"),
        pytest.param(2.0, [0.2, 0.8], [0.2, 0.4], [0.2, 0.8], id="p=2 1:4"),
    ],
)
def test_orthogonal_rows_give_progress_proportional_to_norm_power_table(p, alpha, direction, improvements):
    direction_seen, state = run(ORTHOGONAL, p=p)
    np.testing.assert_allclose(state.alpha, alpha, atol=1e-6)
    np.testing.assert_allclose(direction_seen, direction, atol=1e-6)
    np.testing.assert_allclose(ORTHOGONAL @ direction_seen, improvements, atol=1e-6)
    np.testing.assert_allclose(state.weights, np.asarray(alpha) / np.array([1.0, 2.0]) ** p, atol=1e-6)
    np.testing.assert_allclose(state.grad_norms, [1.0, 2.0])


def test_preference_weights_unit_gradients():
    """P-GAPO with lambda = (0.3, 0.7): d = 0.3 (1, 0) + 0.7 (0, 1), loss weights lambda_i / ||g_i||."""
    direction, state = run(ORTHOGONAL, preference=(0.3, 0.7))
    np.testing.assert_allclose(direction, [0.3, 0.7], atol=1e-6)
    np.testing.assert_allclose(state.weights, [0.3, 0.35], atol=1e-6)
    np.testing.assert_allclose(state.alpha, [0.3, 0.7], atol=1e-6)


def test_p1_equals_mgda_with_l2_normalisation():
    jac = jax.random.normal(jax.random.key(3), (3, 6))
    mgda_tx = mgda(num_objectives=3, normalize="l2")
    expected, _ = jax.jit(mgda_tx.update)(jac, mgda_tx.init(None))
    direction, _ = run(np.asarray(jac), p=1.0)
    np.testing.assert_allclose(direction, expected, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    n=st.sampled_from([2, 4]),
    p=st.sampled_from([0.5, 2.0]),  # p = 0 and 1 are MGDA and MGDA-l2, tested above and in test_mgda
    d=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_progress_proportional_to_norm_power(n, p, d, seed):
    """<d, g_i> / ||g_i||^p = ||d||^2 on the support and >= it elsewhere (Theorem 3.3 via the KKT conditions)."""
    rng = np.random.default_rng(seed)
    jac = np.zeros((n, 6), np.float32)  # d <= 6 columns, zero-padded so that each (n, p) compiles once
    jac[:, :d] = rng.normal(size=(n, d)) * 10.0 ** rng.uniform(-1, 1, size=(n, 1))
    direction, state = run(jac, p=p)
    norms = np.linalg.norm(jac.astype(np.float64), axis=1)
    per_unit_progress = jac.astype(np.float64) @ direction / norms**p
    norm_sq = direction @ direction
    tol = 1e-5 * np.max(norms ** (2 - 2 * p))  # the rescaled Gram's largest entry
    alpha = np.asarray(state.alpha)
    assert np.all(per_unit_progress >= norm_sq - tol)
    np.testing.assert_allclose(per_unit_progress[alpha > 0], norm_sq, atol=tol)
    np.testing.assert_allclose(alpha.sum(), 1.0, atol=1e-6)


def test_objectives_below_eps_are_excluded():
    """With p = 2 a 1e-9 gradient would be rescaled to length 1e9; excluded, the rest is the orthogonal table's p = 2 row."""
    jac = np.array([[1.0, 0.0], [0.0, 2.0], [1e-9, 1e-9]], np.float32)
    direction, state = run(jac, p=2.0)
    np.testing.assert_allclose(state.alpha, [0.2, 0.8, 0.0], atol=1e-6)
    np.testing.assert_allclose(direction, [0.2, 0.4], atol=1e-6)
    assert state.weights[2] == 0.0
    direction, state = run(jac, preference=(0.2, 0.3, 0.5))
    np.testing.assert_allclose(state.alpha, [0.2, 0.3, 0.0], atol=1e-7)
    np.testing.assert_allclose(direction, [0.2, 0.3], atol=1e-6)


@pytest.mark.parametrize("preference", [None, (0.5, 0.5)])
def test_all_below_eps_gives_a_zero_update(preference):
    direction, state = run(ORTHOGONAL * np.float32(1e-30), preference=preference, num_objectives=2)
    np.testing.assert_array_equal(direction, [0.0, 0.0])
    np.testing.assert_array_equal(state.weights, [0.0, 0.0])


@pytest.mark.parametrize("p", [0.0, 1.0, 2.0])
def test_single_objective_is_the_rescaled_gradient(p):
    direction, state = run(np.array([[3.0, -4.0]], np.float32), p=p)
    np.testing.assert_allclose(direction, np.array([3.0, -4.0]) / 5.0**p, rtol=1e-6)
    np.testing.assert_allclose(state.alpha, [1.0])


@pytest.mark.parametrize("p", [0.0, 1.0, 2.0])
def test_anti_parallel_gradients_stall_without_nan(p):
    direction, state = run(np.array([[1.0, 2.0], [-3.0, -6.0]], np.float32), p=p)
    np.testing.assert_allclose(direction, [0.0, 0.0], atol=1e-6)
    assert np.all(np.isfinite(state.weights))


@pytest.mark.parametrize(
    ("scale", "eps", "p"),
    [(1e30, 1e-8, 1.0), (1e30, 1e-8, 0.0), (1e-30, 1e-35, 1.0), (1e-15, 1e-18, 2.0)],
)
def test_extreme_norms(scale, eps, p):
    """1e30 and 1e-30 gradients (eps below them) give the unscaled orthogonal-table answer times scale^(1 - p)."""
    direction, state = run(ORTHOGONAL * np.float32(scale), p=p, eps=eps)
    expected = {0.0: [0.8, 0.4], 1.0: [0.5, 0.5], 2.0: [0.2, 0.4]}[p]
    assert np.all(np.isfinite(state.weights)) and np.all(np.isfinite(direction))
    np.testing.assert_allclose(direction, np.asarray(expected) * scale ** (1 - p), rtol=2e-5)


@pytest.mark.parametrize("preference", [None, (0.3, 0.7)])
def test_bf16_updates(preference):
    tx, update_fn = jitted(num_objectives=2, preference=preference)
    update, state = update_fn({"w": jnp.asarray(ORTHOGONAL, jnp.bfloat16)}, tx.init(None))
    assert update["w"].dtype == jnp.bfloat16 and state.weights.dtype == jnp.float32
    expected = [0.5, 0.5] if preference is None else [0.3, 0.7]
    np.testing.assert_allclose(np.asarray(update["w"], np.float32), expected, atol=1e-2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"preference": (0.5, 0.5), "num_objectives": 3}, "`num_objectives` is inconsistent"),
        ({"preference": (0.5, 0.6)}, "simplex"),
        ({"preference": (1.5, -0.5)}, "simplex"),
        ({"preference": (np.nan, 1.0)}, "finite entries"),
        ({"preference": [[0.5, 0.5]]}, "preference"),
        ({"num_objectives": 2, "p": -1.0}, "p must be"),
        ({"num_objectives": 2, "p": float("inf")}, "p must be"),
        ({"num_objectives": 2, "eps": 0.0}, "eps"),
        ({"num_objectives": 2, "p": 2.0, "eps": 1e-20}, "overflow"),
        ({"num_objectives": 2, "solver": "qp"}, "solver"),
        ({}, "num_objectives"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        gapo_rescale(**kwargs)


@pytest.mark.parametrize("preference", [None, (0.5, 0.5)])
def test_wrong_objective_count_raises(preference):
    tx = gapo_rescale(preference=preference, num_objectives=2)
    with pytest.raises(ValueError, match="built for 2"):
        tx.update({"w": jnp.ones((3, 4))}, tx.init(None))
