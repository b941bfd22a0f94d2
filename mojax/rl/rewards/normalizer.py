"""Running per-objective reward normalisation: Welford's mean and variance, merged batch by batch.

For each objective j the state holds the number of finite scores seen, their mean and the sum of
squared deviations M2 (variance = M2 / count, the population variance). A batch of scores f32[B, n]
is merged with the parallel form of Welford's update (Chan, Golub and LeVeque), skipping NaN
("not applicable") entries per objective:

    n_b, mean_b, M2_b  = count, mean and M2 of the finite scores of the batch
    delta              = mean_b - mean
    count'             = count + n_b
    mean'              = mean + delta n_b / count'
    M2'                = M2 + M2_b + delta^2 count n_b / count'

Every division is a safe one (0 where the denominator is 0), so empty batches and all-NaN columns leave
the state unchanged. The state is a NamedTuple of arrays, so the trainer checkpoints it with the rest.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mojax import _checks
from mojax._numerics import safe_divide


class NormalizerState(NamedTuple):
    """Per-objective running statistics: count i32[n], mean f32[n], m2 f32[n] (sum of squared deviations)."""

    count: jax.Array
    mean: jax.Array
    m2: jax.Array


def init_normalizer(n: int) -> NormalizerState:
    """The empty statistics of `n` objectives (normalize() is then the identity).

    Args:
        n: the number of objectives.

    Returns:
        A :class:`NormalizerState` of zeros.

    References:
        B. P. Welford, "Note on a Method for Calculating Corrected Sums of Squares and Products",
        Technometrics 4(3), 1962.
    """
    n = _checks.integer("init_normalizer", "n", n, minimum=1)
    zeros = jnp.zeros((n,), jnp.float32)
    return NormalizerState(jnp.zeros((n,), jnp.int32), zeros, zeros)


def update_normalizer(state: NormalizerState, scores: jax.Array) -> NormalizerState:
    """Merges a batch of scores into the running statistics, skipping NaN entries per objective.

    Args:
        state: the statistics so far.
        scores: f32[B, n] (NaN = not applicable).

    Returns:
        The statistics of every finite score seen, batch included.

    References:
        T. F. Chan, G. H. Golub and R. J. LeVeque, "Updating Formulae and a Pairwise Algorithm for
        Computing Sample Variances", COMPSTAT 1982.

    Example:
        >>> state = update_normalizer(init_normalizer(2), jnp.asarray([[1.0, jnp.nan], [3.0, 5.0]]))
        >>> state.count.tolist(), state.mean.tolist(), state.m2.tolist()
        ([2, 1], [2.0, 5.0], [2.0, 0.0])
    """
    scores = jnp.asarray(scores, jnp.float32)
    finite = jnp.isfinite(scores)
    batch_count = finite.sum(0).astype(jnp.float32)
    batch_mean = safe_divide(jnp.where(finite, scores, 0.0).sum(0), batch_count)
    batch_m2 = jnp.where(finite, jnp.square(scores - batch_mean), 0.0).sum(0)
    count = state.count.astype(jnp.float32)
    total = count + batch_count
    delta = batch_mean - state.mean
    mean = state.mean + delta * safe_divide(batch_count, total)
    m2 = state.m2 + batch_m2 + jnp.square(delta) * safe_divide(count * batch_count, total)
    return NormalizerState(state.count + batch_count.astype(jnp.int32), mean, m2)


def normalize(state: NormalizerState, scores: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Standardises scores with the running statistics: (score - mean) / std per objective.

    An objective whose running std is <= `eps` (no data, one sample, a constant reward) is only centred,
    so nothing is divided by ~0; NaN stays NaN.

    Args:
        state: the running statistics.
        scores: f32[B, n].
        eps: the smallest std that scales.

    Returns:
        f32[B, n].

    References:
        B. P. Welford, "Note on a Method for Calculating Corrected Sums of Squares and Products",
        Technometrics 4(3), 1962.

    Example:
        >>> state = update_normalizer(init_normalizer(1), jnp.asarray([[1.0], [3.0]]))
        >>> normalize(state, jnp.asarray([[3.0], [2.0]])).tolist()
        [[1.0], [0.0]]
    """
    eps = _checks.nonnegative("normalize", "eps", eps)
    std = jnp.sqrt(safe_divide(state.m2, state.count.astype(jnp.float32)))
    return (jnp.asarray(scores, jnp.float32) - state.mean) / jnp.where(std > eps, std, 1.0)
