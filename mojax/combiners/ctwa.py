"""CTWA, Covariance Targeted Weight Adaptation (arXiv 2602.06869).

CTWA scalarises the rewards with weights lambda, trains on r = sum_j lambda_j r_j as usual, and after
each step raises the log-weight of every objective whose reward has too little within-prompt
covariance with the effective training signal w (see ``mojax.diagnostics.covariance``):

    v_j      = cov_j (or corr_j)                        this batch's statistic
    e_j      = v_j on the first step, else (1 - tau) e_j + tau v_j    tau = ``ema_rate``; e is ``state.ema``
    delta_j  = max(0, c*_j - e_j) * gate_j               gate_j = 0 once mean r_j >= obj_target_j
    log l_j += eta * delta_j                             lambda_j = exp(log l_j)

As in the reference code there is no projection: lambda only grows and its sum drifts above 1
(``renormalize=True`` divides by the sum instead, for unnormalised advantage estimators). Where the
reference would overflow fp32 (log l_j > 60, lambda ~ 1e26, reached only when targets stay out of
reach), every log-weight is shifted down by the same amount, which keeps the ratios lambda_i/lambda_j
exact instead of returning inf and NaN. The
transform applies the current lambda to the stacked per-objective updates, then adapts lambda from
this batch's statistics for the next step; ``ctwa_next_weights`` gives the trainer the lambda with
which to scalarise the next batch's rewards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mojax import _checks as checks
from mojax.combiners._base import as_vector, require_extra_arg, weighted_combiner
from mojax.diagnostics.covariance import CovarianceStatistics, covariance_statistics

_MIN_WEIGHT = 1e-8
# Ceiling on the largest log-weight: exp(60) ~ 1e26 leaves fp32 room to multiply gradients.
_MAX_LOG_WEIGHT = 60.0


class CtwaState(NamedTuple):
    """Applied weights, next log-weights, EMA of the statistic, first-call flag, latest deficit and statistics."""

    weights: jax.Array
    log_weights: jax.Array
    ema: jax.Array
    initialized: jax.Array
    deficit: jax.Array
    statistics: CovarianceStatistics


def _check_initial_weights(init_weights: Sequence[float] | jax.Array) -> np.ndarray:
    """Concrete f64[n] initial lambda; ValueError unless finite, nonnegative and summing to 1 (as the reference)."""
    weights = np.asarray(init_weights, np.float64)
    if weights.ndim != 1 or weights.size == 0:
        raise ValueError(
            f"ctwa_reweight: `init_weights` has shape {weights.shape}; expected a non-empty vector of n weights."
        )
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise ValueError(f"ctwa_reweight: `init_weights` = {weights.tolist()}; expected finite nonnegative weights.")
    if not np.isclose(weights.sum(), 1.0):
        raise ValueError(f"ctwa_reweight: `init_weights` sum to {weights.sum():.6g}; expected weights summing to 1.")
    return weights


def _empty_statistics(n: int) -> CovarianceStatistics:
    """All-zero statistics with the dtypes and shapes of a real batch, so the state never changes structure."""
    zeros = jnp.zeros((n,), jnp.float32)
    return CovarianceStatistics(zeros, zeros, zeros, zeros, jnp.zeros((), jnp.float32), zeros, jnp.zeros((), jnp.int32))


def ctwa_next_weights(state: CtwaState) -> jax.Array:
    """lambda = exp(log l) for the next batch's reward scalarisation r = sum_j lambda_j r_j."""
    return jnp.exp(state.log_weights)


def ctwa_controller_step(
    state: CtwaState,
    value: jax.Array,
    mean_reward: jax.Array | None = None,
    *,
    cov_targets: jax.Array,
    lr: float = 0.02,
    ema_rate: float = 0.1,
    obj_targets: jax.Array | None = None,
    renormalize: bool = False,
) -> CtwaState:
    """One CTWA update: e <- v (first) or (1-tau)e + tau v; delta = relu(c* - e) gate; log l += eta delta (2602.06869)."""
    value = jnp.asarray(value, jnp.float32)
    cov_targets = jnp.asarray(cov_targets, jnp.float32)
    smoothed = jnp.where(state.initialized, (1.0 - ema_rate) * state.ema + ema_rate * value, value)
    gate = jnp.ones_like(value)
    if obj_targets is not None:
        if mean_reward is None:
            raise ValueError(
                "ctwa_controller_step: `obj_targets` needs `mean_reward` (f32[n], the batch mean of each reward) for the gate."
            )
        gate = (jnp.asarray(mean_reward, jnp.float32) < obj_targets).astype(jnp.float32)
    deficit = jnp.maximum(cov_targets - smoothed, 0.0) * gate
    log_weights = state.log_weights + lr * deficit
    if renormalize:
        log_weights = log_weights - jax.nn.logsumexp(log_weights)
    log_weights = log_weights - jnp.maximum(jnp.max(log_weights) - _MAX_LOG_WEIGHT, 0.0)
    return state._replace(log_weights=log_weights, ema=smoothed, initialized=jnp.ones((), bool), deficit=deficit)


def ctwa_reweight(
    init_weights: Sequence[float] | jax.Array,
    cov_targets: Sequence[float] | jax.Array | float,
    *,
    lr: float = 0.02,
    ema_rate: float = 0.1,
    obj_targets: Sequence[float] | jax.Array | float | None = None,
    use_corr_target: bool = False,
    renormalize: bool = False,
    num_groups: int | None = None,
    outlier_factor: float = 100.0,
    global_metrics: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """CTWA combiner: d = sum_j lambda_j g_j with the current lambda, then lambda adapted for the next step.

    Args:
      init_weights: the initial lambda, on the simplex.
      cov_targets: c*_j, the covariance (or correlation) each objective should keep with the training signal.
      lr: eta, the step on the log-weights.
      ema_rate: tau, the rate of the exponential moving average of the statistic.
      obj_targets: batch mean rewards at which an objective stops being raised (None disables the gate).
      use_corr_target: compare the correlation instead of the covariance to the target.
      renormalize: keep lambda on the simplex (divide by the sum) instead of letting it grow.
      num_groups: static number of prompt groups (ids in [0, num_groups)); None relabels any ids by sorting.
      outlier_factor: samples with |w| > outlier_factor median|w| are dropped from the statistics.
      global_metrics: pool the group-centred products over the batch instead of averaging per group.

    Extra args:
      ``rewards`` f32[B, n] and ``signal`` f32[B] (``ctwa_signal`` of this batch) are required; ``group_ids`` i32[B]
      (absent: one group) and ``mask`` f32[B, T] (rows without tokens are padding and ignored) are optional.

    Returns:
      A scalar-mode ``optax.GradientTransformationExtraArgs`` whose state is a ``CtwaState``; ``ctwa_next_weights``
      of it is the lambda with which to scalarise the next batch.

    References:
      Y. Lu and M. Jiang, "Uncovering Cross-Objective Interference in Multi-Objective Alignment" (CTWA: Covariance Targeted Weight Adaptation), arXiv 2602.06869, 2026.

    Example:
      >>> import jax.numpy as jnp
      >>> from mojax.combiners import ctwa_next_weights, ctwa_reweight
      >>> tx = ctwa_reweight([0.5, 0.5], cov_targets=0.05, lr=1.0)
      >>> rewards = jnp.asarray([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])  # objective 2 does not covary
      >>> signal = jnp.asarray([1.0, -1.0, 1.0, -1.0])
      >>> grads = {"w": jnp.asarray([[1.0, 0.0], [0.0, 2.0]])}
      >>> update, state = tx.update(grads, tx.init({"w": jnp.zeros(2)}), rewards=rewards, signal=signal)
      >>> [round(float(x), 3) for x in state.weights], [round(float(x), 4) for x in ctwa_next_weights(state)]
      ([0.5, 0.5], [0.5, 0.5256])
    """
    name = "ctwa_reweight"
    start = checks.simplex(name, "init_weights", init_weights)
    n = start.size
    targets = as_vector(name, "cov_targets", cov_targets, n)
    caps = None if obj_targets is None else as_vector(name, "obj_targets", obj_targets, n)
    checks.nonnegative(name, "lr", lr, "the step size of the log-weights")
    checks.in_range(name, "ema_rate", ema_rate, low=0.0, high=1.0, low_open=True, meaning="the EMA rate tau")
    start_log = jnp.log(jnp.maximum(jnp.asarray(start, jnp.float32), _MIN_WEIGHT))

    def init_state() -> CtwaState:
        zeros = jnp.zeros((n,), jnp.float32)
        return CtwaState(
            weights=jnp.exp(start_log),
            log_weights=start_log,
            ema=zeros,
            initialized=jnp.zeros((), bool),
            deficit=zeros,
            statistics=_empty_statistics(n),
        )

    def weighting(
        gram: None, gram_scale: jax.Array, state: CtwaState, **extra_args: Any
    ) -> tuple[jax.Array, CtwaState]:
        del gram, gram_scale
        rewards = require_extra_arg(name, extra_args, "rewards", "f32[B, n] per-objective rewards")
        signal = require_extra_arg(name, extra_args, "signal", "f32[B] per-sample training signal, see ctwa_signal")
        if rewards.ndim != 2 or rewards.shape[1] != n:
            raise ValueError(f"{name}: `rewards` has shape {rewards.shape}; expected (B, n) with n = {n} objectives.")
        mask = extra_args.get("mask")
        if mask is not None and (jnp.ndim(mask) != 2 or jnp.shape(mask)[0] != rewards.shape[0]):
            raise ValueError(
                f"{name}: `mask` has shape {jnp.shape(mask)}; expected (B, T) with B = {rewards.shape[0]} like `rewards`."
            )
        statistics = covariance_statistics(
            rewards,
            signal,
            extra_args.get("group_ids"),
            valid=None if mask is None else jnp.sum(jnp.asarray(mask, jnp.float32), axis=-1) > 0,
            num_groups=num_groups,
            outlier_factor=outlier_factor,
            global_metrics=global_metrics,
        )
        applied = ctwa_next_weights(state)
        value = statistics.corr if use_corr_target else statistics.cov
        state = ctwa_controller_step(
            state,
            value,
            statistics.mean_reward,
            cov_targets=targets,
            lr=lr,
            ema_rate=ema_rate,
            obj_targets=caps,
            renormalize=renormalize,
        )
        return applied, state._replace(statistics=statistics)

    return weighted_combiner(name, weighting, init_state, num_objectives=n, uses_gram=False)
