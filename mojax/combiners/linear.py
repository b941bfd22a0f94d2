"""Linear scalarization (MORLHF): fixed weights, d = sum_i w_i g_i."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import optax

from mojax.combiners._base import WeightsState, as_vector, require_num_objectives, weighted_combiner


def linear_scalarize(weights: Sequence[float] | jax.Array) -> optax.GradientTransformationExtraArgs:
    """d = sum_i w_i g_i with fixed w (MORLHF; Li et al. 2020). Needs no Gram and no statistics."""
    n = require_num_objectives("linear_scalarize", None, ("weights", weights))
    fixed = as_vector("linear_scalarize", "weights", weights, n)

    def weighting(gram, gram_scale, state, **extra_args):
        del gram, gram_scale, extra_args
        return fixed, state

    return weighted_combiner(
        "linear_scalarize", weighting, lambda: WeightsState(weights=fixed), num_objectives=n, uses_gram=False
    )
