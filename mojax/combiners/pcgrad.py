"""PCGrad (Yu et al. 2020, arXiv 2001.06782) as weights on the Gram matrix, as TorchJD computes it."""

from __future__ import annotations

import operator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from mojax.combiners._base import initial_weights, require_num_objectives, weighted_combiner


class PCGradState(NamedTuple):
    """Weights of the latest update and the PRNG key that draws the next projection orders."""

    weights: jax.Array
    key: jax.Array


def projected_row(gram: jax.Array, row: jax.Array, order: jax.Array) -> jax.Array:
    """Coefficients c of g_i^PC = J^T c: from c = e_i, for j in `order` (j != i) with <g_i^PC, g_j> < 0, c_j -= <g_i^PC, g_j> / |g_j|^2."""
    n = gram.shape[0]

    def project_onto(position: int, coefficients: jax.Array) -> jax.Array:
        j = order[position]
        inner = gram[j] @ coefficients
        conflicting = (j != row) & (inner < 0) & (gram[j, j] > 0)
        return coefficients.at[j].add(jnp.where(conflicting, -inner / jnp.where(conflicting, gram[j, j], 1.0), 0.0))

    return lax.fori_loop(0, n, project_onto, jax.nn.one_hot(row, n, dtype=jnp.float32))


def pcgrad_weights(gram: jax.Array, key: jax.Array) -> jax.Array:
    """w = sum_i c^(i), each row projected in its own random order onto the ORIGINAL conflicting g_j (Alg. 1 of 2001.06782)."""
    n = gram.shape[0]
    orders = jax.vmap(lambda k: jax.random.permutation(k, n))(jax.random.split(key, n))
    rows = jax.vmap(projected_row, in_axes=(None, 0, 0))(gram, jnp.arange(n), orders)
    return jnp.ones((n,), jnp.float32) @ rows


def pcgrad(*, num_objectives: int, seed: int = 0) -> optax.GradientTransformationExtraArgs:
    """d = sum_i g_i^PC: PCGrad summed like TorchJD; random orders from a PRNG key in state (deterministic for n = 2).

    Each g_i is projected, in its own random order, off every ORIGINAL g_j it conflicts with (<g_i^PC, g_j> < 0);
    the projections are expressed as coefficients on the rows, so only the Gram is needed.

    Args:
      num_objectives: n.
      seed: seeds the PRNG key (in the state) that draws the projection orders.

    Returns:
      A Gram-mode ``optax.GradientTransformationExtraArgs`` whose state is a ``PCGradState`` (weights, key).

    References:
      T. Yu, S. Kumar, A. Gupta, S. Levine, K. Hausman, C. Finn. Gradient Surgery for Multi-Task Learning.
      NeurIPS 2020, arXiv 2001.06782.

    Example:
      >>> import jax.numpy as jnp
      >>> from mojax.combiners import pcgrad
      >>> tx = pcgrad(num_objectives=2)
      >>> grads = {"w": jnp.asarray([[1.0, 0.0], [-1.0, 1.0]])}  # <g_1, g_2> = -1: a conflict
      >>> update, state = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
      >>> [round(float(x), 3) for x in state.weights], [round(float(x), 3) for x in update["w"]]
      ([2.0, 1.5], [0.5, 1.5])
    """
    n = require_num_objectives("pcgrad", num_objectives)
    try:
        seed = operator.index(seed)
    except TypeError:
        raise ValueError(f"pcgrad: `seed` must be an integer (it seeds the projection orders), got {seed!r}.") from None

    def weighting(gram, gram_scale, state, **extra_args):
        del gram_scale, extra_args
        key, subkey = jax.random.split(state.key)
        return pcgrad_weights(gram.astype(jnp.float32), subkey), state._replace(key=key)

    def init_state() -> PCGradState:
        return PCGradState(weights=initial_weights(n), key=jax.random.key(seed))

    return weighted_combiner("pcgrad", weighting, init_state, num_objectives=n, uses_gram=True)
