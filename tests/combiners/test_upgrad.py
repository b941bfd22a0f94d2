"""UPGrad: hand-computed and TorchJD golden values, never conflicts, permutation equivariance, scale, preference, degenerate rows."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from matrix_cases import DEGENERATE, J_BASE, balanced, jacobians, jitted_update

from mojax.combiners.pcgrad import pcgrad
from mojax.combiners.upgrad import upgrad

run2 = jitted_update(upgrad(num_objectives=2))
exact2 = jitted_update(upgrad(num_objectives=2, reg_eps=0.0))
run3 = jitted_update(upgrad(num_objectives=3))
unthresholded3 = jitted_update(upgrad(num_objectives=3, norm_eps=0.0))


def padded(rows) -> np.ndarray:
    """f32[n, 3] from 2-D rows (a zero third coordinate, so every case shares one compiled shape)."""
    rows = np.asarray(rows, np.float32)
    return np.concatenate([rows, np.zeros((len(rows), 1), np.float32)], axis=1)


@pytest.mark.parametrize(
    ("rows", "weights", "direction"),
    [
        ([[1.0, 0.0], [-1.0, 1.0]], [1.0, 0.75], [0.25, 0.75]),
        ([[1.0, 0.0], [0.0, 2.0]], [0.5, 0.5], [0.5, 1.0]),
        ([[1.0, 0.0], [-1.0, 0.1]], [1.0, 0.99505], [0.00495, 0.099505]),
    ],
)
def test_hand_computed_known_answers(rows, weights, direction):
    """The hand-computed values exactly without the regulariser, and within 1e-3 with the default reg_eps = 1e-4."""
    for run, tol in ((exact2, 2e-5), (run2, 1e-3)):
        got, state = run(padded(rows))
        np.testing.assert_allclose(state.weights, weights, atol=tol)
        np.testing.assert_allclose(got, direction + [0.0], atol=tol)


def test_torchjd_golden_value():
    """J_base: d = [0.2929, 1.9004, 1.9004] (TorchJD test_values.py, default norm_eps = reg_eps = 1e-4)."""
    direction, _ = run2(J_BASE)
    np.testing.assert_allclose(direction, [0.2929, 1.9004, 1.9004], atol=1e-4)


def test_two_objectives_with_one_conflict_is_half_of_pcgrad():
    """n = 2: projecting onto the dual cone is PCGrad's projection, and UPGrad averages where PCGrad sums."""
    jac = padded([[2.0, 0.5], [-1.0, 1.5]])
    upgrad_direction, _ = exact2(jac)
    pcgrad_direction, _ = jitted_update(pcgrad(num_objectives=2))(jac)
    np.testing.assert_allclose(upgrad_direction, pcgrad_direction / 2, rtol=1e-5, atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(jacobians(3, 5))
def test_never_conflicts(jac):
    """<d, g_j> >= 0 for all j, up to the regulariser's slack reg_eps tr(G) |w|."""
    direction, state = run3(jac)
    trace = float(np.sum(jac.astype(np.float64) ** 2))
    slack = 1e-4 * trace * np.abs(np.asarray(state.weights)).max() + 1e-5 * trace
    assert np.all(jac.astype(np.float64) @ direction >= -slack), jac @ direction


@settings(max_examples=20, deadline=None)
@given(jacobians(3, 5), st.permutations(range(3)))
def test_permutation_equivariant(jac, order):
    """Permuting the objectives permutes the weights and leaves d unchanged."""
    order = np.asarray(order)
    direction, state = run3(jac)
    permuted_direction, permuted = run3(jac[order])
    np.testing.assert_allclose(np.asarray(permuted.weights), np.asarray(state.weights)[order], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(permuted_direction, direction, rtol=1e-4, atol=1e-5 * np.abs(jac).max())


@settings(max_examples=15, deadline=None)
@given(jacobians(3, 5).filter(balanced))
def test_weights_are_scale_invariant_above_norm_eps(jac):
    """G is trace-normalised: k J has J's weights (so d is linear in k) while tr(k^2 G) >= norm_eps, up to k = 1e20."""
    _, state = run3(jac)
    for factor in (10.0, 1e20):
        _, scaled = run3((jac.astype(np.float64) * factor).astype(np.float32))
        np.testing.assert_allclose(scaled.weights, state.weights, rtol=1e-4, atol=1e-5)
    _, tiny = unthresholded3((jac.astype(np.float64) * 1e-30).astype(np.float32))
    _, reference = unthresholded3(jac)
    np.testing.assert_allclose(tiny.weights, reference.weights, rtol=1e-4, atol=1e-5)


def test_below_norm_eps_falls_back_to_the_preference_weights():
    """TorchJD zeroes G when tr(G) < norm_eps; the QP then returns u, so d = sum_i p_i g_i (here a conflicting mean)."""
    jac = padded([[1.0, 0.0], [-1.0, 1.0]]) * 1e-3
    _, state = run2(jac)
    np.testing.assert_allclose(state.weights, [0.5, 0.5], rtol=1e-6)
    _, unthresholded = jitted_update(upgrad(num_objectives=2, norm_eps=0.0))(jac)
    np.testing.assert_allclose(unthresholded.weights, [1.0, 0.75], atol=1e-3)


def test_preference_weights_the_projections():
    """Orthogonal rows are already in the dual cone, so w = preference."""
    jac = padded([[1.0, 0.0], [0.0, 2.0]])
    _, state = jitted_update(upgrad(preference=[0.2, 0.8]))(jac)
    np.testing.assert_allclose(state.weights, [0.2, 0.8], atol=1e-4)


@pytest.mark.parametrize("case", sorted(DEGENERATE))
def test_degenerate_rows_give_finite_non_conflicting_directions(case):
    """Zero, identical, anti-parallel rows, norms 1e-30 / 1e30: finite weights, and d never points against a row."""
    jac = DEGENERATE[case]
    direction, state = run2(jac)
    assert np.all(np.isfinite(np.asarray(state.weights))) and np.all(np.isfinite(direction))
    if case not in ("tiny",):  # below norm_eps: the documented mean fallback
        slack = 1e-3 * np.sum(jac.astype(np.float64) ** 2) * np.abs(np.asarray(state.weights)).max()
        assert np.all(jac.astype(np.float64) @ direction >= -slack)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_objectives": 3, "preference": [0.5, 0.5]}, "`num_objectives` is inconsistent"),
        ({"num_objectives": 2, "preference": [1.0, -0.5]}, "preference"),
        ({"num_objectives": 2, "norm_eps": -1.0}, "norm_eps"),
        ({"num_objectives": 2, "reg_eps": float("nan")}, "reg_eps"),
        ({}, "num_objectives"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        upgrad(**kwargs)
