"""Nash-MTL (Navon et al. 2022, arXiv 2202.01017): the Nash bargaining direction d = J^T a with G a = 1/a."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from mojax.combiners._base import cosine_gram, initial_weights, require_num_objectives, weighted_combiner
from mojax.combiners.qp import log_barrier_newton


class NashMTLState(NamedTuple):
    """Weights of the latest update and the bargaining solution for the unit-normalised rows (the next warm start)."""

    weights: jax.Array
    alpha: jax.Array


def nash_mtl_weights(
    gram: jax.Array,
    gram_scale: jax.Array,
    warm_start: jax.Array,
    *,
    max_norm: float | None,
    reg_eps: float,
    max_iters: int,
) -> tuple[jax.Array, jax.Array]:
    """(weights, b): (C + reg_eps I) b = 1/b on the cosines C = D G D, D = diag(1/|g_i|); a = D b / gram_scale, |d| <= max_norm.

    Row scaling commutes with the bargaining equation (g_i -> c_i g_i sends a_i -> a_i / c_i), so solving on C is
    exact up to reg_eps, which keeps C + reg_eps I positive definite when rows are dependent; zero rows get weight 0.
    """
    n = gram.shape[0]
    cosines, inverse_norms = cosine_gram(gram)
    start = jnp.where(jnp.isfinite(warm_start) & (warm_start > 0), warm_start, 1.0)
    alpha = log_barrier_newton(cosines + reg_eps * jnp.eye(n, dtype=jnp.float32), start, max_iters=max_iters)
    direction_norm = jnp.sqrt(jnp.maximum(alpha @ cosines @ alpha, 0.0))
    shrink = 1.0 if max_norm is None else max_norm / jnp.maximum(direction_norm, max_norm)
    return alpha * inverse_norms * shrink / jnp.asarray(gram_scale, jnp.float32), alpha


def nash_mtl(
    *, num_objectives: int, max_norm: float | None = 1.0, reg_eps: float = 1e-6, max_iters: int = 100
) -> optax.GradientTransformationExtraArgs:
    """Nash-MTL (arXiv 2202.01017): d = sum_i a_i g_i with <g_i, d> = 1/a_i, shrunk to |d| <= max_norm (None: no cap).

    a minimises 1/2 a^T G a - sum(log a) (damped Newton, at most `max_iters` steps, warm-started from the state).
    Without the cap |d|^2 = sum_i a_i <g_i, d> = n whatever the scale of G, while a scales as 1 / |g|.

    Args:
      num_objectives: n.
      max_norm: cap on |d| (None for none).
      reg_eps: ridge on the cosine matrix, in (0, 1), so a exists for dependent rows.
      max_iters: Newton steps per update.

    Returns:
      A Gram-mode ``optax.GradientTransformationExtraArgs`` whose state is a ``NashMTLState`` (weights, and the
      bargaining solution of the unit rows that warm-starts the next update).

    References:
      A. Navon, A. Shamsian, I. Achituve, H. Maron, K. Kawaguchi, G. Chechik, E. Fetaya. Multi-Task Learning as a
      Bargaining Game. ICML 2022, arXiv 2202.01017.

    Example:
      >>> import jax.numpy as jnp
      >>> from mojax.combiners import nash_mtl
      >>> tx = nash_mtl(num_objectives=2, max_norm=None)
      >>> grads = {"w": jnp.asarray([[1.0, 0.0], [0.0, 2.0]])}  # g_1 = (1, 0), g_2 = (0, 2) on the objective axis
      >>> update, state = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
      >>> [round(float(x), 3) for x in state.weights], [round(float(x), 3) for x in update["w"]]
      ([1.0, 0.5], [1.0, 1.0])
    """
    n = require_num_objectives("nash_mtl", num_objectives)
    if max_norm is not None and not (float(max_norm) > 0 and float(max_norm) < float("inf")):
        raise ValueError(
            f"nash_mtl: `max_norm` must be a finite number > 0, or None for no cap on |d|; got {max_norm}."
        )
    if not (float(reg_eps) > 0 and float(reg_eps) < 1):
        raise ValueError(
            f"nash_mtl: `reg_eps` (ridge on the cosine matrix, so a exists for dependent rows) must be in (0, 1); got {reg_eps}."
        )
    if int(max_iters) != max_iters or max_iters < 1:
        raise ValueError(
            f"nash_mtl: `max_iters` must be a positive integer (Newton steps per update), got {max_iters}."
        )
    max_norm = None if max_norm is None else float(max_norm)

    def weighting(gram, gram_scale, state, **extra_args):
        del extra_args
        weights, alpha = nash_mtl_weights(
            gram.astype(jnp.float32),
            gram_scale,
            state.alpha,
            max_norm=max_norm,
            reg_eps=float(reg_eps),
            max_iters=int(max_iters),
        )
        return weights, state._replace(alpha=alpha)

    def init_state() -> NashMTLState:
        return NashMTLState(weights=initial_weights(n), alpha=jnp.ones((n,), jnp.float32))

    return weighted_combiner("nash_mtl", weighting, init_state, num_objectives=n, uses_gram=True)
