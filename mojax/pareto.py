"""Pareto fronts of finished runs and of weight-interpolated policies (host-side numpy, a handful of points).

A point p dominates q (maximisation) when p >= q in every objective and p > q in at least one; the
non-dominated points form the front. The hypervolume of a set is the measure of the region that some
point dominates and that dominates the reference point: the union of the boxes [r, p] (for
minimisation, [p, r]). It is computed exactly by slicing (Zitzler's "hypervolume by slicing
objectives"): sort the boxes on the last objective, cut the union into slabs between consecutive
levels, and add thickness x the (k - 1)-dimensional volume of the boxes that reach the slab. For k = 2 the
inner volume is a sweep over a staircase, so k = 2 costs O(m log m), k = 3 O(m^2 log m), and k
objectives O(m^(k-1) log m).

Rewarded soups (Rame et al., 2023) train one policy per reward from a shared initialisation and serve
theta(w) = sum_i w_i theta_i with w on the simplex; sweeping w along the segment between two policies
traces a front without retraining. ``interpolate_params`` is that average for any pytree of arrays and
``soup_front`` the sweep.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mojax import _checks


def _points(where: str, points: Any) -> np.ndarray:
    """f64[m, k] finite objective values (m >= 0 points, k >= 1 objectives); TypeError or ValueError otherwise."""
    try:
        array = np.asarray(points, np.float64)
    except (TypeError, ValueError):
        raise TypeError(
            _checks.message(where, "points", f"is {points!r}", "an array f[m, k] of real numbers")
        ) from None
    if array.ndim != 2 or array.shape[1] == 0:
        raise ValueError(_checks.message(where, "points", f"has shape {array.shape}", "(m, k) with k >= 1 objectives"))
    if not np.all(np.isfinite(array)):
        raise ValueError(_checks.message(where, "points", "holds NaN or inf", "finite objective values"))
    return array


def non_dominated(points: Any, *, maximize: bool = True) -> np.ndarray:
    """Mask of the points that no other point dominates (ties do not dominate: equal points all stay).

    Args:
      points: f[m, k], one row of k objective values per point.
      maximize: True when larger values are better in every objective, False when smaller are.

    Returns:
      bool[m], True for the points on the front. Costs O(m^2 k) time and O(m k) memory.

    References:
      K. Deb, "Multi-Objective Optimization using Evolutionary Algorithms", Wiley, 2001 (Pareto dominance).

    Example:
      >>> from mojax.pareto import non_dominated
      >>> non_dominated([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.4, 0.4]]).tolist()
      [True, True, True, False]
    """
    values = _points("non_dominated", points)
    if not maximize:
        values = -values
    front = np.ones(values.shape[0], bool)
    for i, row in enumerate(values):
        dominated_by = np.all(values >= row, axis=1) & np.any(values > row, axis=1)
        front[i] = not dominated_by.any()
    return front


def _staircase_area(boxes: np.ndarray) -> float:
    """Area of the union of the boxes [0, b] for b in f64[m, 2] with positive entries: one sweep down the first axis."""
    order = np.argsort(-boxes[:, 0], kind="stable")
    widths = boxes[order, 0]
    heights = np.maximum.accumulate(boxes[order, 1])
    next_widths = np.append(widths[1:], 0.0)
    return float(np.sum((widths - next_widths) * heights))


def _union_volume(boxes: np.ndarray) -> float:
    """Volume of the union of the boxes [0, b] for b in f64[m, k] with positive entries (slicing on the last axis)."""
    if boxes.shape[0] == 0:
        return 0.0
    if boxes.shape[1] == 1:
        return float(boxes.max())
    if boxes.shape[1] == 2:
        return _staircase_area(boxes)
    order = np.argsort(-boxes[:, -1], kind="stable")
    boxes = boxes[order]
    levels = np.append(boxes[:, -1], 0.0)
    volume = 0.0
    for i in range(boxes.shape[0]):
        thickness = levels[i] - levels[i + 1]
        if thickness > 0:
            volume += thickness * _union_volume(boxes[: i + 1, :-1])
    return volume


def hypervolume(points: Any, reference: Any, *, maximize: bool = True) -> float:
    """Exact hypervolume of `points` with respect to `reference`: the measure of the union of the boxes [r, p].

    Points that do not strictly improve on the reference in every objective add nothing. The union is
    measured by slicing on the last objective down to a 2-D sweep: O(m log m) for k = 2, O(m^2 log m)
    for k = 3 and O(m^(k-1) log m) for k objectives, so keep m small when k > 3.

    Args:
      points: f[m, k] objective values (m may be 0).
      reference: f[k], a point every useful point improves on (typically the worst acceptable values).
      maximize: True when larger values are better (boxes [r, p]), False for minimisation (boxes [p, r]).

    Returns:
      The hypervolume, a float >= 0.

    References:
      E. Zitzler and L. Thiele, "Multiobjective Optimization Using Evolutionary Algorithms - A Comparative
      Case Study", PPSN V, 1998 (the hypervolume indicator). L. While, P. Hingston, L. Barone and S. Huband,
      "A Faster Algorithm for Calculating Hypervolume", IEEE Transactions on Evolutionary Computation, 2006
      (hypervolume by slicing objectives).

    Example:
      >>> from mojax.pareto import hypervolume
      >>> hypervolume([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]], reference=[0.0, 0.0])
      6.0
    """
    values = _points("hypervolume", points)
    reference = _checks.finite_vector("hypervolume", "reference", reference, length=values.shape[1])
    gains = values - reference if maximize else reference - values
    return _union_volume(gains[np.all(gains > 0, axis=1)])


def _leaf_paths(tree: Any) -> list[str]:
    """Readable key paths of the leaves of `tree`, for messages."""
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _check_same_structure(where: str, params_list: Sequence[Any]) -> None:
    """ValueError unless every pytree has the structure, leaf shapes and dtypes of the first."""
    first = params_list[0]
    structure = jax.tree.structure(first)
    for i, params in enumerate(params_list[1:], start=1):
        if jax.tree.structure(params) != structure:
            raise ValueError(
                _checks.message(
                    where, f"params_list[{i}]", "has another tree structure", "the structure of params_list[0]"
                )
            )
        for path, a, b in zip(_leaf_paths(first), jax.tree.leaves(first), jax.tree.leaves(params), strict=True):
            if jnp.shape(a) != jnp.shape(b) or jnp.result_type(a) != jnp.result_type(b):
                raise ValueError(
                    _checks.message(
                        where,
                        f"params_list[{i}]{path}",
                        f"is {jnp.result_type(b)}{list(jnp.shape(b))}",
                        f"{jnp.result_type(a)}{list(jnp.shape(a))} as in params_list[0]",
                    )
                )


def _interpolate_leaf(path: str, leaves: Sequence[Any], weights: np.ndarray) -> jax.Array:
    """sum_i w_i x_i in at least fp32, cast back to the leaf dtype; non-float leaves must agree and are kept."""
    dtype = jnp.result_type(leaves[0])
    if not jnp.issubdtype(dtype, jnp.inexact):
        if not all(np.array_equal(np.asarray(leaves[0]), np.asarray(leaf)) for leaf in leaves[1:]):
            raise ValueError(
                _checks.message(
                    "interpolate_params", f"params_list[*]{path}", f"is a {dtype} leaf that differs", "equal values"
                )
            )
        return jnp.asarray(leaves[0])
    accumulate = jnp.promote_types(dtype, jnp.float32)
    total = None
    for weight, leaf in zip(weights, leaves, strict=True):
        if weight == 0:
            continue
        term = jnp.asarray(weight, accumulate) * jnp.asarray(leaf, accumulate)
        total = term if total is None else total + term
    return total.astype(dtype)


def interpolate_params(params_list: Sequence[Any], weights: Any) -> Any:
    """Weight-space interpolation theta(w) = sum_i w_i theta_i of policies sharing one architecture.

    Every floating leaf is averaged in at least fp32 and cast back to its dtype; policies with weight 0
    are skipped, so a vertex of the simplex returns that policy exactly. Non-floating leaves (step
    counters) must be equal across the policies and are kept.

    Args:
      params_list: p >= 1 pytrees of arrays with the same structure, leaf shapes and dtypes (for example
        ``nnx.state(model, nnx.Param)`` of p fine-tuned copies of one model, or their LoRA parameters).
      weights: f[p] on the simplex (entries >= 0 summing to 1).

    Returns:
      A pytree with the structure of ``params_list[0]``.

    References:
      A. Rame, G. Couairon, M. Shukor, C. Dancette, J.-B. Gaya, L. Soulier and M. Cord, "Rewarded soups:
      towards Pareto-optimal alignment by interpolating weights fine-tuned on diverse rewards", NeurIPS 2023,
      arXiv 2306.04488.

    Example:
      >>> import jax.numpy as jnp
      >>> from mojax.pareto import interpolate_params
      >>> soup = interpolate_params([{"w": jnp.zeros(2)}, {"w": jnp.ones(2)}], [0.25, 0.75])
      >>> soup["w"].tolist()
      [0.75, 0.75]
    """
    where = "interpolate_params"
    params_list = list(params_list)
    if not params_list:
        raise ValueError(_checks.message(where, "params_list", "is empty", "at least one pytree of parameters"))
    weights = _checks.simplex(where, "weights", weights, length=len(params_list))
    _check_same_structure(where, params_list)
    columns = zip(*(jax.tree.leaves(params) for params in params_list), strict=True)
    mixed = [
        _interpolate_leaf(path, leaves, weights)
        for path, leaves in zip(_leaf_paths(params_list[0]), columns, strict=True)
    ]
    return jax.tree.unflatten(jax.tree.structure(params_list[0]), mixed)


class SoupFront(NamedTuple):
    """A sweep of the segment between two policies: simplex weights, evaluations and the front among them."""

    weights: np.ndarray  # f64[P, 2], the weights (1 - lambda, lambda) of the two policies
    values: np.ndarray  # f64[P, k], evaluate_fn at each interpolation
    front: np.ndarray  # bool[P], non_dominated(values) (larger is better)


def soup_front(params_list: Sequence[Any], evaluate_fn: Callable[[Any], Any], num_points: int) -> SoupFront:
    """Evaluates theta(lambda) = (1 - lambda) theta_1 + lambda theta_2 at `num_points` evenly spaced lambda in [0, 1].

    Args:
      params_list: two pytrees of parameters (see ``interpolate_params``).
      evaluate_fn: maps a pytree of parameters to its k objective values (a number or f[k], larger is better).
      num_points: P >= 2 interpolation points, lambda = 0, 1/(P-1), ..., 1.

    Returns:
      ``SoupFront(weights f64[P, 2], values f64[P, k], front bool[P])``.

    References:
      A. Rame et al., "Rewarded soups: towards Pareto-optimal alignment by interpolating weights fine-tuned
      on diverse rewards", NeurIPS 2023, arXiv 2306.04488.

    Example:
      >>> import jax.numpy as jnp
      >>> from mojax.pareto import soup_front
      >>> evaluate = lambda p: [float(p["x"]), float(1.0 - p["x"] ** 2)]
      >>> sweep = soup_front([{"x": jnp.array(0.0)}, {"x": jnp.array(1.0)}], evaluate, num_points=3)
      >>> sweep.weights[:, 1].tolist(), sweep.values[:, 1].tolist(), sweep.front.tolist()
      ([0.0, 0.5, 1.0], [1.0, 0.75, 0.0], [True, True, True])
    """
    where = "soup_front"
    params_list = list(params_list)
    if len(params_list) != 2:
        raise ValueError(_checks.message(where, "params_list", f"holds {len(params_list)} pytrees", "exactly 2"))
    num_points = _checks.integer(where, "num_points", num_points, minimum=2)
    lambdas = np.linspace(0.0, 1.0, num_points)
    weights = np.stack([1.0 - lambdas, lambdas], axis=1)
    rows = [np.atleast_1d(np.asarray(evaluate_fn(interpolate_params(params_list, w)), np.float64)) for w in weights]
    if len({row.shape for row in rows}) != 1 or rows[0].ndim != 1:
        shapes = sorted({row.shape for row in rows})
        raise ValueError(_checks.message(where, "evaluate_fn", f"returned shapes {shapes}", "one f[k] for every point"))
    values = np.stack(rows)
    return SoupFront(weights=weights, values=values, front=non_dominated(values))
