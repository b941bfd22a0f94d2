"""Covariance-law statistics of CTWA (arXiv 2602.06869): per-sample training signal and its
within-prompt covariance with every objective's reward, plus the Interference Index.

The local covariance law says objective j improves at first order when E_x Cov_{y|x}(r_j, w) > 0,
where w(y) is the effective weight of completion y in the clipped PPO update
(advantage x ratio x unclipped indicator). ``ctwa_signal`` computes w; ``covariance_statistics``
computes the per-prompt population covariances and aggregates them the way the reference code does
(outlier filter, groups of at least 2 samples, mean over groups or pooled), together with the
interference diagnostics II_j = E_x[max(0, -Cov_{y|x}(r_j, w))] and FracNeg_j = P_x[Cov_{y|x} < 0].

Everything is jit-safe: groups are handled with segment sums (``num_groups`` static, or dense ids
obtained by sorting the given ids) and the median by a sort, so no value leaves the device.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mojax._numerics import safe_divide

_LOG_RATIO_BOUND = 20.0
_UNCLIPPED_COUNT_EPS = 1e-8
_SIGNAL_AGGREGATIONS = ("mean", "mean_unclipped", "sum")


class CovarianceStatistics(NamedTuple):
    """Per-objective covariance-law statistics of one batch (f32[n] unless noted)."""

    cov: jax.Array
    corr: jax.Array
    frac_neg: jax.Array
    interference: jax.Array
    interference_index: jax.Array  # f32[], mean_j interference_j
    mean_reward: jax.Array
    num_valid_groups: jax.Array  # i32[]


def ctwa_signal(
    advantages: jax.Array,
    mask: jax.Array,
    logp_new: jax.Array,
    logp_old: jax.Array,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    w_agg: str = "mean",
) -> jax.Array:
    """w f32[B]: aggregate over t of W_t = A u_t 1[unclipped_t] m_t, A = masked-mean advantage (arXiv 2602.06869).

    u_t = exp(clip(logp_new - logp_old, -20, 20)); a token is unclipped when u_t <= 1 + epsilon_high for A >= 0 and
    u_t >= 1 - epsilon for A < 0 (PPO's clip range, TRL's names). w is the effective weight of each completion in the
    clipped PPO update: the quantity whose covariance with each reward decides, to first order, which objectives
    improve.

    Args:
      advantages: f32[B, T] token advantages (averaged under the mask) or f32[B], one per sequence.
      mask: f32[B, T], 1 on completion tokens.
      logp_new: f32[B, T] log-probabilities under the current policy.
      logp_old: f32[B, T] log-probabilities under the behaviour policy.
      epsilon: the PPO clip range below 1 (and above 1 when ``epsilon_high`` is None).
      epsilon_high: the clip range above 1.
      w_agg: ``"mean"`` (sum_t W_t / sum_t m_t), ``"mean_unclipped"`` (sum_t W_t / (sum_t 1[unclipped_t] m_t + 1e-8))
        or ``"sum"``.

    Returns:
      w f32[B]; rows without tokens give 0.

    References:
      Y. Lu and M. Jiang, "Uncovering Cross-Objective Interference in Multi-Objective Alignment" (CTWA: Covariance Targeted Weight Adaptation), arXiv 2602.06869, 2026.

    Example:
      >>> import jax.numpy as jnp
      >>> from mojax.diagnostics import ctwa_signal
      >>> mask, logp = jnp.ones((2, 2)), jnp.zeros((2, 2))  # on-policy: u = 1, nothing clipped
      >>> [round(float(x), 3) for x in ctwa_signal(jnp.asarray([1.0, -1.0]), mask, logp, logp)]
      [1.0, -1.0]
    """
    if w_agg not in _SIGNAL_AGGREGATIONS:
        raise ValueError(f"ctwa_signal: w_agg={w_agg!r}; expected one of {_SIGNAL_AGGREGATIONS}.")
    mask = jnp.asarray(mask, jnp.float32)
    if mask.ndim != 2:
        raise ValueError(f"ctwa_signal: `mask` has shape {mask.shape}; expected (B, T).")
    for label, value in (("logp_new", logp_new), ("logp_old", logp_old)):
        if jnp.shape(value) != mask.shape:
            raise ValueError(
                f"ctwa_signal: `{label}` has shape {jnp.shape(value)}; expected (B, T) = {mask.shape} like `mask`."
            )
    advantages = jnp.asarray(advantages, jnp.float32)
    token_count = jnp.sum(mask, axis=-1)
    if advantages.shape == mask.shape:
        sequence_advantage = safe_divide(jnp.sum(advantages * mask, axis=-1), token_count)
    elif advantages.shape == mask.shape[:1]:
        sequence_advantage = advantages
    else:
        raise ValueError(
            f"ctwa_signal: `advantages` has shape {advantages.shape}; expected (B, T) = {mask.shape} or (B,) = {mask.shape[:1]}."
        )
    log_ratio = jnp.clip(
        jnp.asarray(logp_new, jnp.float32) - jnp.asarray(logp_old, jnp.float32), -_LOG_RATIO_BOUND, _LOG_RATIO_BOUND
    )
    ratio = jnp.exp(log_ratio)
    upper = epsilon if epsilon_high is None else epsilon_high
    unclipped = jnp.where(sequence_advantage[:, None] >= 0, ratio <= 1.0 + upper, ratio >= 1.0 - epsilon)
    unclipped = unclipped.astype(jnp.float32) * mask
    summed = sequence_advantage * jnp.sum(ratio * unclipped, axis=-1)
    if w_agg == "mean":
        return safe_divide(summed, token_count)
    if w_agg == "mean_unclipped":
        return summed / (jnp.sum(unclipped, axis=-1) + _UNCLIPPED_COUNT_EPS)
    return summed


def _unsharded(x: jax.Array) -> jax.Array:
    """x replicated if it is explicitly sharded (sorts and segment sums need the whole, tiny, per-sample axis)."""
    sharding = jax.typeof(x).sharding
    if any(axis is not None for axis in sharding.spec):
        return jax.reshard(x, jax.NamedSharding(sharding.mesh, jax.P()))
    return x


def _masked_median(values: jax.Array, keep: jax.Array) -> jax.Array:
    """Median of values[keep] (mean of the two middle ones for an even count), 0 if nothing is kept."""
    count = jnp.sum(keep)
    ordered = jnp.sort(jnp.where(keep, values, jnp.inf))
    lower = ordered[jnp.maximum((count - 1) // 2, 0)]
    upper = ordered[jnp.maximum(count // 2, 0)]
    return jnp.where(count > 0, 0.5 * (lower + upper), 0.0)


def _dense_group_ids(group_ids: jax.Array) -> jax.Array:
    """Arbitrary integer ids -> ranks 0..k-1 of the k distinct ids (by sorting), i32[B]."""
    order = jnp.argsort(group_ids)
    ordered = group_ids[order]
    starts = jnp.concatenate([jnp.ones((1,), jnp.int32), (ordered[1:] != ordered[:-1]).astype(jnp.int32)])
    return jnp.zeros_like(order).at[order].set(jnp.cumsum(starts) - 1)


def _segments(group_ids: jax.Array | None, batch: int, num_groups: int | None) -> tuple[jax.Array, jax.Array, int]:
    """(segment id i32[B], in-range bool[B], static segment count): one group if ids are absent."""
    if group_ids is None:
        return jnp.zeros((batch,), jnp.int32), jnp.ones((batch,), bool), 1
    group_ids = _unsharded(jnp.asarray(group_ids))
    if group_ids.shape != (batch,):
        raise ValueError(f"covariance_statistics: `group_ids` has shape {group_ids.shape}; expected (B,) = ({batch},).")
    if not jnp.issubdtype(group_ids.dtype, jnp.integer):
        raise ValueError(
            f"covariance_statistics: `group_ids` has dtype {group_ids.dtype}; expected integer prompt ids."
        )
    if num_groups is None:
        return _dense_group_ids(group_ids).astype(jnp.int32), jnp.ones((batch,), bool), batch
    if num_groups < 1:
        raise ValueError(f"covariance_statistics: num_groups must be >= 1, got {num_groups}.")
    return group_ids.astype(jnp.int32), (group_ids >= 0) & (group_ids < num_groups), num_groups


def covariance_statistics(
    rewards: jax.Array,
    signal: jax.Array,
    group_ids: jax.Array | None = None,
    *,
    valid: jax.Array | None = None,
    num_groups: int | None = None,
    outlier_factor: float = 100.0,
    global_metrics: bool = False,
    eps: float = 1e-8,
) -> CovarianceStatistics:
    """Within-prompt Cov(r_j, w) per objective, averaged over groups of >= 2 kept samples (arXiv 2602.06869).

    Samples are kept when ``valid`` (default all), w and r are finite and |w| <= outlier_factor * median|w| (no filter
    when the median is 0). Group g has population covariance c_gj = mean_k (r_kj - mean r_j)(w_k - mean w) over its kept
    samples; cov_j = mean_g c_gj (0 without valid groups), corr_j = mean of c_gj / (std r_j std w) over groups where
    std r_j std w > eps. With ``global_metrics`` cov and corr pool the group-centred products over all samples of valid
    groups. The Interference Index of objective j is E_g[max(0, -c_gj)], and FracNeg_j = P_g[c_gj < 0].

    Args:
      rewards: f32[B, n] per-sample rewards.
      signal: f32[B], the training signal w (:func:`ctwa_signal`).
      group_ids: integer[B] prompt ids (absent: one group).
      valid: bool[B], samples to use (absent: all).
      num_groups: static number of groups (ids in [0, num_groups), others ignored); absent, ids are relabelled by
        sorting.
      outlier_factor: the outlier filter's multiple of median|w|.
      global_metrics: pool over the batch instead of averaging per group.
      eps: the floor below which a group's correlation is skipped.

    Returns:
      ``CovarianceStatistics``: cov, corr, frac_neg, interference (f32[n]), interference_index (f32[], their mean),
      mean_reward (f32[n], over valid samples) and num_valid_groups (i32[]).

    References:
      Y. Lu and M. Jiang, "Uncovering Cross-Objective Interference in Multi-Objective Alignment" (CTWA: Covariance Targeted Weight Adaptation), arXiv 2602.06869, 2026.

    Example:
      >>> import jax.numpy as jnp
      >>> from mojax.diagnostics import covariance_statistics
      >>> rewards = jnp.asarray([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])  # objective 2 pays where w < 0
      >>> stats = covariance_statistics(rewards, jnp.asarray([1.0, -1.0, 1.0, -1.0]))
      >>> [round(float(x), 3) for x in stats.cov], [round(float(x), 3) for x in stats.interference], round(float(stats.interference_index), 3)
      ([0.5, -0.5], [0.0, 0.5], 0.25)
    """
    rewards = _unsharded(jnp.asarray(rewards, jnp.float32))
    signal = _unsharded(jnp.asarray(signal, jnp.float32))
    if rewards.ndim != 2:
        raise ValueError(f"covariance_statistics: `rewards` has shape {rewards.shape}; expected (B, n).")
    batch = rewards.shape[0]
    if signal.shape != (batch,):
        raise ValueError(
            f"covariance_statistics: `signal` has shape {signal.shape}; expected (B,) = ({batch},) like `rewards`."
        )
    valid = jnp.ones((batch,), bool) if valid is None else _unsharded(jnp.asarray(valid).astype(bool))
    if valid.shape != (batch,):
        raise ValueError(f"covariance_statistics: `valid` has shape {valid.shape}; expected (B,) = ({batch},).")
    segment, in_range, num_segments = _segments(group_ids, batch, num_groups)

    finite = valid & jnp.isfinite(signal) & jnp.all(jnp.isfinite(rewards), axis=-1) & in_range
    magnitude = jnp.abs(jnp.where(finite, signal, 0.0))
    median = _masked_median(magnitude, finite)
    keep = finite & ((median <= 0) | (magnitude <= outlier_factor * median))
    kept = keep.astype(jnp.float32)
    w = jnp.where(keep, signal, 0.0)
    r = jnp.where(keep[:, None], rewards, 0.0)

    def group_sum(x: jax.Array) -> jax.Array:
        return jax.ops.segment_sum(x, segment, num_segments=num_segments)

    count = group_sum(kept)
    group_valid = count >= 2
    w_centred = (w - safe_divide(group_sum(w), count)[segment]) * kept
    r_centred = (r - safe_divide(group_sum(r), count[:, None])[segment]) * kept[:, None]
    cross = group_sum(r_centred * w_centred[:, None])
    w_square = group_sum(w_centred**2)
    r_square = group_sum(r_centred**2)

    weight = group_valid.astype(jnp.float32)
    num_valid = jnp.sum(weight)
    group_cov = safe_divide(cross, count[:, None])
    corr_denominator = jnp.sqrt(safe_divide(r_square, count[:, None]) * safe_divide(w_square, count)[:, None])
    corr_valid = group_valid[:, None] & (corr_denominator > eps)
    group_corr = jnp.where(corr_valid, safe_divide(group_cov, corr_denominator), 0.0)

    if global_metrics:
        pooled_count = jnp.sum(count * weight)
        cov = safe_divide(weight @ cross, pooled_count)
        pooled_denominator = jnp.sqrt(
            safe_divide(weight @ r_square, pooled_count) * safe_divide(weight @ w_square, pooled_count)
        )
        corr = jnp.where(pooled_denominator > eps, safe_divide(cov, pooled_denominator), 0.0)
    else:
        cov = safe_divide(weight @ group_cov, num_valid)
        corr = safe_divide(jnp.sum(group_corr, axis=0), jnp.sum(corr_valid, axis=0).astype(jnp.float32))

    interference = safe_divide(weight @ jnp.maximum(-group_cov, 0.0), num_valid)
    valid_rows = valid.astype(jnp.float32)
    return CovarianceStatistics(
        cov=cov,
        corr=corr,
        frac_neg=safe_divide(weight @ (group_cov < 0).astype(jnp.float32), num_valid),
        interference=interference,
        interference_index=jnp.mean(interference),
        mean_reward=safe_divide(valid_rows @ jnp.where(valid[:, None], rewards, 0.0), jnp.sum(valid_rows)),
        num_valid_groups=num_valid.astype(jnp.int32),
    )
