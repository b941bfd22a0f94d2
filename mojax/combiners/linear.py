"""Linear scalarization (MORLHF): fixed weights, d = sum_i w_i g_i."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import optax

from mojax.combiners._base import WeightsState, as_vector, require_num_objectives, weighted_combiner


def linear_scalarize(weights: Sequence[float] | jax.Array) -> optax.GradientTransformationExtraArgs:
    """d = sum_i w_i g_i with fixed w (MORLHF). Needs no Gram and no statistics.

    Args:
      weights: w f32[n], one fixed weight per objective (any finite values; n is its length).

    Returns:
      A scalar-mode ``optax.GradientTransformationExtraArgs`` whose state is a ``WeightsState`` holding w.

    References:
      K. Li, T. Zhang, R. Wang. Deep Reinforcement Learning for Multiobjective Optimization. IEEE Transactions on
      Cybernetics, 2021, arXiv 1906.02386.
      A. Rame, G. Couairon, M. Shukor, C. Dancette, J.-B. Gaya, L. Soulier, M. Cord. Rewarded soups: towards
      Pareto-optimal alignment by interpolating weights fine-tuned on diverse rewards. NeurIPS 2023, arXiv 2306.04488.

    Example:
      >>> import jax.numpy as jnp
      >>> from mojax.combiners import linear_scalarize
      >>> tx = linear_scalarize([0.25, 0.75])
      >>> grads = {"w": jnp.asarray([[1.0, 0.0], [0.0, 2.0]])}  # g_1 = (1, 0), g_2 = (0, 2) on the objective axis
      >>> update, state = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
      >>> [round(float(x), 3) for x in update["w"]]
      [0.25, 1.5]
    """
    n = require_num_objectives("linear_scalarize", None, ("weights", weights))
    fixed = as_vector("linear_scalarize", "weights", weights, n)

    def weighting(gram, gram_scale, state, **extra_args):
        del gram, gram_scale, extra_args
        return fixed, state

    return weighted_combiner(
        "linear_scalarize", weighting, lambda: WeightsState(weights=fixed), num_objectives=n, uses_gram=False
    )
