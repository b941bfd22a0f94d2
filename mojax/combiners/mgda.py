"""MGDA: the min-norm point of the convex hull of the per-objective gradients (Sener & Koltun, arXiv 1810.04650).

    alpha = argmin_{alpha in simplex} || sum_i alpha_i g_i / c_i ||^2,    d = sum_i (alpha_i / c_i) g_i

with the gradient normalisers c_i of Sener & Koltun's ``gradient_normalizers``: ``"none"`` (1),
``"l2"`` (||g_i||), ``"loss"`` (|l_i|) and ``"loss+"`` (|l_i| ||g_i||), each clamped below at
``eps``. The loss modes read the extra argument ``losses`` f32[n]. ``d`` is a common descent
direction of the losses unless it is 0 (a Pareto-stationary point). A zero gradient puts 0 in the
hull and stalls the update; ``drop_zero_norm=True`` excludes such objectives from the solve
(weight 0), off by default as in the paper. See :mod:`mojax.combiners.minnorm` for the solvers.
The state's ``weights`` are the loss weights alpha_i / c_i, ``alpha`` the simplex weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mojax.combiners._base import initial_weights, require_extra_arg, require_num_objectives, weighted_combiner
from mojax.combiners.minnorm import (
    MinNormState,
    check_divisor_floor,
    check_solver,
    grad_log_norms,
    min_norm_weights,
    rescaled_min_norm,
)

NORMALIZERS = ("none", "l2", "loss", "loss+")


def _log_loss_scales(losses: jax.Array, n: int, eps: float) -> jax.Array:
    """log max(|l_i|, eps) from the extra argument `losses` f32[n]; ValueError on a wrong shape."""
    if losses.shape != (n,):
        raise ValueError(
            f"mgda: the extra argument `losses` has shape {losses.shape}; expected f32[{n}], one loss per objective."
        )
    return jnp.log(jnp.maximum(jnp.abs(losses.astype(jnp.float32)), eps))


def _log_normalizers(normalize: str, log_norms: jax.Array, extra_args: dict, n: int, eps: float) -> jax.Array:
    """log c_i for normalize = l2 (||g_i||), loss (|l_i|) or loss+ (|l_i| ||g_i||), each clamped at eps."""
    log_eps = jnp.log(jnp.float32(eps))
    by_norm = jnp.maximum(log_norms, log_eps)
    if normalize == "l2":
        return by_norm
    losses = require_extra_arg("mgda", extra_args, "losses", f"f32[{n}], the per-objective losses")
    by_loss = _log_loss_scales(losses, n, eps)
    return by_loss if normalize == "loss" else by_loss + by_norm


def mgda(
    *,
    num_objectives: int,
    solver: str = "active_set",
    normalize: str = "none",
    drop_zero_norm: bool = False,
    eps: float = 1e-8,
) -> optax.GradientTransformationExtraArgs:
    """d = sum_i alpha_i g_i / c_i, alpha the min-norm simplex point of {g_i / c_i} (MGDA; arXiv 1810.04650).

    Args:
      num_objectives: n, the size of the leading objective axis.
      solver: ``"active_set"`` (exact, the default) or ``"frank_wolfe"`` (Sener & Koltun's iterative solver).
      normalize: the gradient normalisers c_i: ``"none"``, ``"l2"`` (||g_i||), ``"loss"`` (|l_i|) or ``"loss+"``
        (|l_i| ||g_i||); the loss modes read the extra argument ``losses`` f32[n].
      drop_zero_norm: exclude objectives with a zero gradient from the solve (weight 0) instead of stalling.
      eps: the floor of every normaliser c_i.

    Returns:
      A Gram-mode ``optax.GradientTransformationExtraArgs`` whose state is a ``MinNormState``: ``weights`` (the loss
      weights alpha_i / c_i), ``alpha`` (the simplex point) and ``grad_norms``.

    References:
      J.-A. Desideri. Multiple-gradient descent algorithm (MGDA) for multiobjective optimization. Comptes Rendus
      Mathematique, 2012.
      O. Sener, V. Koltun. Multi-Task Learning as Multi-Objective Optimization. NeurIPS 2018, arXiv 1810.04650.

    Example:
      >>> import jax.numpy as jnp
      >>> from mojax.combiners import mgda
      >>> tx = mgda(num_objectives=2)
      >>> grads = {"w": jnp.asarray([[1.0, 0.0], [0.0, 2.0]])}  # g_1 = (1, 0), g_2 = (0, 2) on the objective axis
      >>> update, state = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
      >>> [round(float(x), 3) for x in state.weights], [round(float(x), 3) for x in update["w"]]
      ([0.8, 0.2], [0.8, 0.4])
    """
    n = require_num_objectives("mgda", num_objectives)
    check_solver("mgda", solver)
    if normalize not in NORMALIZERS:
        raise ValueError(f"mgda: unknown normalize={normalize!r}; expected one of {NORMALIZERS}.")
    check_divisor_floor("mgda", eps, {"none": 0.0, "l2": 1.0, "loss": 1.0, "loss+": 2.0}[normalize])

    def weighting(gram, gram_scale, state, **extra_args):
        del state
        log_norms = grad_log_norms(gram, gram_scale)
        active = log_norms > -jnp.inf if drop_zero_norm else jnp.ones((n,), bool)
        if normalize == "none":
            alpha = min_norm_weights(gram, active=active, solver=solver)
            weights = alpha
        else:
            log_c = _log_normalizers(normalize, log_norms, extra_args, n, eps)
            alpha, weights = rescaled_min_norm(gram, log_c, active=active, solver=solver)
        return weights, MinNormState(weights=weights, alpha=alpha, grad_norms=jnp.exp(log_norms))

    def init_state():
        uniform = initial_weights(n)
        return MinNormState(weights=uniform, alpha=uniform, grad_norms=jnp.zeros((n,), jnp.float32))

    return weighted_combiner("mgda", weighting, init_state, num_objectives=n, uses_gram=True)
