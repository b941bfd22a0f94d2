"""PPO-Lagrangian (Safe RLHF: Dai et al., "Safe RLHF: Safe Reinforcement Learning from Human Feedback", ICLR 2024,
arXiv 2310.12773) as a scalar-mode combiner.

Objectives split into unconstrained ones (what the policy maximises) and constrained ones, each of which must keep its
mean reward-oriented score J_k above a threshold d_k. mojax scores every objective in the reward direction (a *cost*
objective c enters as r = -c, so Safe RLHF's constraint E[c] <= C reads E[r] >= -C; the trainer converts the threshold).
Each constraint has a multiplier lambda_k = exp(log_lambda_k), updated by gradient descent on
-(d_k - J_k) lambda_k with respect to log_lambda_k, as Safe RLHF does:

    J_k           = mean of the objective's scores over the last `cost_window_size` samples (NaN = not applicable)
    log_lambda_k += lambda_lr * (d_k - J_k) * lambda_k          after `lambda_update_delay_steps` updates
    log_lambda_k <= log(lambda_max), and always <= LOG_LAMBDA_LIMIT

and the update weights are Safe RLHF's normalised advantage mix A = (A_r + sum_k lambda_k A_k) / (1 + sum_k lambda_k):

    w_i = base_i / (1 + sum_k lambda_k)   for unconstrained i,      w_k = lambda_k / (1 + sum_k lambda_k).

As in Safe RLHF the multipliers are updated first, from this batch's scores, and then applied. The multiplier grows
while a constraint is violated and decays towards 0 once it holds, so from a start that already satisfies every
constraint it collapses and the constrained objectives stop receiving weight. Under a constraint that stays violated
the rule d log lambda = lr (d - J) lambda reaches infinity in finite time; the multiplier stops at e^LOG_LAMBDA_LIMIT,
where the weights are still finite (the constrained objectives' near 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mojax import _checks as checks
from mojax.combiners._base import as_vector, require_extra_arg, require_num_objectives, weighted_combiner


class LagrangianState(NamedTuple):
    """Applied weights, log-multipliers (0 weight for unconstrained objectives), the score window and the step count."""

    weights: jax.Array
    log_lambda: jax.Array
    window: jax.Array
    window_valid: jax.Array
    num_updates: jax.Array


def _constraint_mask(constraints: Sequence[int] | None, n: int) -> np.ndarray:
    """bool[n]: True for constrained objectives; default every objective but the first."""
    if constraints is None:
        indices = list(range(1, n))
    else:
        indices = [checks.integer("lagrangian", "constraints", index, minimum=0) for index in constraints]
    mask = np.zeros((n,), bool)
    for index in indices:
        if index >= n:
            raise ValueError(checks.message("lagrangian", "constraints", f"holds index {index}", f"indices < n = {n}"))
        mask[index] = True
    if mask.all():
        raise ValueError(
            checks.message(
                "lagrangian", "constraints", "covers every objective", "at least one unconstrained objective"
            )
        )
    return mask


def _windowed_means(window: jax.Array, valid: jax.Array) -> jax.Array:
    """f32[n]: the mean of the valid window entries per objective (0 where none is valid)."""
    count = jnp.sum(valid, axis=0)
    return jnp.where(count > 0, jnp.sum(window * valid, axis=0) / jnp.maximum(count, 1.0), 0.0)


LOG_LAMBDA_LIMIT = 80.0
"""The largest log multiplier, lambda_max or not: e^80 ~ 5.5e34 leaves 1 + sum lambda finite in fp32 for up to 6000
constraints. Without it an unbounded multiplier overflowed to inf after a stretch of violations (experiment 03,
lambda_lr 0.5), its weights became inf / inf = NaN, and the trainer skipped every later update."""


def lagrangian_weights(log_lambda: jax.Array, constrained: jax.Array, base: jax.Array) -> jax.Array:
    """w = (base on unconstrained, lambda on constrained) / (1 + sum lambda), f32[n]."""
    multipliers = jnp.where(constrained, jnp.exp(log_lambda), 0.0)
    return jnp.where(constrained, multipliers, base) / (1.0 + jnp.sum(multipliers))


def lagrangian(
    *,
    num_objectives: int,
    constraints: Sequence[int] | None = None,
    thresholds: Sequence[float] | float = 0.0,
    reward_weights: Sequence[float] | float = 1.0,
    lambda_init: float = 1.0,
    lambda_lr: float = 0.1,
    lambda_max: float | None = None,
    lambda_update_delay_steps: int = 0,
    cost_window_size: int = 128,
) -> optax.GradientTransformationExtraArgs:
    """PPO-Lagrangian combiner: constrained objectives weighted by adaptive multipliers (Safe RLHF, arXiv 2310.12773).

    Args:
      num_objectives: n.
      constraints: indices of the constrained objectives (default: every objective except objective 0).
      thresholds: d_k, the minimum mean (reward-oriented) score of each constrained objective: a scalar or f32[n]
        (entries of unconstrained objectives are ignored).
      reward_weights: base weights of the unconstrained objectives (scalar or f32[n]).
      lambda_init: initial multiplier (Safe RLHF: 1.0).
      lambda_lr: step size on log lambda (Safe RLHF: 0.1).
      lambda_max: cap on every multiplier, or None (then e^LOG_LAMBDA_LIMIT, which also caps a larger lambda_max).
      lambda_update_delay_steps: number of updates before the multipliers start to move.
      cost_window_size: number of most recent samples whose mean is J_k (Safe RLHF: 128).

    Returns:
      A scalar-mode combiner reading the extra argument ``rewards`` f32[B, n] (NaN = not applicable); its state is a
      :class:`LagrangianState`.

    References:
      Dai, Pan, Sun, Ji, Xu, Liu, Wang, Yang. Safe RLHF: Safe Reinforcement Learning from Human Feedback. ICLR 2024,
      arXiv 2310.12773.

    Example:
      >>> import jax.numpy as jnp
      >>> from mojax.combiners import lagrangian
      >>> tx = lagrangian(num_objectives=2, constraints=[1], thresholds=0.0)  # keep objective 2's mean score >= 0
      >>> grads = {"w": jnp.asarray([[1.0, 0.0], [0.0, 2.0]])}
      >>> rewards = jnp.asarray([[1.0, -1.0]])  # the constraint is violated by 1: log lambda grows by 0.1
      >>> update, state = tx.update(grads, tx.init({"w": jnp.zeros(2)}), rewards=rewards)
      >>> [round(float(x), 3) for x in state.weights]
      [0.475, 0.525]
    """
    name = "lagrangian"
    n = require_num_objectives(name, num_objectives)
    constrained = jnp.asarray(_constraint_mask(constraints, n))
    limits = as_vector(name, "thresholds", thresholds, n)
    base = as_vector(name, "reward_weights", reward_weights, n)
    checks.positive(name, "lambda_init", lambda_init, "the initial multiplier")
    checks.nonnegative(name, "lambda_lr", lambda_lr, "the step size on log lambda")
    log_cap = LOG_LAMBDA_LIMIT
    if lambda_max is not None:
        log_cap = min(log_cap, float(np.log(checks.positive(name, "lambda_max", lambda_max))))
    delay = checks.integer(name, "lambda_update_delay_steps", lambda_update_delay_steps, minimum=0)
    size = checks.integer(name, "cost_window_size", cost_window_size, minimum=1)

    def init_state() -> LagrangianState:
        log_lambda = jnp.where(constrained, jnp.float32(np.log(lambda_init)), 0.0)
        return LagrangianState(
            weights=lagrangian_weights(log_lambda, constrained, base),
            log_lambda=log_lambda,
            window=jnp.zeros((size, n), jnp.float32),
            window_valid=jnp.zeros((size, n), jnp.float32),
            num_updates=jnp.zeros((), jnp.int32),
        )

    def weighting(gram: None, gram_scale: jax.Array, state: LagrangianState, **extra_args: Any):
        del gram, gram_scale
        rewards = require_extra_arg(name, extra_args, "rewards", "f32[B, n] per-objective scores").astype(jnp.float32)
        if rewards.ndim != 2 or rewards.shape[1] != n:
            raise ValueError(checks.message(name, "rewards", f"has shape {rewards.shape}", f"(B, n) with n = {n}"))
        finite = jnp.isfinite(rewards)
        window = jnp.concatenate([state.window, jnp.where(finite, rewards, 0.0)])[-size:]
        valid = jnp.concatenate([state.window_valid, finite.astype(jnp.float32)])[-size:]
        violation = limits - _windowed_means(window, valid)
        step = lambda_lr * violation * jnp.exp(state.log_lambda)
        moving = constrained & (state.num_updates >= delay)
        log_lambda = jnp.minimum(jnp.where(moving, state.log_lambda + step, state.log_lambda), log_cap)
        weights = lagrangian_weights(log_lambda, constrained, base)
        return weights, LagrangianState(weights, log_lambda, window, valid, state.num_updates + 1)

    return weighted_combiner(name, weighting, init_state, num_objectives=n, uses_gram=False)
