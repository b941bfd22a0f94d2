"""CAGrad: a hand-computed orthogonal example and TorchJD golden values, optimality of the ball problem, thresholds."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from matrix_cases import (
    DEGENERATE,
    J_BASE,
    conditioning_for_weight_tolerance,
    jacobians,
    jitted_update,
    min_trace_normalized_eigenvalue,
)

from mojax.combiners.cagrad import cagrad
from mojax.combiners.qp import simplex_min_norm

plain2 = jitted_update(cagrad(num_objectives=2, rescale=0))
plain3 = jitted_update(cagrad(num_objectives=3, rescale=0))
ORTHOGONAL = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]], np.float32)


@pytest.mark.parametrize(("rescale", "divisor"), [(0, 1.0), (1, 1.25), (2, 1.5)])
def test_orthogonal_rows_known_answer_for_each_rescale(rescale, divisor):
    """g1 = (1,0), g2 = (0,2), c = 0.5: w* = (1, 0), d = g_0 + 0.5 sqrt(1.25) (1, 0) = (1.059017, 1), then / (1 + c^2) or / (1 + c)."""
    direction, state = jitted_update(cagrad(num_objectives=2, c=0.5, rescale=rescale))(ORTHOGONAL)
    np.testing.assert_allclose(direction, np.array([1.059017, 1.0, 0.0]) / divisor, rtol=1e-5)
    np.testing.assert_allclose(state.weights, np.array([1.059017, 0.5]) / divisor, rtol=1e-5)


def test_c_zero_is_the_mean_gradient():
    direction, state = jitted_update(cagrad(num_objectives=2, c=0.0))(ORTHOGONAL)
    np.testing.assert_allclose(state.weights, [0.5, 0.5])
    np.testing.assert_allclose(direction, [0.5, 1.0, 0.0])


def test_torchjd_golden_value():
    """J_base, c = 0.5 (TorchJD has no rescaling): d = [0.1835, 1.2041, 1.2041]."""
    direction, _ = plain2(J_BASE)
    np.testing.assert_allclose(direction, [0.1835, 1.2041, 1.2041], atol=1e-4)


@settings(max_examples=20, deadline=None)
@given(jacobians(3, 5))
def test_direction_solves_the_ball_problem(jac):
    """d = g_0 + c|g_0| g_w/|g_w| lies on the ball's boundary and w* is optimal: <g_i, d> >= <g_w*, d>, with equality on supp(w*)."""
    direction, state = plain3(jac)
    wide = jac.astype(np.float64)
    if not np.any(state.weights):  # |g_w*| < 1e-3 |J|_F: then 0 is (nearly) in the convex hull of the rows
        closest = np.asarray(simplex_min_norm(jnp.asarray(jac @ jac.T)), np.float64)
        assert np.linalg.norm(closest @ wide) < 1e-3 * np.sqrt(np.sum(wide**2))
        return
    mean = wide.mean(axis=0)
    radius = 0.5 * np.linalg.norm(mean)
    scale = np.sum(wide**2)
    np.testing.assert_allclose(np.linalg.norm(direction - mean), radius, rtol=1e-4, atol=1e-5 * np.sqrt(scale))
    extra = np.asarray(state.weights, np.float64) - 1.0 / 3
    best = extra / extra.sum()
    improvements = wide @ direction
    worst = best @ improvements
    assert np.all(improvements >= worst - 1e-4 * scale)
    np.testing.assert_allclose(improvements[best > 1e-3], worst, atol=1e-4 * scale)


# The scale test compares the weights of J and of fl(k J) to 1e-4, which assumes well-conditioned rows. The two fp32
# trace-normalised Grams differ by rounding only, at most gap = 2 (d + 6) u in spectral norm (u = 2^-24, see
# matrix_cases.gram_rounding_gap). With lambda = lambda_min(G / tr G), the min-norm problem's curvature, w* moves by at
# most gap / lambda, and w = 1/n + (c |g_0| / |g_w*|) w* multiplies that by at most 1 + c / sqrt(lambda), because
# |g_w*|^2 >= lambda / n and |g_0|^2 <= 1 / n in units of tr G; for lambda <= 1 the total is <= (1 + c) gap /
# lambda^(3/2). Requiring it <= 1e-4 gives lambda >= ((1 + c) gap / 1e-4)^(2/3), about 0.073 for d = 5, c = 0.5, and
# the test draws only such Jacobians. Nearly equal rows (lambda ~ 1e-6) make w* ill-determined: one such Jacobian
# moved the weights by 1.5e-4. The root conftest's derandomized hypothesis profile makes the draws deterministic.
SCALE_TOLERANCE = 1e-4
WELL_CONDITIONED = conditioning_for_weight_tolerance(5, SCALE_TOLERANCE, amplification=1.0 + 0.5)


@settings(max_examples=15, deadline=None)
@given(jacobians(3, 5).filter(lambda jac: min_trace_normalized_eigenvalue(jac) >= WELL_CONDITIONED))
def test_weights_are_scale_invariant_above_norm_eps(jac):
    """Only ratios of norms enter the weights: k J has J's weights for k up to 1e20 (well-conditioned rows, see above)."""
    _, state = plain3(jac)
    for factor in (10.0, 1e20):
        _, scaled = plain3((jac.astype(np.float64) * factor).astype(np.float32))
        np.testing.assert_allclose(scaled.weights, state.weights, rtol=0.0, atol=SCALE_TOLERANCE)


def test_below_norm_eps_gives_zero_weights():
    """TorchJD's rule: tr(G) < norm_eps zeroes the normalised Gram, |g_w| < norm_eps, so the weights are 0."""
    _, state = plain2(ORTHOGONAL * 1e-3)
    np.testing.assert_array_equal(state.weights, [0.0, 0.0])
    _, unthresholded = jitted_update(cagrad(num_objectives=2, rescale=0, norm_eps=0.0))(ORTHOGONAL * 1e-3)
    np.testing.assert_allclose(unthresholded.weights, [1.059017, 0.5], rtol=1e-5)


def test_pareto_stationary_rows_give_zero_weights_at_every_scale():
    """g_w* = 0 exactly (a conflicting pair spans 0): |g_w*| is fp32 round-off, so the weights are 0 at any scale."""
    jac = np.zeros((3, 5), np.float32)
    jac[0, 1], jac[1, 1], jac[2, 0] = -1.25, 1.75, 1.0
    for factor in (1.0, 10.0, 1e20):
        _, state = plain3(jac * np.float32(factor))
        np.testing.assert_array_equal(state.weights, [0.0, 0.0, 0.0])


@pytest.mark.parametrize("case", sorted(DEGENERATE))
def test_degenerate_rows_give_finite_weights(case):
    """Zero, identical, anti-parallel rows, norms 1e-30 / 1e30: finite weights; d stays within the ball around g_0."""
    jac = DEGENERATE[case]
    direction, state = plain2(jac)
    weights = np.asarray(state.weights)
    assert np.all(np.isfinite(weights)) and np.all(np.isfinite(direction))
    assert np.all(weights >= 0)
    if np.any(weights):
        mean = jac.astype(np.float64).mean(axis=0)
        assert np.linalg.norm(direction - mean) <= 0.5 * np.linalg.norm(mean) * (1 + 1e-4) + 1e-6 * np.abs(jac).max()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"c": -0.1}, "`c`"),
        ({"c": float("inf")}, "`c`"),
        ({"rescale": 3}, "rescale"),
        ({"norm_eps": -1.0}, "norm_eps"),
        ({"num_objectives": 0}, "num_objectives"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cagrad(**{"num_objectives": 2, **kwargs})
