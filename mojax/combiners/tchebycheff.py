"""Weighted Tchebycheff scalarisation against a running ideal point, as a scalar-mode combiner.

The Tchebycheff scalarisation max_i lambda_i (z*_i - J_i) of the distances of the objectives' mean scores J_i from an
ideal point z* (Miettinen, "Nonlinear Multiobjective Optimization", Kluwer 1999, section 3.4) is minimised by a
gradient step on the objective that attains the maximum. Following the running-maximum ideal point of the multi-
objective RLHF baselines, z*_i is the largest batch mean seen so far (plus ``ideal_offset``):

    z*_i <- max(z*_i, J_i)           (J_i = nanmean of the batch's scores of objective i)
    w    = uniform over argmax_i lambda_i (z*_i + offset - J_i)

so every update pushes the objective that has fallen furthest behind its own best. Ties share the weight equally.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mojax import _checks as checks
from mojax.combiners._base import initial_weights, require_extra_arg, require_num_objectives, weighted_combiner


class TchebycheffState(NamedTuple):
    """Applied weights, the running ideal point and, per objective, whether it has been set."""

    weights: jax.Array
    ideal: jax.Array
    initialized: jax.Array


def tchebycheff_weights(distances: jax.Array) -> jax.Array:
    """Uniform weights over the objectives attaining max(distances), f32[n]."""
    at_max = (distances >= jnp.max(distances)).astype(jnp.float32)
    return at_max / jnp.sum(at_max)


def tchebycheff(
    *, num_objectives: int, preference: Sequence[float] | None = None, ideal_offset: float = 0.0
) -> optax.GradientTransformationExtraArgs:
    """Weighted Tchebycheff combiner: all weight on the objective furthest (weighted) from a running ideal point.

    Args:
      num_objectives: n.
      preference: lambda on the simplex (default uniform): the weight of each objective's distance.
      ideal_offset: added to the running maximum to form the ideal point (0 keeps z* = best seen).

    Returns:
      A scalar-mode combiner reading the extra argument ``rewards`` f32[B, n] (NaN = not applicable); its state is a
      :class:`TchebycheffState`.

    References:
      K. Miettinen. Nonlinear Multiobjective Optimization. Kluwer, 1999.

    Example:
      >>> import jax.numpy as jnp
      >>> from mojax.combiners import tchebycheff
      >>> tx = tchebycheff(num_objectives=2)
      >>> grads = {"w": jnp.asarray([[1.0, 0.0], [0.0, 2.0]])}
      >>> _, state = tx.update(grads, tx.init({"w": jnp.zeros(2)}), rewards=jnp.asarray([[1.0, 1.0]]))
      >>> update, state = tx.update(grads, state, rewards=jnp.asarray([[0.5, 0.9]]))  # objective 1 fell furthest
      >>> [round(float(x), 3) for x in state.weights], [round(float(x), 3) for x in update["w"]]
      ([1.0, 0.0], [1.0, 0.0])
    """
    name = "tchebycheff"
    n = require_num_objectives(name, num_objectives, ("preference", preference))
    lam = (
        initial_weights(n)
        if preference is None
        else jnp.asarray(checks.simplex(name, "preference", preference, length=n), jnp.float32)
    )
    offset = checks.nonnegative(name, "ideal_offset", ideal_offset)

    def init_state() -> TchebycheffState:
        return TchebycheffState(initial_weights(n), jnp.zeros((n,), jnp.float32), jnp.zeros((n,), bool))

    def weighting(gram: None, gram_scale: jax.Array, state: TchebycheffState, **extra_args: Any):
        del gram, gram_scale
        rewards = require_extra_arg(name, extra_args, "rewards", "f32[B, n] per-objective scores").astype(jnp.float32)
        if rewards.ndim != 2 or rewards.shape[1] != n:
            raise ValueError(checks.message(name, "rewards", f"has shape {rewards.shape}", f"(B, n) with n = {n}"))
        finite = jnp.isfinite(rewards)
        count = jnp.sum(finite, axis=0)
        means = jnp.sum(jnp.where(finite, rewards, 0.0), axis=0) / jnp.maximum(count, 1)
        observed = count > 0
        seen = jnp.where(state.initialized, jnp.maximum(state.ideal, means), means)
        ideal = jnp.where(observed, seen, state.ideal)
        distances = jnp.where(observed, ideal + offset - means, 0.0)
        weights = tchebycheff_weights(lam * distances)
        return weights, TchebycheffState(weights, ideal, state.initialized | observed)

    return weighted_combiner(name, weighting, init_state, num_objectives=n, uses_gram=False)
