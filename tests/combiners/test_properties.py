"""Shared property tests, written once and applied to every registry entry whose ``CombinerSpec.guarantees`` lists them.

Each entry is built by ``make(name, n)`` with its registry defaults (uniform weights and preferences), since a
non-uniform preference is itself not permutation equivariant. Scalar-mode entries read the per-sample extra
arguments of ``combiner_cases.extra_args``; permuting the objectives permutes those along their objective axis.
Every check runs two updates (the second on a fresh batch of extra arguments), so stateful entries are checked on
adapted weights, not only on their initial ones.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from combiner_cases import CASES, extra_args
from hypothesis import given, settings
from hypothesis import strategies as st
from matrix_cases import DEGENERATE, conditioning_for_weight_tolerance, jacobians, min_trace_normalized_eigenvalue

from mojax.combiners import REGISTRY, make

N, D = 3, 5
# Where the objective axis of each per-objective extra argument lies; the others are per sample or per token.
OBJECTIVE_AXIS = {"rewards": 1, "advantages": 0, "losses": 0}
SEEDS = st.integers(0, 2**16)

# Permuting J permutes its fp32 Gram entry for entry, so permuted weights can only differ through the solvers'
# stopping residual (~1e-7), which moves a solution by up to 1e-7 / lambda_min(G / tr G): lambda_min >= 1e-3 keeps
# that below the 1e-4 tolerance. Below it the optimum may not be unique (dependent rows) and only d is compared.
UNIQUE_OPTIMUM = 1e-3
TOLERANCE = 1e-4
# k = 2^10 is exact in fp32, so J and k J have the same trace-normalised Gram bit for bit; k = 2^70 overflows the raw
# fp32 Gram, which is then computed on J rescaled by its peak and differs by rounding only. The weights then agree to
# TOLERANCE above this conditioning (derived in matrix_cases and test_cagrad): min-norm and box QPs move by at most
# gap / lambda, PCGrad's coefficients <g_i, g_j> / |g_j|^2 (|g_j|^2 >= lambda tr G) by as much, and CAGrad's weights
# by the extra factor 1 + c (c = 0.5 by default), the largest amplification of the scale-invariant entries.
WELL_CONDITIONED = conditioning_for_weight_tolerance(D, TOLERANCE, amplification=1.5)
SCALES = (2.0**10, 2.0**70)


def entries_guaranteeing(prop: str) -> list[Any]:
    """One pytest parameter per registry entry whose guarantees list `prop`."""
    return [pytest.param(name, id=name) for name, spec in REGISTRY.items() if prop in spec.guarantees]


@functools.cache
def two_updates(name: str, n: int, d: int) -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    """(J f32[n, d], extras, next extras) -> (second update f32[d], its weights f32[n]), compiled once per shape."""
    tx = make(name, n)

    @jax.jit
    def run(jac, extras, next_extras):
        state = tx.init({"p": jnp.zeros((d,), jnp.float32)})
        _, state = tx.update({"p": jac}, state, **extras)
        update, state = tx.update({"p": jac}, state, **next_extras)
        return update["p"], state.weights

    def numpy_run(jac: np.ndarray, extras: dict, next_extras: dict) -> tuple[np.ndarray, np.ndarray]:
        update, weights = run(jnp.asarray(jac, jnp.float32), extras, next_extras)
        return np.asarray(update, np.float64), np.asarray(weights, np.float64)

    return numpy_run


def batches(name: str, n: int, seed: int) -> tuple[dict, dict]:
    """Two batches of the extra arguments `name` reads (empty dicts for most Gram entries)."""
    case = CASES[name]
    return extra_args(case, n, seed=seed), extra_args(case, n, seed=seed + 1)


def permuted(extras: dict, order: np.ndarray) -> dict:
    """The extra arguments with their objective axes permuted by `order`."""
    return {
        key: np.take(value, order, axis=OBJECTIVE_AXIS[key]) if key in OBJECTIVE_AXIS else value
        for key, value in extras.items()
    }


@pytest.mark.parametrize("name", entries_guaranteeing("permutation_equivariant"))
@settings(max_examples=15, deadline=None)
@given(jac=jacobians(N, D), order=st.permutations(range(N)), seed=SEEDS)
def test_permuting_objectives_permutes_the_weights_and_keeps_the_update(name, jac, order, seed):
    order = np.asarray(order)
    run = two_updates(name, N, D)
    extras, next_extras = batches(name, N, seed)
    update, weights = run(jac, extras, next_extras)
    permuted_update, permuted_weights = run(jac[order], permuted(extras, order), permuted(next_extras, order))
    np.testing.assert_allclose(permuted_update, update, rtol=TOLERANCE, atol=TOLERANCE * np.abs(jac).max())
    if not REGISTRY[name].uses_gram or min_trace_normalized_eigenvalue(jac) >= UNIQUE_OPTIMUM:
        scale = max(1.0, np.abs(weights).max())
        np.testing.assert_allclose(permuted_weights, weights[order], rtol=TOLERANCE, atol=TOLERANCE * scale)


def direction_weights(weights: np.ndarray) -> np.ndarray:
    """weights / sum |weights| (0 for zero weights): what a rescaling of J may not change."""
    total = np.abs(weights).sum()
    return weights / total if total > 0 else weights


@pytest.mark.parametrize("name", entries_guaranteeing("scale_invariant"))
@settings(max_examples=15, deadline=None)
@given(jacobians(N, D).filter(lambda jac: min_trace_normalized_eigenvalue(jac) >= WELL_CONDITIONED))
def test_scaling_the_gradients_keeps_the_update_direction(name, jac):
    """k J gives weights proportional to J's (so d(kJ) is parallel to d(J)): k = 2^10 exactly, k = 2^70 rescaled."""
    run = two_updates(name, N, D)
    _, weights = run(jac, {}, {})
    for factor in SCALES:
        _, scaled = run(jac * np.float32(factor), {}, {})
        np.testing.assert_allclose(direction_weights(scaled), direction_weights(weights), rtol=0.0, atol=TOLERANCE)


@pytest.mark.parametrize("name", entries_guaranteeing("non_conflicting"))
@settings(max_examples=15, deadline=None)
@given(jacobians(N, D))
def test_update_never_conflicts_with_an_objective(name, jac):
    """<d, g_i> >= 0 for every i, up to fp32 round-off and UPGrad's ridge reg_eps tr(G) |w| (reg_eps = 1e-4)."""
    update, weights = two_updates(name, N, D)(jac, {}, {})
    trace = float(np.sum(jac.astype(np.float64) ** 2))
    slack = 1e-4 * trace * np.abs(weights).max() + 1e-5 * trace
    assert np.all(jac.astype(np.float64) @ update >= -slack), jac @ update


@pytest.mark.parametrize("name", entries_guaranteeing("convex_weights"))
@settings(max_examples=15, deadline=None)
@given(jacobians(N, D), SEEDS)
def test_weights_lie_on_the_simplex(name, jac, seed):
    _, weights = two_updates(name, N, D)(jac, *batches(name, N, seed))
    assert np.all(weights >= -1e-6), weights
    assert abs(weights.sum() - 1.0) <= 1e-5, weights


@pytest.mark.parametrize("case", sorted(DEGENERATE))
@pytest.mark.parametrize("name", [pytest.param(name, id=name) for name in REGISTRY])
def test_degenerate_rows_never_give_nan(name, case):
    """Zero, identical and anti-parallel rows, and norms near 1e-30 and 1e30: finite weights and a finite update."""
    jac = DEGENERATE[case]
    update, weights = two_updates(name, *jac.shape)(jac, *batches(name, jac.shape[0], seed=0))
    assert np.all(np.isfinite(weights)) and np.all(np.isfinite(update)), (weights, update)
