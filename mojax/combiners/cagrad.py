"""CAGrad (Liu et al. 2021, arXiv 2110.14048): the best worst-case improvement within a ball around the mean gradient."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import optax
from jax import lax

from mojax import _checks as checks
from mojax.combiners._base import WeightsState, initial_weights, require_num_objectives, weighted_combiner
from mojax.combiners.qp import simplex_min_norm, trace_normalized

# Bisection steps on kappa: enough to pin an fp32 root even 1e-7 below the bracket's top.
_BISECTION_STEPS = 48
# Below this |g_w| / |J|_F the fp32 Gram cannot resolve g_w* (w^T G w carries ~n eps of round-off, so |g_w| ~ 3e-4
# is noise and its direction arbitrary): such points are treated as Pareto-stationary whatever norm_eps is.
_STATIONARY_FLOOR = 1e-3
_RESCALE_DIVISORS = {0: lambda c: 1.0, 1: lambda c: 1.0 + c * c, 2: lambda c: 1.0 + c}


def shifted_min_norm(gram: jax.Array, kappa: jax.Array) -> jax.Array:
    """w(k) = argmin_{w in simplex} |g_w + k g_0|^2: the min-norm point of the g_i shifted by k g_0 (g_0 the mean)."""
    n = gram.shape[0]
    mean = jnp.full((n,), 1.0 / n, jnp.float32)
    with_mean = gram @ mean
    ones = jnp.ones((n,), jnp.float32)
    cross = jnp.outer(with_mean, ones) + jnp.outer(ones, with_mean)
    shifted = gram + kappa * cross + kappa**2 * (mean @ with_mean) * jnp.outer(ones, ones)
    return simplex_min_norm(shifted)


def cagrad_direction_weights(gram: jax.Array, radius: jax.Array) -> jax.Array:
    """w* = argmin_{w in simplex} g_w.g_0 + r |g_w| (r > 0) = w(k*) with |g_w(k*)| = r k*, by bisection on k.

    |g_w| = min_t (|g_w|^2 / t + t) / 2, so for t = r k the inner problem is w(k); |g_w(k)| / k is nonincreasing.
    """
    norm_of = lambda w: jnp.sqrt(jnp.maximum(w @ gram @ w, 0.0))
    upper = jnp.sqrt(jnp.max(jnp.diag(gram))) / radius

    def halve(_: int, bracket: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        low, high = bracket
        middle = 0.5 * (low + high)
        inside = norm_of(shifted_min_norm(gram, middle)) > radius * middle
        return jnp.where(inside, middle, low), jnp.where(inside, high, middle)

    _, kappa = lax.fori_loop(0, _BISECTION_STEPS, halve, (jnp.zeros((), jnp.float32), upper))
    return shifted_min_norm(gram, kappa)


def cagrad_weights(gram: jax.Array, c: float, norm_eps: float) -> jax.Array:
    """w = 1/n + (c |g_0| / |g_w*|) w*, i.e. d = g_0 + c |g_0| g_w*/|g_w*| (Alg. 1, 2110.14048); 0 if |g_w*| is below eps or the floor."""
    n = gram.shape[0]
    mean = jnp.full((n,), 1.0 / n, jnp.float32)
    with_mean = gram @ mean
    radius = c * jnp.sqrt(jnp.maximum(mean @ with_mean, 0.0))
    worst_vertex = jax.nn.one_hot(jnp.argmin(with_mean), n, dtype=jnp.float32)
    solvable = radius > 0
    best = jnp.where(solvable, cagrad_direction_weights(gram, jnp.where(solvable, radius, 1.0)), worst_vertex)
    best_norm = jnp.sqrt(jnp.maximum(best @ gram @ best, 0.0))
    stationary = best_norm < max(norm_eps, _STATIONARY_FLOOR)
    return jnp.where(stationary, 0.0, mean + radius / jnp.where(stationary, 1.0, best_norm) * best)


def cagrad(
    *,
    num_objectives: int,
    c: float = 0.5,
    rescale: Literal[0, 1, 2] = 1,
    norm_eps: float = 1e-4,
) -> optax.GradientTransformationExtraArgs:
    """CAGrad (arXiv 2110.14048) on G / tr(G); `rescale` 1 divides d by 1 + c^2, 2 by 1 + c, 0 not at all (TorchJD's form).

    d = g_0 + c |g_0| g_w* / |g_w*| with g_0 the mean gradient and w* = argmin_{w in simplex} g_w.g_0 + c |g_0| |g_w|:
    the direction with the best worst-case improvement within the ball of radius c |g_0| around g_0. Like TorchJD, G is
    zeroed when the true tr(G) = |J|_F^2 is below `norm_eps` (0 disables this), and the weights are 0 near
    Pareto-stationarity: |g_w*| / |J|_F < max(norm_eps, 1e-3), the fp32 resolution of |g_w*|.

    Args:
      num_objectives: n.
      c: the radius of the ball around g_0 in units of |g_0| (0 gives the mean gradient).
      rescale: 0 (no rescaling, TorchJD), 1 (d / (1 + c^2), the paper's code default) or 2 (d / (1 + c)).
      norm_eps: |J|_F^2 below which G is zeroed.

    Returns:
      A Gram-mode ``optax.GradientTransformationExtraArgs`` whose state is a ``WeightsState``.

    References:
      B. Liu, X. Liu, X. Jin, P. Stone, Q. Liu. Conflict-Averse Gradient Descent for Multi-task Learning.
      NeurIPS 2021, arXiv 2110.14048.

    Example:
      >>> import jax.numpy as jnp
      >>> from mojax.combiners import cagrad
      >>> tx = cagrad(num_objectives=2, c=0.5, rescale=0)
      >>> grads = {"w": jnp.asarray([[1.0, 0.0], [0.0, 2.0]])}  # g_1 = (1, 0), g_2 = (0, 2) on the objective axis
      >>> update, state = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
      >>> [round(float(x), 3) for x in state.weights], [round(float(x), 3) for x in update["w"]]
      ([1.059, 0.5], [1.059, 1.0])
    """
    n = require_num_objectives("cagrad", num_objectives)
    c = checks.nonnegative("cagrad", "c", c, "radius of the ball around the mean gradient, in units of |g_0|")
    if rescale not in _RESCALE_DIVISORS:
        raise ValueError(f"cagrad: `rescale` must be 0 (none), 1 (d / (1 + c^2)) or 2 (d / (1 + c)), got {rescale!r}.")
    norm_eps = checks.nonnegative("cagrad", "norm_eps", norm_eps, "|J|_F^2 below which G is zeroed")
    divisor = _RESCALE_DIVISORS[rescale](c)

    def weighting(gram, gram_scale, state, **extra_args):
        del extra_args
        return cagrad_weights(trace_normalized(gram, gram_scale, norm_eps), c, norm_eps) / divisor, state

    initial = lambda: WeightsState(weights=initial_weights(n))
    return weighted_combiner("cagrad", weighting, initial, num_objectives=n, uses_gram=True)
