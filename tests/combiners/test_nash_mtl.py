"""Nash-MTL: a hand-computed orthogonal example, the bargaining equation G a = 1/a, scale (a ~ 1/k, d fixed), warm start, degenerate rows."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from matrix_cases import DEGENERATE, jacobians, jitted_update

from mojax.combiners.nash_mtl import nash_mtl

capped2 = jitted_update(nash_mtl(num_objectives=2))
free3 = jitted_update(nash_mtl(num_objectives=3, max_norm=None))
ORTHOGONAL = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]], np.float32)


def independent(jac: np.ndarray) -> bool:
    """Rows far from linearly dependent, so the regulariser barely moves the solution."""
    gram = jac.astype(np.float64) @ jac.T.astype(np.float64)
    return bool(np.linalg.eigvalsh(gram / np.trace(gram))[0] > 1e-2)


def test_orthogonal_rows_known_answer():
    """g1 = (1,0), g2 = (0,2): a = (1, 0.5), d = (1, 1); with max_norm = 1, d = (1, 1)/sqrt(2)."""
    direction, state = jitted_update(nash_mtl(num_objectives=2, max_norm=None))(ORTHOGONAL)
    np.testing.assert_allclose(state.weights, [1.0, 0.5], rtol=1e-5)
    np.testing.assert_allclose(direction, [1.0, 1.0, 0.0], rtol=1e-5, atol=1e-7)
    direction, _ = capped2(ORTHOGONAL)
    np.testing.assert_allclose(direction, [2**-0.5, 2**-0.5, 0.0], rtol=1e-5, atol=1e-7)


def test_orthogonal_rows_get_inverse_norms():
    """a_i = 1/|g_i| for orthogonal g_i, so d = sum_i g_i/|g_i|."""
    jac = np.diag([0.5, 3.0, 40.0]).astype(np.float32)
    _, state = free3(jac)
    np.testing.assert_allclose(state.weights, [2.0, 1 / 3, 1 / 40], rtol=1e-5)


@settings(max_examples=20, deadline=None)
@given(jacobians(3, 5).filter(independent))
def test_solves_the_bargaining_equation_and_has_norm_sqrt_n(jac):
    """a_i <g_i, d> = 1 for every i (the Nash bargaining solution), hence |d|^2 = sum_i a_i <g_i, d> = n."""
    direction, state = free3(jac)
    alpha = np.asarray(state.weights, np.float64)
    np.testing.assert_allclose(alpha * (jac.astype(np.float64) @ direction), 1.0, rtol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(direction), np.sqrt(3), rtol=1e-3)


@settings(max_examples=15, deadline=None)
@given(jacobians(3, 5).filter(independent), st.sampled_from([1e-20, 1e-3, 1e3, 1e20]))
def test_alpha_scales_inversely_and_d_does_not_move(jac, factor):
    """G -> k^2 G gives a -> a / k (through gram_scale when k^2 G leaves fp32), and the same d."""
    direction, state = free3(jac)
    scaled_direction, scaled = free3((jac.astype(np.float64) * factor).astype(np.float32))
    np.testing.assert_allclose(np.asarray(scaled.weights, np.float64) * factor, state.weights, rtol=1e-4)
    np.testing.assert_allclose(scaled_direction, direction, rtol=1e-4, atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(jacobians(3, 5), st.permutations(range(3)))
def test_permutation_equivariant(jac, order):
    order = np.asarray(order)
    direction, state = free3(jac)
    permuted_direction, permuted = free3(jac[order])
    np.testing.assert_allclose(np.asarray(permuted.weights), np.asarray(state.weights)[order], rtol=1e-4)
    np.testing.assert_allclose(permuted_direction, direction, rtol=1e-4, atol=1e-4 * np.abs(jac).max())


def test_warm_start_comes_from_the_state():
    """With one Newton step, a state that already holds the solution reproduces it; a fresh state does not."""
    jac = np.array([[1.0, 0.3, 0.0], [-0.2, 2.0, 0.5], [0.1, 0.0, 5.0]], np.float32)
    one_step = jitted_update(nash_mtl(num_objectives=3, max_norm=None, max_iters=1))
    _, solved = free3(jac)
    _, cold = one_step(jac)
    _, warm = one_step(jac, solved)
    np.testing.assert_allclose(warm.weights, solved.weights, rtol=1e-5)
    assert not np.allclose(cold.weights, solved.weights, rtol=1e-2)
    np.testing.assert_allclose(warm.alpha, solved.alpha, rtol=1e-5)


@pytest.mark.parametrize("case", sorted(DEGENERATE))
def test_degenerate_rows_give_finite_bounded_directions(case):
    """Zero, identical, anti-parallel rows, norms 1e-30 / 1e30: finite weights, |d| <= max_norm; anti-parallel: |d| = O(sqrt(reg_eps))."""
    jac = DEGENERATE[case]
    direction, state = capped2(jac)
    assert np.all(np.isfinite(np.asarray(state.weights))) and np.all(np.isfinite(direction))
    assert np.all(np.isfinite(np.asarray(state.alpha))) and np.all(np.asarray(state.alpha) > 0)
    assert np.linalg.norm(direction) <= 1.0 + 1e-5
    if case == "anti_parallel":
        assert np.linalg.norm(direction) < 1e-2
    if case in ("tiny", "huge", "zero_row"):
        assert np.linalg.norm(direction) == pytest.approx(1.0, rel=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_norm": 0.0}, "max_norm"),
        ({"max_norm": -1.0}, "max_norm"),
        ({"reg_eps": 0.0}, "reg_eps"),
        ({"max_iters": 0}, "max_iters"),
        ({"num_objectives": 0}, "num_objectives"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        nash_mtl(**{"num_objectives": 2, **kwargs})
