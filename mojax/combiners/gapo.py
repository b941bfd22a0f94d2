"""GAPO and P-GAPO: MGDA on gradients rescaled by a power of their norm (Li et al., arXiv 2507.01915).

GAPO: with g^_i = g_i / max(||g_i||, eps)^p, alpha = argmin_{alpha in simplex} ||sum_i alpha_i g^_i||^2
and the loss weights w_i = alpha_i / max(||g_i||, eps)^p, so the update is d = sum_i alpha_i g^_i.
By the min-norm KKT conditions <d, g_i> = ||g_i||^p ||d||^2 on every active objective: first-order
progress proportional to ||g_i||^p (p = 0 is MGDA, p = 1 is MGDA on unit gradients).

P-GAPO (``preference`` = lambda on the simplex): alpha = lambda, no min-norm solve, so
d = sum_i lambda_i g^_i; the paper's P-GAPO is p = 1, d = sum_i lambda_i g_i / ||g_i||.

In both, an objective with ||g_i|| < eps is excluded (alpha_i = 0): with p >= 1 its rescaled
gradient would be 0 (stalling GAPO) or blow up (p = 2). If every objective is excluded the update
is 0. Norms are read from the Gram (in units of ``gram_scale``), so 1e-30 and 1e30 gradients and
bf16 updates are handled in fp32 without overflow; eps**p must be >= 1e-37 so that the largest
weight 1 / eps**p is finite, and a weight below the fp32 range (||g||^p > 1e38) underflows to 0.
The state holds ``weights`` (w), ``alpha`` and ``grad_norms`` for logging.
Applied to a probe subset (the LM head, as in the paper's last-layer variant) through
:func:`mojax.combiners.grads.probe_combined_grads`, w weights the full-model losses.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mojax import _checks as checks
from mojax.combiners._base import initial_weights, require_num_objectives, weighted_combiner
from mojax.combiners.minnorm import MinNormState, check_divisor_floor, check_solver, grad_log_norms, rescaled_min_norm


def gapo_rescale(
    p: float = 1.0,
    preference: Sequence[float] | jax.Array | None = None,
    *,
    num_objectives: int | None = None,
    eps: float = 1e-8,
    solver: str = "active_set",
) -> optax.GradientTransformationExtraArgs:
    """d = sum_i alpha_i g_i / max(||g_i||, eps)^p, alpha = MinNorm (GAPO) or the preference (P-GAPO); arXiv 2507.01915.

    Args:
      p: the norm power of the rescaling (0 is MGDA, 1 unit gradients, the paper's choice).
      preference: lambda on the simplex for P-GAPO (no min-norm solve); None for GAPO.
      num_objectives: n; implied by ``preference`` when that is given.
      eps: objectives with ||g_i|| < eps are excluded (alpha_i = 0); eps**p must be >= 1e-37.
      solver: the min-norm solver, ``"active_set"`` or ``"frank_wolfe"``.

    Returns:
      A Gram-mode ``optax.GradientTransformationExtraArgs`` whose state is a ``MinNormState``: ``weights``
      w_i = alpha_i / max(||g_i||, eps)^p, ``alpha`` and ``grad_norms``.

    References:
      C. Li, H. Zhang, Y. Xu, H. Xue, X. Ao, Q. He. Gradient-Adaptive Policy Optimization: Towards Multi-Objective
      Alignment of Large Language Models. ACL 2025, arXiv 2507.01915.

    Example:
      >>> import jax.numpy as jnp
      >>> from mojax.combiners import gapo_rescale
      >>> tx = gapo_rescale(p=1.0, num_objectives=2)
      >>> grads = {"w": jnp.asarray([[1.0, 0.0], [0.0, 2.0]])}  # g_1 = (1, 0), g_2 = (0, 2) on the objective axis
      >>> update, state = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
      >>> [round(float(x), 3) for x in state.alpha], [round(float(x), 3) for x in state.weights], [round(float(x), 3) for x in update["w"]]
      ([0.5, 0.5], [0.5, 0.25], [0.5, 0.5])
    """
    n = require_num_objectives("gapo_rescale", num_objectives, ("preference", preference))
    check_solver("gapo_rescale", solver)
    if not (np.isfinite(p) and p >= 0):
        raise ValueError(f"gapo_rescale: p must be a finite number >= 0 (0 is MGDA, 1 unit gradients), got {p}.")
    check_divisor_floor("gapo_rescale", eps, p)
    fixed_alpha = (
        None
        if preference is None
        else jnp.asarray(checks.simplex("gapo_rescale", "preference", preference, length=n), jnp.float32)
    )
    log_eps = float(np.log(eps))

    def weighting(gram, gram_scale, state, **extra_args):
        del state, extra_args
        log_norms = grad_log_norms(gram, gram_scale)
        active = log_norms >= log_eps
        log_c = p * jnp.maximum(log_norms, log_eps)
        if fixed_alpha is None:
            alpha, weights = rescaled_min_norm(gram, log_c, active=active, solver=solver)
        else:
            alpha = jnp.where(active, fixed_alpha, 0.0)
            weights = alpha * jnp.exp(-log_c)
        return weights, MinNormState(weights=weights, alpha=alpha, grad_norms=jnp.exp(log_norms))

    def init_state():
        alpha = initial_weights(n) if fixed_alpha is None else fixed_alpha
        return MinNormState(weights=alpha, alpha=alpha, grad_norms=jnp.zeros((n,), jnp.float32))

    return weighted_combiner("gapo_rescale", weighting, init_state, num_objectives=n, uses_gram=True)
