"""Pareto front, hypervolume and rewarded-soup interpolation against brute-force numpy transcriptions."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mojax.pareto import hypervolume, interpolate_params, non_dominated, soup_front


def brute_force_front(points, maximize=True):
    """A point is on the front unless another is >= everywhere and > somewhere (explicit double loop)."""
    points = np.asarray(points, float) * (1 if maximize else -1)
    front = []
    for p in points:
        dominated = False
        for q in points:
            if all(q[i] >= p[i] for i in range(len(p))) and any(q[i] > p[i] for i in range(len(p))):
                dominated = True
        front.append(not dominated)
    return np.array(front)


def grid_count(points, reference):
    """Hypervolume of integer points as the number of unit cells [c, c + 1] inside some box [reference, p]."""
    points = np.asarray(points, int)
    reference = np.asarray(reference, int)
    upper = points.max(axis=0)
    count = 0
    for corner in itertools.product(*(range(r, u) for r, u in zip(reference, upper, strict=True))):
        if any(np.all(np.asarray(corner) + 1 <= p) for p in points):
            count += 1
    return count


def integer_points(max_objectives=4, max_value=4):
    shapes = st.tuples(st.integers(1, 8), st.integers(1, max_objectives))
    return shapes.flatmap(lambda shape: hnp.arrays(np.int64, shape, elements=st.integers(0, max_value)))


@given(integer_points(), st.booleans())
def test_non_dominated_matches_the_brute_force_loop(points, maximize):
    np.testing.assert_array_equal(non_dominated(points, maximize=maximize), brute_force_front(points, maximize))


def test_non_dominated_keeps_ties_and_drops_dominated_points():
    points = [[1, 1], [1, 1], [0, 1], [2, 0]]
    assert non_dominated(points).tolist() == [True, True, False, True]
    assert non_dominated(points, maximize=False).tolist() == [False, False, True, True]


def test_hypervolume_of_hand_computed_areas_and_volumes():
    assert hypervolume([[2.0, 3.0]], [0.0, 0.0]) == 6.0
    # Staircase (1, 3), (2, 2), (3, 1) above (0, 0): 3 + 2 + 1.
    assert hypervolume([[1, 3], [2, 2], [3, 1]], [0, 0]) == 6.0
    # Reference (0.5, 0.5): columns of width 0.5 + 1 + 1 and heights 2.5, 1.5, 0.5.
    assert hypervolume([[1, 3], [2, 2], [3, 1]], [0.5, 0.5]) == pytest.approx(0.5 * 2.5 + 1.5 + 0.5)
    # Boxes 2x2x1 and 1x1x3 overlap in a 1x1x1 cube: 4 + 3 - 1.
    assert hypervolume([[2, 2, 1], [1, 1, 3]], [0, 0, 0]) == 6.0
    # Three unit-overlapping boxes (2,1,1), (1,2,1), (1,1,2): 2 + 2 + 2 - 1 - 1 - 1 + 1.
    assert hypervolume([[2, 1, 1], [1, 2, 1], [1, 1, 2]], [0, 0, 0]) == 4.0
    assert hypervolume([[3.0]], [1.0]) == 2.0


def test_hypervolume_ignores_points_that_do_not_beat_the_reference():
    assert hypervolume([[1.0, -1.0], [0.0, 5.0]], [0.0, 0.0]) == 0.0
    assert hypervolume(np.zeros((0, 3)), [0.0, 0.0, 0.0]) == 0.0
    assert hypervolume([[2.0, 2.0], [1.0, 1.0], [1.0, 5.0]], [0.0, 0.0]) == 4.0 + 3.0


@given(integer_points(max_objectives=4, max_value=4))
def test_hypervolume_equals_the_unit_cell_count_on_integer_points(points):
    reference = np.zeros(points.shape[1], int)
    assert hypervolume(points, reference) == grid_count(points, reference)


@given(integer_points(max_objectives=3, max_value=5), st.randoms(use_true_random=False))
def test_hypervolume_is_invariant_to_order_and_mirrors_for_minimisation(points, random):
    reference = np.full(points.shape[1], -1.0)
    volume = hypervolume(points, reference)
    rows = list(range(points.shape[0]))
    columns = list(range(points.shape[1]))
    random.shuffle(rows)
    random.shuffle(columns)
    assert hypervolume(points[rows][:, columns], reference[columns]) == pytest.approx(volume)
    assert hypervolume(-points, -reference, maximize=False) == pytest.approx(volume)


def test_pareto_functions_reject_bad_points():
    with pytest.raises(ValueError, match=r"non_dominated: `points` holds NaN or inf"):
        non_dominated([[np.nan, 1.0]])
    with pytest.raises(ValueError, match=r"non_dominated: `points` has shape \(3,\)"):
        non_dominated([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"hypervolume: `reference` has 3 entries"):
        hypervolume([[1.0, 2.0]], [0.0, 0.0, 0.0])


def policies():
    """Three pytrees with float32, bfloat16 and integer leaves."""
    return [
        {
            "dense": {"kernel": jnp.arange(6, dtype=jnp.float32).reshape(2, 3) * scale, "bias": jnp.full(3, scale)},
            "half": jnp.array([0.1, -2.5], jnp.bfloat16) * scale,
            "count": jnp.array(7, jnp.int32),
        }
        for scale in (1.0, -3.0, 0.5)
    ]


def leaves_of(tree):
    return [tree["count"], tree["dense"]["bias"], tree["dense"]["kernel"], tree["half"]]


def test_interpolation_is_exact_at_the_vertices():
    params = policies()
    for i, vertex in enumerate(np.eye(3)):
        soup = interpolate_params(params, vertex)
        for leaf, expected in zip(leaves_of(soup), leaves_of(params[i]), strict=True):
            assert leaf.dtype == expected.dtype
            np.testing.assert_array_equal(np.asarray(leaf), np.asarray(expected))


def test_interpolation_is_the_weighted_sum_of_the_policies():
    params = policies()
    weights = np.array([0.2, 0.5, 0.3])
    soup = interpolate_params(params, weights)
    expected = sum(w * np.asarray(p["dense"]["kernel"], np.float64) for w, p in zip(weights, params, strict=True))
    np.testing.assert_allclose(np.asarray(soup["dense"]["kernel"]), expected, rtol=1e-6)
    halves = sum(w * np.asarray(p["half"], np.float64) for w, p in zip(weights, params, strict=True))
    np.testing.assert_allclose(np.asarray(soup["half"], np.float64), halves, rtol=1e-2)
    assert int(soup["count"]) == 7


@given(st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_interpolation_is_linear_along_the_segment(a, b):
    params = policies()[:2]
    point = lambda t: np.asarray(interpolate_params(params, [1 - t, t])["dense"]["kernel"], np.float64)
    middle = np.asarray(interpolate_params(params, [1 - (a + b) / 2, (a + b) / 2])["dense"]["kernel"], np.float64)
    np.testing.assert_allclose(middle, (point(a) + point(b)) / 2, atol=1e-5)


def test_interpolation_rejects_mismatched_policies_and_weights():
    params = policies()
    with pytest.raises(ValueError, match=r"interpolate_params: `weights` is \[0.5, 0.6, -0.1\]"):
        interpolate_params(params, [0.5, 0.6, -0.1])
    with pytest.raises(ValueError, match=r"interpolate_params: `weights` has 2 entries"):
        interpolate_params(params, [0.5, 0.5])
    with pytest.raises(ValueError, match=r"params_list\[1\]\['dense'\]\['bias'\]` is float32\[4\]"):
        interpolate_params(
            [params[0], {**params[1], "dense": {**params[1]["dense"], "bias": jnp.zeros(4)}}], [0.5, 0.5]
        )
    with pytest.raises(ValueError, match=r"`params_list\[1\]` has another tree structure"):
        interpolate_params([params[0], {"dense": params[1]["dense"]}], [0.5, 0.5])
    with pytest.raises(ValueError, match=r"\['count'\]` is a int32 leaf that differs"):
        interpolate_params([params[0], {**params[1], "count": jnp.array(8, jnp.int32)}], [0.5, 0.5])


def test_soup_front_sweeps_the_segment_and_marks_the_front():
    start, end = {"x": jnp.array([1.0, 0.0])}, {"x": jnp.array([0.0, 1.0])}
    # The objectives x0 and x1 trade off linearly, so every point is on the front; a dent in x1 at the
    # midpoint lets its neighbour (0.25, 0.75) dominate it.
    evaluate = lambda p: np.asarray(p["x"], np.float64)
    sweep = soup_front([start, end], evaluate, num_points=5)
    np.testing.assert_allclose(sweep.weights, [[1, 0], [0.75, 0.25], [0.5, 0.5], [0.25, 0.75], [0, 1]])
    np.testing.assert_allclose(sweep.values, sweep.weights, atol=1e-7)
    assert sweep.front.tolist() == [True] * 5
    dented = soup_front([start, end], lambda p: [float(p["x"][0]), float(p["x"][1] - 2 * (p["x"][1] == 0.5))], 5)
    assert dented.front.tolist() == [True, True, False, True, True]


def test_soup_front_checks_its_arguments():
    params = [{"x": jnp.zeros(2)}] * 3
    with pytest.raises(ValueError, match=r"soup_front: `params_list` holds 3 pytrees"):
        soup_front(params, lambda p: 0.0, 3)
    with pytest.raises(ValueError, match=r"soup_front: `num_points` is 1"):
        soup_front(params[:2], lambda p: 0.0, 1)
