"""UPGrad (Quinton & Rey 2024, arXiv 2406.16232): average of the projections of the g_i onto the dual cone of the rows."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

from mojax import _checks as checks
from mojax.combiners._base import WeightsState, as_vector, initial_weights, require_num_objectives, weighted_combiner
from mojax.combiners.qp import box_qp, trace_normalized


def upgrad_weights(gram: jax.Array, preference: jax.Array) -> jax.Array:
    """w = sum_i v^(i), v^(i) = argmin_{v >= p_i e_i} v^T G v: J^T v^(i) projects p_i g_i onto {x: Jx >= 0} (Prop. 1, 2406.16232)."""
    lower_bounds = jnp.diag(preference)
    projections = jax.vmap(box_qp, in_axes=(None, 0))(gram, lower_bounds)
    return jnp.ones_like(preference) @ projections


def upgrad(
    *,
    num_objectives: int | None = None,
    preference: Sequence[float] | jax.Array | None = None,
    norm_eps: float = 1e-4,
    reg_eps: float = 1e-4,
) -> optax.GradientTransformationExtraArgs:
    """UPGrad (arXiv 2406.16232): d = J^T w with w the UPGrad weights of G / tr(G) + reg_eps I, as TorchJD computes them.

    Each preference-weighted row p_i g_i is projected onto the dual cone {x: J x >= 0} and the projections are summed,
    so d never conflicts with any objective. Like TorchJD, G is zeroed when the true tr(G) = |J|_F^2 is below
    `norm_eps`, so tiny gradients get d = sum_i preference_i g_i; norm_eps = 0 disables that.

    Args:
      num_objectives: n; implied by ``preference`` when that is given.
      preference: p f32[n] >= 0, the weight of each projected row (default 1/n).
      norm_eps: |J|_F^2 below which G is zeroed.
      reg_eps: ridge added to the trace-normalised Gram, so the projections exist for dependent rows.

    Returns:
      A Gram-mode ``optax.GradientTransformationExtraArgs`` whose state is a ``WeightsState``.

    References:
      P. Quinton, V. Rey. Jacobian Descent for Multi-Objective Optimization. arXiv 2406.16232, 2024.

    Example:
      >>> import jax.numpy as jnp
      >>> from mojax.combiners import upgrad
      >>> tx = upgrad(num_objectives=2, reg_eps=0.0)
      >>> grads = {"w": jnp.asarray([[1.0, 0.0], [-1.0, 1.0]])}  # <g_1, g_2> = -1: a conflict
      >>> update, state = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
      >>> [round(float(x), 3) for x in state.weights], [round(float(x), 3) for x in update["w"]]
      ([1.0, 0.75], [0.25, 0.75])
    """
    n = require_num_objectives("upgrad", num_objectives, ("preference", preference))
    weights_of_rows = initial_weights(n) if preference is None else as_vector("upgrad", "preference", preference, n)
    if not bool(jnp.all(weights_of_rows >= 0)):
        raise ValueError(
            checks.message(
                "upgrad", "preference", f"is {weights_of_rows.tolist()}", "entries >= 0, one weight per projected row"
            )
        )
    norm_eps = checks.nonnegative("upgrad", "norm_eps", norm_eps, "|J|_F^2 below which G is zeroed")
    reg_eps = checks.nonnegative("upgrad", "reg_eps", reg_eps, "ridge added to the trace-normalised Gram")
    regulariser = reg_eps * jnp.eye(n, dtype=jnp.float32)

    def weighting(gram, gram_scale, state, **extra_args):
        del extra_args
        normalized = trace_normalized(gram, gram_scale, norm_eps) + regulariser
        return upgrad_weights(normalized, weights_of_rows), state

    initial = lambda: WeightsState(weights=initial_weights(n))
    return weighted_combiner("upgrad", weighting, initial, num_objectives=n, uses_gram=True)
