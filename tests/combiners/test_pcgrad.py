"""PCGrad: a hand-computed conflicting pair and TorchJD golden values, random orders from the state key, n = 2 never conflicts, edge cases."""

import itertools

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from matrix_cases import DEGENERATE, J_BASE, balanced, jacobians, jitted_update

from mojax.combiners.pcgrad import pcgrad

run2 = jitted_update(pcgrad(num_objectives=2, seed=0))
run3 = jitted_update(pcgrad(num_objectives=3, seed=0))


def reference_row(jac: np.ndarray, row: int, order: tuple[int, ...]) -> np.ndarray:
    """g_row projected in `order` onto every ORIGINAL g_j it conflicts with (float64, vector form).

    A g_j whose squared norm underflows fp32 relative to the largest entry (|g_j| < ~1e-23 |J|_max) is no
    projection target: its Gram entry is 0 in the fp32 Gram every combiner sees.
    """
    wide = jac.astype(np.float64)
    relative = (wide / (np.abs(wide).max() or 1.0)).astype(np.float32)
    projected = wide[row]
    for j in order:
        inner = projected @ wide[j]
        if j != row and inner < 0 and np.sum(relative[j] ** 2) > 0:
            projected = projected - inner / (wide[j] @ wide[j]) * wide[j]
    return projected


def test_conflicting_pair_and_orthogonal_rows():
    """g1 = (1,0), g2 = (-1,1): rows project to (0.5, 0.5) and (0, 1), d = (0.5, 1.5); orthogonal rows are unchanged."""
    direction, state = run2(np.array([[1.0, 0.0, 0.0], [-1.0, 1.0, 0.0]], np.float32))
    np.testing.assert_allclose(direction, [0.5, 1.5, 0.0], rtol=1e-6)
    np.testing.assert_allclose(state.weights, [2.0, 1.5], rtol=1e-6)
    direction, state = run2(np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]], np.float32))
    np.testing.assert_allclose(direction, [1.0, 2.0, 0.0])
    np.testing.assert_allclose(state.weights, [1.0, 1.0])


def test_torchjd_golden_value():
    """J_base: d = [0.5848, 3.8012, 3.8012], weights [2.2222, 1.5789] (TorchJD test_values.py)."""
    direction, state = run2(J_BASE)
    np.testing.assert_allclose(direction, [0.5848, 3.8012, 3.8012], atol=1e-4)
    np.testing.assert_allclose(state.weights, [2.2222, 1.5789], atol=1e-4)


def test_three_objectives_match_some_projection_order_and_orders_vary_across_steps():
    """Each step's d is the sum over rows of a reference projection in one of the orders; the key moves on."""
    jac = np.array([[1.0, 0.0, 0.0], [-1.0, 1.0, 0.2], [-0.5, -1.0, 0.3]], np.float32)
    rows = [
        [reference_row(jac, i, order) for order in itertools.permutations([j for j in range(3) if j != i])]
        for i in range(3)
    ]
    possible = [sum(choice) for choice in itertools.product(*rows)]
    assert len({tuple(np.round(p, 6)) for p in possible}) > 1, "degenerate check: the order must matter here"
    seen, state = set(), None
    for _ in range(12):
        direction, state = run3(jac, state)
        match = [k for k, p in enumerate(possible) if np.allclose(direction, p, atol=1e-5)]
        assert match, direction
        seen.add(tuple(np.round(direction, 5)))
    assert len(seen) > 1, "the projection orders never changed across steps"


def test_seed_fixes_the_orders():
    """Same seed, same directions; the orders come from the state, not from a global RNG."""
    jac = np.array([[1.0, 0.0, 0.0], [-1.0, 1.0, 0.2], [-0.5, -1.0, 0.3]], np.float32)
    other = jitted_update(pcgrad(num_objectives=3, seed=0))
    first, _ = run3(jac)
    second, _ = other(jac)
    np.testing.assert_array_equal(first, second)
    key_a = pcgrad(num_objectives=3, seed=0).init(None).key
    key_b = pcgrad(num_objectives=3, seed=1).init(None).key
    assert not np.array_equal(jax.random.key_data(key_a), jax.random.key_data(key_b))


@settings(max_examples=20, deadline=None)
@given(jacobians(2, 4))
def test_two_objectives_never_conflict_and_are_permutation_equivariant(jac):
    """n = 2: <d, g_i> >= 0 for both rows; swapping the rows swaps the weights."""
    direction, state = run2(jac)
    scale = float(np.sum(jac.astype(np.float64) ** 2))
    assert np.all(jac @ direction >= -1e-5 * scale)
    _, swapped = run2(jac[::-1].copy())
    np.testing.assert_allclose(np.asarray(swapped.weights)[::-1], state.weights, rtol=1e-5, atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(jacobians(2, 4).filter(balanced))
def test_weights_are_scale_invariant(jac):
    """Projections are ratios of inner products: the weights of k J equal those of J (k = 1e-20, 1e20 included)."""
    _, state = run2(jac)
    for factor in (1e-20, 1e-3, 1e3, 1e20):
        _, scaled = run2((jac.astype(np.float64) * factor).astype(np.float32))
        np.testing.assert_allclose(scaled.weights, state.weights, rtol=2e-4, atol=1e-5)


@pytest.mark.parametrize("case", sorted(DEGENERATE))
def test_degenerate_rows_give_finite_weights(case):
    """Zero, identical, anti-parallel rows, norms 1e-30 / 1e30: finite weights and the vector-form reference direction."""
    jac = DEGENERATE[case]
    direction, state = run2(jac)
    assert np.all(np.isfinite(np.asarray(state.weights))) and np.all(np.isfinite(direction))
    want = reference_row(jac, 0, (1,)) + reference_row(jac, 1, (0,))
    np.testing.assert_allclose(direction, want, rtol=1e-5, atol=1e-6 * np.abs(jac).max())


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"num_objectives": 0}, "num_objectives"), ({"num_objectives": 2, "seed": 0.5}, "seed")]
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pcgrad(**kwargs)
