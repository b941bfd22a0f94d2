"""Per-objective advantage estimators of the RL trainer: every stage keeps the objective axis.

Shapes: n objectives, B sequences, T response tokens. ``mask`` f32[B, T] is a prefix mask per row
(1 on the response tokens, then 0 padding). Rewards f32[B, n] may hold NaN, meaning "not applicable":
such a sample is left out of that objective's statistics only (group means and deviations, batch
whitening), never out of the other objectives', and its advantage for that objective is 0.

How the estimators were read (each is written for one objective and applied to every column):

* GAE (Schulman et al. 2016): delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1},
  returns = A + V, as one reverse ``jax.lax.scan`` over time with a f32[n, B] carry. The value after
  the last response token is 0; advantages and returns are 0 on padding.
* GRPO (Shao et al. 2024): (r - group mean) / (group std + eps) with the Bessel-corrected std, or the
  whole batch's std (``scale_rewards="batch"``) or no division (``"none"``), the three readings of TRL.
  A member of a group with fewer than 2 finite rewards gets 0 (no baseline to compare with).
  eps is 1e-6 here as in verl and Tunix; TRL adds 1e-4.
* Dr. GRPO (Liu et al. 2025): r - group mean. RLOO (Ahmadian et al. 2024): r minus the mean of the
  *other* finite members of the group.
* REINFORCE++ (Hu 2025): returns-to-go of the token rewards, whitened over the batch per objective;
  the "baseline" variant whitens r - group mean broadcast over the response tokens instead.
* GDPO (TRL's ``multi_objective_aggregation="normalize_then_sum"``): each objective is group
  normalised, a_k, then A_k = (a_k - batch mean a_k) / (batch std of s + eps) with s = sum_k w_k a_k,
  so that sum_k w_k A_k is exactly TRL's (s - mean s) / (std s + eps) while the objective axis is kept
  for a combiner. The batch mean of a_k is 0 in exact arithmetic (each group's centred rewards sum to 0).

Groups are arbitrary integer labels: they are relabelled to 0..G-1 with a sized ``jnp.unique`` and
handled with segment sums (``num_segments = B``), so every estimator is jit-able. ``ESTIMATORS`` maps
each name to one record whose ``fn`` follows a single protocol, and ``compute_advantages`` is the
trainer's front door: it checks the name and the options before tracing and returns f32[n, B, T].
Noon clipping max(A, 0) is ``mojax.combiners.noon``.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mojax import _checks
from mojax._numerics import safe_divide

SCALE_REWARDS = ("group", "batch", "none")
"""Reward scalings of ``grpo``: group std, batch std, or none."""


class AdvantageInputs(NamedTuple):
    """What an estimator may read; ``compute_advantages`` takes one of these for every estimator.

    Attributes:
        scores: f32[B, n] one reward per sequence and objective (NaN: not applicable).
        mask: f32[B, T] response mask, a prefix of ones per row.
        group_ids: i32[B] prompt labels (any integers); needed by the group-based estimators.
        values: f32[n, B, T] critic values, one head per objective (``gae`` only).
        token_rewards: f32[n, B, T] per-token rewards (e.g. ``token_rewards(scores, mask, kl=kl, beta=beta)``)
            for ``gae`` and ``reinforce_pp``; absent, the scores are placed on the last response token.
        weights: f32[n] objective weights (``gdpo``; absent, all ones as TRL's ``reward_weights``).
    """

    scores: jax.Array
    mask: jax.Array
    group_ids: jax.Array | None
    values: jax.Array | None = None
    token_rewards: jax.Array | None = None
    weights: jax.Array | None = None


class Advantages(NamedTuple):
    """f32[n, B, T] advantages (0 on padding and on non-applicable samples) and, for ``gae``, the returns."""

    advantages: jax.Array
    returns: jax.Array | None = None


# ----------------------------------------------------------------------------------------------- checks


def _shape(where: str, arg: str, array: Any, expected: tuple[int | None, ...], meaning: str) -> jax.Array:
    """The f32 array if its shape matches `expected` (None: any size); ValueError naming both shapes otherwise."""
    array = jnp.asarray(array, jnp.float32)
    if array.ndim != len(expected) or any(e is not None and s != e for s, e in zip(array.shape, expected, strict=True)):
        raise ValueError(_checks.message(where, arg, f"has shape {array.shape}", meaning))
    return array


def _batch_mask(where: str, mask: Any) -> jax.Array:
    """f32[B, T] response mask."""
    return _shape(where, "mask", mask, (None, None), "a (B, T) response mask")


def _reward_matrix(where: str, rewards: Any) -> jax.Array:
    """f32[B, n] rewards."""
    return _shape(where, "rewards", rewards, (None, None), "(B, n) rewards, one column per objective")


def _group_labels(where: str, group_ids: Any, batch: int) -> jax.Array:
    """i32[B] labels in [0, B): equal ids share a label (a sized unique, so jit-able)."""
    if group_ids is None:
        raise ValueError(_checks.message(where, "group_ids", "is None", f"i32[B] prompt labels with B = {batch}"))
    group_ids = jnp.asarray(group_ids)
    if group_ids.shape != (batch,) or not jnp.issubdtype(group_ids.dtype, jnp.integer):
        raise ValueError(
            _checks.message(
                where,
                "group_ids",
                f"has shape {group_ids.shape} and dtype {group_ids.dtype}",
                f"integers of shape ({batch},)",
            )
        )
    _, labels = jnp.unique(group_ids, return_inverse=True, size=batch)
    return labels.reshape(batch)


def _token_mask(where: str, mask: Any, shape: tuple[int, ...]) -> jax.Array:
    """f32[..., B, T] mask from a f32[B, T] response mask or a per-objective one of the full shape."""
    mask = jnp.asarray(mask, jnp.float32)
    if mask.shape not in (shape, shape[-2:]):
        raise ValueError(_checks.message(where, "mask", f"has shape {mask.shape}", f"{shape[-2:]} or {shape}"))
    return jnp.broadcast_to(mask, shape)


# ------------------------------------------------------------------------------------------ group sums


class _Groups(NamedTuple):
    """Per-sample group statistics: labels i32[B]; f32[B, n] finite flag, rewards with NaN -> 0, group count and sum."""

    labels: jax.Array
    finite: jax.Array
    rewards: jax.Array
    count: jax.Array
    total: jax.Array


def _group_sum(x: jax.Array, labels: jax.Array) -> jax.Array:
    """f32[B, n] sum of x over each sample's group, given back to every member."""
    return jax.ops.segment_sum(x, labels, num_segments=x.shape[0])[labels]


def _groups(where: str, rewards: Any, group_ids: Any) -> _Groups:
    """Each sample's group count and sum of finite rewards, per objective."""
    rewards = _reward_matrix(where, rewards)
    labels = _group_labels(where, group_ids, rewards.shape[0])
    finite = jnp.isfinite(rewards)
    values = jnp.where(finite, rewards, 0.0)
    finite = finite.astype(jnp.float32)
    return _Groups(labels, finite, values, _group_sum(finite, labels), _group_sum(values, labels))


def _centred(groups: _Groups) -> jax.Array:
    """f32[B, n] r - group mean for samples of groups with >= 2 finite rewards, else 0."""
    mean = safe_divide(groups.total, groups.count)
    return (groups.rewards - mean) * groups.finite * (groups.count >= 2)


def _bessel_std(square_sum: jax.Array, count: jax.Array) -> jax.Array:
    """sqrt(sum of squared deviations / (count - 1)); 0 with fewer than 2 samples."""
    return jnp.sqrt(safe_divide(square_sum, count - 1.0))


# ----------------------------------------------------------------------------------------- estimators


def token_rewards(
    scores: jax.Array, mask: jax.Array, *, kl: jax.Array | None = None, beta: float | jax.Array = 0.0
) -> jax.Array:
    """Per-token rewards f32[n, B, T]: each score on its row's last response token, minus beta KL per token.

    Args:
        scores: f32[B, n] one score per sequence and objective; NaN (not applicable) places 0.
        mask: f32[B, T] response mask (a prefix of ones); a row without response tokens gets no score.
        kl: optional f32[B, T] per-token KL estimate to the reference (see ``mojax.rl.losses.kl_estimate``).
        beta: KL coefficient (a number or a traced scalar, e.g. from an adaptive controller).

    Returns:
        f32[n, B, T] with r[k, b, sum(mask_b) - 1] = scores[b, k] and -beta kl on every response token.

    References:
        Ouyang et al., "Training language models to follow instructions with human feedback", NeurIPS 2022,
        arXiv 2203.02155 (KL penalty in the per-token reward).
    """
    where = "token_rewards"
    mask = _batch_mask(where, mask)
    batch, length = mask.shape
    scores = _shape(where, "scores", scores, (batch, None), f"(B, n) scores with B = {batch} like `mask`")
    lengths = jnp.sum(mask, axis=-1).astype(jnp.int32)
    last = (jnp.arange(length) == (lengths - 1)[:, None]).astype(jnp.float32)
    placed = jnp.where(jnp.isfinite(scores), scores, 0.0).T[:, :, None] * last
    if kl is None:
        return placed
    kl = _shape(where, "kl", kl, (batch, length), f"a (B, T) = {mask.shape} per-token KL like `mask`")
    return placed - jnp.asarray(beta, jnp.float32) * kl * mask


def _reverse_discounted_sum(x: jax.Array, mask: jax.Array, discount: float) -> jax.Array:
    """y_t = m_t (x_t + discount y_{t+1}) over the last axis, f32[n, B, T], as one reverse scan (carry f32[n, B])."""

    def step(carry: jax.Array, inputs: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        x_t, m_t = inputs
        y_t = (x_t + discount * carry) * m_t
        return y_t, y_t

    time_major = (jnp.moveaxis(x, -1, 0), jnp.moveaxis(mask, -1, 0))
    _, ys = jax.lax.scan(step, jnp.zeros(x.shape[:-1], jnp.float32), time_major, reverse=True)
    return jnp.moveaxis(ys, 0, -1)


def gae(
    rewards: jax.Array, values: jax.Array, mask: jax.Array, *, gamma: float, lam: float
) -> tuple[jax.Array, jax.Array]:
    """Generalized advantage estimation per objective, f32[n, B, T] advantages and returns.

    delta_t = r_t + gamma V_{t+1} - V_t and A_t = delta_t + gamma lam A_{t+1}, computed backwards in one
    ``jax.lax.scan`` over time; the value after the last response token is 0; returns = A + V. Both are
    0 where the mask is 0. Advantages are not whitened here (``compute_advantages`` does it by default).

    Args:
        rewards: f32[n, B, T] per-token rewards (see ``token_rewards``).
        values: f32[n, B, T] values of the vector critic.
        mask: f32[B, T] response mask, or f32[n, B, T] per objective.
        gamma: discount in [0, 1].
        lam: GAE lambda in [0, 1].

    Returns:
        (advantages, returns), each f32[n, B, T].

    References:
        Schulman, Moritz, Levine, Jordan, Abbeel, "High-Dimensional Continuous Control Using Generalized
        Advantage Estimation", ICLR 2016, arXiv 1506.02438.

    Example:
        >>> import jax.numpy as jnp
        >>> advantages, returns = gae(jnp.ones((1, 1, 3)), jnp.zeros((1, 1, 3)), jnp.ones((1, 3)), gamma=1.0, lam=1.0)
        >>> advantages.tolist()
        [[[3.0, 2.0, 1.0]]]
    """
    where = "gae"
    gamma = _checks.in_range(where, "gamma", gamma, low=0.0, high=1.0)
    lam = _checks.in_range(where, "lam", lam, low=0.0, high=1.0)
    rewards = _shape(where, "rewards", rewards, (None, None, None), "(n, B, T) per-token rewards")
    values = _shape(where, "values", values, rewards.shape, f"{rewards.shape} like `rewards`")
    mask = _token_mask(where, mask, rewards.shape)
    next_values = jnp.pad((values * mask)[..., 1:], ((0, 0), (0, 0), (0, 1)))
    deltas = (rewards + gamma * next_values - values) * mask
    advantages = _reverse_discounted_sum(deltas, mask, gamma * lam)
    return advantages, (advantages + values) * mask


def grpo(rewards: jax.Array, group_ids: jax.Array, *, scale_rewards: str = "group", eps: float = 1e-6) -> jax.Array:
    """GRPO advantages f32[n, B]: (r - group mean) / (std + eps), per objective.

    ``scale_rewards="group"`` divides by the group's Bessel-corrected std, ``"batch"`` by the whole
    batch's (finite rewards of that objective), ``"none"`` not at all. NaN rewards are left out of
    the statistics and get 0, as does every member of a group with fewer than 2 finite rewards.
    eps is 1e-6 as in verl and Tunix; TRL uses 1e-4.

    Args:
        rewards: f32[B, n] rewards (NaN: not applicable).
        group_ids: i32[B] prompt labels, any integers in any order.
        scale_rewards: "group", "batch" or "none".
        eps: added to the std.

    Returns:
        f32[n, B] advantages.

    References:
        Shao et al., "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models",
        2024, arXiv 2402.03300.

    Example:
        >>> import jax.numpy as jnp
        >>> grpo(jnp.array([[1.0], [0.0], [5.0]]), jnp.array([7, 7, 2]), eps=0.0).tolist()
        [[0.7071067690849304, -0.7071067690849304, 0.0]]
    """
    where = "grpo"
    _checks.choice(where, "scale_rewards", scale_rewards, SCALE_REWARDS)
    eps = _checks.nonnegative(where, "eps", eps)
    groups = _groups(where, rewards, group_ids)
    centred = _centred(groups)
    if scale_rewards == "none":
        return centred.T
    if scale_rewards == "group":
        std = _bessel_std(_group_sum(centred**2, groups.labels), groups.count)
    else:
        count = jnp.sum(groups.finite, axis=0)
        mean = safe_divide(jnp.sum(groups.rewards, axis=0), count)
        std = _bessel_std(jnp.sum(((groups.rewards - mean) * groups.finite) ** 2, axis=0), count)
    return safe_divide(centred, std + eps).T


def dr_grpo(rewards: jax.Array, group_ids: jax.Array) -> jax.Array:
    """Dr. GRPO advantages f32[n, B]: r - group mean, without the std division.

    Args:
        rewards: f32[B, n] rewards (NaN: not applicable, advantage 0).
        group_ids: i32[B] prompt labels, any integers in any order.

    Returns:
        f32[n, B] advantages; 0 for groups with fewer than 2 finite rewards.

    References:
        Liu et al., "Understanding R1-Zero-Like Training: A Critical Perspective", 2025, arXiv 2503.20783.
    """
    return _centred(_groups("dr_grpo", rewards, group_ids)).T


def rloo(rewards: jax.Array, group_ids: jax.Array) -> jax.Array:
    """REINFORCE leave-one-out advantages f32[n, B]: r_i minus the mean of the other finite members of its group.

    Args:
        rewards: f32[B, n] rewards (NaN: not applicable, advantage 0).
        group_ids: i32[B] prompt labels, any integers in any order.

    Returns:
        f32[n, B] advantages; 0 for a sample with no other finite member in its group.

    References:
        Ahmadian et al., "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
        Feedback in LLMs", ACL 2024, arXiv 2402.14740.
    """
    groups = _groups("rloo", rewards, group_ids)
    others = groups.count - 1.0
    baseline = safe_divide(groups.total - groups.rewards, others)
    return ((groups.rewards - baseline) * groups.finite * (others > 0)).T


def whiten(advantages: jax.Array, mask: jax.Array, *, shift_mean: bool = True, eps: float = 1e-8) -> jax.Array:
    """Masked whitening per objective over (B, T): (x - mean) / sqrt(var + eps), 0 on padding.

    mean and the Bessel-corrected variance are taken over the tokens where the mask is 1 (as Tunix and
    verl ``masked_whiten``); ``shift_mean=False`` adds the mean back, so only the scale changes. With
    fewer than 2 tokens the variance is 0.

    Args:
        advantages: f32[..., B, T], e.g. f32[n, B, T].
        mask: f32[B, T], or a mask of the same shape as ``advantages`` (e.g. per objective).
        shift_mean: subtract the mean (True) or keep it.
        eps: added to the variance.

    Returns:
        Whitened advantages of the same shape, multiplied by the mask.

    References:
        Hu, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language Models", 2025,
        arXiv 2501.03262 (batch whitening of token advantages).
    """
    where = "whiten"
    if not isinstance(shift_mean, bool):
        raise TypeError(_checks.message(where, "shift_mean", f"is {shift_mean!r}", "True or False"))
    eps = _checks.nonnegative(where, "eps", eps)
    advantages = jnp.asarray(advantages, jnp.float32)
    if advantages.ndim < 2:
        raise ValueError(_checks.message(where, "advantages", f"has shape {advantages.shape}", "(..., B, T)"))
    mask = _token_mask(where, mask, advantages.shape)
    axes = (-2, -1)
    count = jnp.sum(mask, axis=axes, keepdims=True)
    mean = safe_divide(jnp.sum(advantages * mask, axis=axes, keepdims=True), count)
    variance = safe_divide(jnp.sum((advantages - mean) ** 2 * mask, axis=axes, keepdims=True), count - 1.0)
    whitened = (advantages - mean) * jax.lax.rsqrt(variance + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def reinforce_pp(token_rewards: jax.Array, mask: jax.Array, *, gamma: float = 1.0) -> jax.Array:
    """REINFORCE++ advantages f32[n, B, T]: returns-to-go G_t = r_t + gamma G_{t+1}, whitened per objective.

    Args:
        token_rewards: f32[n, B, T] per-token rewards (see ``token_rewards``).
        mask: f32[B, T] response mask, or f32[n, B, T] per objective (0 rows leave the whitening statistics).
        gamma: discount in [0, 1].

    Returns:
        f32[n, B, T] advantages, 0 on padding.

    References:
        Hu, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language Models", 2025,
        arXiv 2501.03262.
    """
    where = "reinforce_pp"
    gamma = _checks.in_range(where, "gamma", gamma, low=0.0, high=1.0)
    rewards = _shape(where, "token_rewards", token_rewards, (None, None, None), "(n, B, T) per-token rewards")
    mask = _token_mask(where, mask, rewards.shape)
    return whiten(_reverse_discounted_sum(rewards * mask, mask, gamma), mask)


def reinforce_pp_baseline(rewards: jax.Array, group_ids: jax.Array, mask: jax.Array) -> jax.Array:
    """REINFORCE++-baseline advantages f32[n, B, T]: r - group mean on every response token, whitened per objective.

    Args:
        rewards: f32[B, n] rewards (NaN: not applicable, left out of the whitening, advantage 0).
        group_ids: i32[B] prompt labels, any integers in any order.
        mask: f32[B, T] response mask.

    Returns:
        f32[n, B, T] advantages, 0 on padding.

    References:
        Hu, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language Models", 2025,
        arXiv 2501.03262.
    """
    where = "reinforce_pp_baseline"
    groups = _groups(where, rewards, group_ids)
    mask = _shape(where, "mask", mask, (groups.rewards.shape[0], None), "a (B, T) response mask with B like `rewards`")
    applicable = groups.finite.T[:, :, None] * mask
    return whiten(_centred(groups).T[:, :, None] * applicable, applicable)


def gdpo(rewards: jax.Array, group_ids: jax.Array, weights: jax.Array, *, eps: float = 1e-6) -> jax.Array:
    """GDPO advantages f32[n, B]: per-objective group normalisation, then one batch scale shared by all objectives.

    a_k = (r_k - group mean) / (group std + eps) (``grpo``), s = sum_k w_k a_k, and
    A_k = (a_k - batch mean of a_k) / (batch std of s + eps), Bessel-corrected std over the B rows.
    Hence sum_k w_k A_k = (s - mean s) / (std s + eps), TRL's ``normalize_then_sum`` advantage, while
    each objective keeps its own column for a combiner. TRL uses eps = 1e-4.

    Args:
        rewards: f32[B, n] rewards (NaN: not applicable, advantage 0).
        group_ids: i32[B] prompt labels, any integers in any order.
        weights: f32[n] objective weights (TRL's ``reward_weights``).
        eps: added to both stds.

    Returns:
        f32[n, B] advantages.

    References:
        Liu et al., "GDPO: Group reward-Decoupled Normalization Policy Optimization for Multi-reward RL
        Optimization", 2026, arXiv 2601.05242.
    """
    where = "gdpo"
    eps = _checks.nonnegative(where, "eps", eps)
    normalised = grpo(rewards, group_ids, scale_rewards="group", eps=eps)
    weights = _shape(
        where, "weights", weights, (normalised.shape[0],), f"{normalised.shape[0]} weights, one per objective"
    )
    combined = jnp.tensordot(weights, normalised, axes=1)
    rows = jnp.asarray(combined.shape[0], jnp.float32)
    std = _bessel_std(jnp.sum((combined - jnp.mean(combined)) ** 2), rows)
    centred = normalised - jnp.mean(normalised, axis=1, keepdims=True)
    applicable = jnp.isfinite(_reward_matrix(where, rewards)).T
    return jnp.where(applicable, safe_divide(centred, std + eps), 0.0)


def combine_rewards(rewards: jax.Array, weights: jax.Array) -> jax.Array:
    """One weighted reward f32[B, 1] = nansum_k w_k r_k (NaN if every reward of the row is NaN).

    The first step of TRL's ``multi_objective_aggregation="sum_then_normalize"``: the result is a single
    objective, so any estimator can run on it.

    Args:
        rewards: f32[B, n] rewards (NaN: not applicable).
        weights: f32[n] objective weights.

    Returns:
        f32[B, 1] combined reward.

    References:
        Shao et al., "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models",
        2024, arXiv 2402.03300.
    """
    where = "combine_rewards"
    rewards = _reward_matrix(where, rewards)
    weights = _shape(where, "weights", weights, (rewards.shape[1],), f"{rewards.shape[1]} weights, one per objective")
    finite = jnp.isfinite(rewards)
    combined = jnp.tensordot(jnp.where(finite, rewards, 0.0), weights, axes=1)
    return jnp.where(jnp.any(finite, axis=1), combined, jnp.nan)[:, None]


# ------------------------------------------------------------------------------------------- registry


def _check_fraction(where: str, arg: str, value: Any) -> float:
    return _checks.in_range(where, arg, value, low=0.0, high=1.0)


def _check_flag(where: str, arg: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(_checks.message(where, arg, f"is {value!r}", "True or False"))
    return value


_OPTION_CHECKS: Mapping[str, Callable[[str, str, Any], Any]] = {
    "gamma": _check_fraction,
    "lam": _check_fraction,
    "whiten_advantages": _check_flag,
    "eps": _checks.nonnegative,
    "scale_rewards": lambda where, arg, value: _checks.choice(where, arg, value, SCALE_REWARDS),
}


@dataclass(frozen=True)
class Estimator:
    """One registered advantage estimator.

    Attributes:
        fn: ``fn(inputs: AdvantageInputs, **options) -> Advantages`` with advantages f32[n, B] (one per
            sequence) or f32[n, B, T]; ``compute_advantages`` broadcasts and masks them.
        options: the keyword options ``fn`` accepts and their defaults.
        group_based: needs >= 2 generations per prompt (``group_ids``).
        needs_values: needs the critic's ``values``.
        summary: one line for help texts.
    """

    fn: Callable[..., Advantages]
    options: Mapping[str, Any]
    group_based: bool
    needs_values: bool
    summary: str


def _placed_rewards(inputs: AdvantageInputs) -> jax.Array:
    """The given per-token rewards, or the scores on the last response token."""
    if inputs.token_rewards is not None:
        return inputs.token_rewards
    return token_rewards(inputs.scores, inputs.mask)


def _applicable(inputs: AdvantageInputs) -> jax.Array:
    """f32[n, B, T] response mask of each objective: 0 on padding and where the score is NaN."""
    finite = jnp.isfinite(jnp.asarray(inputs.scores, jnp.float32)).T
    return finite[:, :, None] * jnp.asarray(inputs.mask, jnp.float32)


def _gae_estimator(inputs: AdvantageInputs, *, gamma: float, lam: float, whiten_advantages: bool) -> Advantages:
    mask = _applicable(inputs)
    advantages, returns = gae(_placed_rewards(inputs), inputs.values, mask, gamma=gamma, lam=lam)
    return Advantages(whiten(advantages, mask) if whiten_advantages else advantages, returns)


def _grpo_estimator(inputs: AdvantageInputs, *, scale_rewards: str, eps: float) -> Advantages:
    return Advantages(grpo(inputs.scores, inputs.group_ids, scale_rewards=scale_rewards, eps=eps))


def _dr_grpo_estimator(inputs: AdvantageInputs) -> Advantages:
    return Advantages(dr_grpo(inputs.scores, inputs.group_ids))


def _rloo_estimator(inputs: AdvantageInputs) -> Advantages:
    return Advantages(rloo(inputs.scores, inputs.group_ids))


def _reinforce_pp_estimator(inputs: AdvantageInputs, *, gamma: float) -> Advantages:
    return Advantages(reinforce_pp(_placed_rewards(inputs), _applicable(inputs), gamma=gamma))


def _reinforce_pp_baseline_estimator(inputs: AdvantageInputs) -> Advantages:
    return Advantages(reinforce_pp_baseline(inputs.scores, inputs.group_ids, inputs.mask))


def _gdpo_estimator(inputs: AdvantageInputs, *, eps: float) -> Advantages:
    weights = inputs.weights
    if weights is None:
        weights = jnp.ones((jnp.shape(inputs.scores)[1],), jnp.float32)
    return Advantages(gdpo(inputs.scores, inputs.group_ids, weights, eps=eps))


ESTIMATORS: Mapping[str, Estimator] = types.MappingProxyType(
    {
        "gae": Estimator(
            _gae_estimator,
            types.MappingProxyType({"gamma": 1.0, "lam": 0.95, "whiten_advantages": True}),
            group_based=False,
            needs_values=True,
            summary="GAE on the vector critic's values; advantages whitened per objective, returns for the critic",
        ),
        "grpo": Estimator(
            _grpo_estimator,
            types.MappingProxyType({"scale_rewards": "group", "eps": 1e-6}),
            group_based=True,
            needs_values=False,
            summary="(r - group mean) / (group, batch or no std + eps)",
        ),
        "dr_grpo": Estimator(
            _dr_grpo_estimator,
            types.MappingProxyType({}),
            group_based=True,
            needs_values=False,
            summary="r - group mean (Dr. GRPO)",
        ),
        "rloo": Estimator(
            _rloo_estimator,
            types.MappingProxyType({}),
            group_based=True,
            needs_values=False,
            summary="r - mean of the other members of the group (leave-one-out)",
        ),
        "reinforce_pp": Estimator(
            _reinforce_pp_estimator,
            types.MappingProxyType({"gamma": 1.0}),
            group_based=False,
            needs_values=False,
            summary="returns-to-go of the token rewards, whitened over the batch (REINFORCE++)",
        ),
        "reinforce_pp_baseline": Estimator(
            _reinforce_pp_baseline_estimator,
            types.MappingProxyType({}),
            group_based=True,
            needs_values=False,
            summary="r - group mean on every token, whitened over the batch (REINFORCE++-baseline)",
        ),
        "gdpo": Estimator(
            _gdpo_estimator,
            types.MappingProxyType({"eps": 1e-6}),
            group_based=True,
            needs_values=False,
            summary="group-normalised per objective, scaled by the batch std of the weighted sum (GDPO)",
        ),
    }
)
"""Advantage estimators by name, read-only; every ``fn`` follows ``fn(inputs, **options) -> Advantages``."""


def _check_inputs(where: str, name: str, estimator: Estimator, inputs: Any) -> None:
    """Shapes of the inputs this estimator reads; ValueError naming what is missing or mis-shaped."""
    if not isinstance(inputs, AdvantageInputs):
        raise TypeError(_checks.message(where, "inputs", f"is a {type(inputs).__name__}", "an AdvantageInputs"))
    mask = _batch_mask(where, inputs.mask)
    batch, length = mask.shape
    scores = _shape(where, "inputs.scores", inputs.scores, (batch, None), f"(B, n) scores with B = {batch} like `mask`")
    n = scores.shape[1]
    per_token = (n, batch, length)
    if estimator.needs_values:
        if inputs.values is None:
            raise ValueError(
                _checks.message(where, "inputs.values", "is None", f"f32{list(per_token)} values for {name!r}")
            )
        _shape(where, "inputs.values", inputs.values, per_token, f"(n, B, T) = {per_token}")
    if inputs.token_rewards is not None:
        _shape(where, "inputs.token_rewards", inputs.token_rewards, per_token, f"(n, B, T) = {per_token}")
    if inputs.weights is not None:
        _shape(where, "inputs.weights", inputs.weights, (n,), f"{n} weights, one per objective")
    if estimator.group_based and inputs.group_ids is None:
        raise ValueError(
            _checks.message(where, "inputs.group_ids", "is None", f"i32[{batch}] prompt labels for {name!r}")
        )


def check_estimator_options(
    where: str, name: Any, options: Mapping[str, Any], *, arg: str = "options"
) -> dict[str, Any]:
    """The options of the estimator ``name`` with its defaults filled in, each checked: TypeError or ValueError naming
    ``where``, the estimator or the option (``arg.key`` unless ``arg`` is ``"options"``) and what was expected."""
    if not isinstance(name, str):
        raise TypeError(_checks.message(where, "name", f"is a {type(name).__name__} ({name!r})", "an estimator name"))
    estimator = ESTIMATORS[_checks.choice(where, "name", name, ESTIMATORS)]
    unknown = sorted(set(options) - set(estimator.options))
    if unknown:
        accepted = ", ".join(estimator.options) or "no options"
        raise ValueError(_checks.message(where, arg, f"has {unknown} for {name!r}", accepted))
    checked = {
        key: _OPTION_CHECKS[key](where, key if arg == "options" else f"{arg}.{key}", value)
        for key, value in options.items()
    }
    return {**estimator.options, **checked}


def compute_advantages(name: str, inputs: AdvantageInputs, **options: Any) -> Advantages:
    """Advantages f32[n, B, T] of the named estimator, one protocol for every estimator of ``ESTIMATORS``.

    The estimator's output (one value per sequence or per token) is broadcast over the response tokens
    and multiplied by the mask; samples whose score is NaN get 0 for that objective. The name, the
    options and the input shapes are checked before anything is traced.

    Args:
        name: a key of ``ESTIMATORS``: "gae", "grpo", "dr_grpo", "rloo", "reinforce_pp",
            "reinforce_pp_baseline" or "gdpo".
        inputs: the batch, see ``AdvantageInputs``.
        **options: the estimator's options (``ESTIMATORS[name].options`` lists them with their defaults):
            gae: gamma=1.0, lam=0.95, whiten_advantages=True; grpo: scale_rewards="group", eps=1e-6;
            reinforce_pp: gamma=1.0; gdpo: eps=1e-6.

    Returns:
        ``Advantages(advantages f32[n, B, T], returns f32[n, B, T] for "gae" else None)``.

    References:
        See each estimator: ``gae``, ``grpo``, ``dr_grpo``, ``rloo``, ``reinforce_pp``,
        ``reinforce_pp_baseline``, ``gdpo``.

    Example:
        >>> import jax.numpy as jnp
        >>> inputs = AdvantageInputs(
        ...     scores=jnp.array([[1.0, 0.0], [0.0, jnp.nan]]), mask=jnp.array([[1.0, 1.0], [1.0, 0.0]]),
        ...     group_ids=jnp.array([3, 3]))
        >>> compute_advantages("dr_grpo", inputs).advantages.tolist()
        [[[0.5, 0.5], [-0.5, 0.0]], [[0.0, 0.0], [0.0, 0.0]]]
    """
    where = "compute_advantages"
    checked = check_estimator_options(where, name, options)
    estimator = ESTIMATORS[name]
    _check_inputs(where, name, estimator, inputs)
    result = estimator.fn(inputs, **checked)
    applicable = _applicable(inputs)
    advantages = result.advantages if result.advantages.ndim == 3 else result.advantages[:, :, None]
    return Advantages(jnp.where(applicable > 0, advantages, 0.0), result.returns)
