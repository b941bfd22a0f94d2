"""Per-objective policy losses of the RL trainer, as (sums, counts) so that micro-batches add up exactly.

Shapes: n objectives, B sequences, T response tokens; ``mask`` f32[B, T] marks the response tokens.
The policy's log-probabilities f32[B, T] are shared by every objective; only the advantages carry
the objective axis, so a policy loss is f32[n] (one per objective, for the combiner) while the
shared terms (KL to the reference, entropy, value loss) are kept apart and added after combination.

How the sources were read:

* PPO-clip (Schulman et al. 2017) per token, L = max(-A rho, -A clip(rho, 1 - eps, 1 + eps_high)), with
  the decoupled upper bound of DAPO (Yu et al. 2025) and the log-ratio clamped to +-20 before ``exp``
  as verl does. Dual clip (Ye et al. 2020) bounds the loss of negative advantages: L = min(L, -c A).
* GSPO (Zheng et al. 2025) replaces the token ratio by the sequence's geometric-mean ratio
  s = exp(mean_t log-ratio), written per token as log s = logp - sg(logp) + sg(mean_t log-ratio) so
  that every token keeps its own gradient of logp (the "GSPO-token" form).
* Aggregation (verl's ``loss_agg_mode``): the token losses become ``LossTerms(sums, counts)`` and the
  loss is sums / counts (or sums / loss_scale_factor for ``seq-mean-token-sum-norm``). Terms of
  micro-batches add, so the accumulated loss and its gradient equal those of the full batch. Rows
  without any response token are padding: they are not counted by the sequence means.
* KL estimators k1, k2, k3 of Schulman ("Approximating KL Divergence", 2020), with verl's names.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from mojax import _checks
from mojax._numerics import rows_contraction, safe_divide, token_matmul, token_rows

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
"""Loss aggregations, named as in verl."""

IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
"""Per-token ratios (PPO) or one ratio per sequence (GSPO)."""

KL_ESTIMATORS: Mapping[str, str] = types.MappingProxyType(
    {"k1": "k1", "k2": "k2", "k3": "k3", "kl": "k1", "mse": "k2", "low_var_kl": "k3"}
)
"""KL estimator names and their verl aliases."""

# exp(-x) of k3 is evaluated with -x clamped here (as verl), so fp32 never overflows.
_K3_EXPONENT_BOUND = 20.0


class LossTerms(NamedTuple):
    """Unnormalised loss sums f32[...] and their denominators (f32[], or f32[...] for per-objective masks).

    ``a + b`` adds the terms of two micro-batches; ``aggregate`` turns the total into the loss.
    """

    sums: jax.Array
    counts: jax.Array

    def __add__(self, other: LossTerms) -> LossTerms:  # type: ignore[override]
        return LossTerms(self.sums + other.sums, self.counts + other.counts)


def _shape(where: str, arg: str, array: Any, expected: tuple[int | None, ...], meaning: str) -> jax.Array:
    """The f32 array if its shape matches `expected` (None: any size); ValueError naming both shapes otherwise."""
    array = jnp.asarray(array, jnp.float32)
    if array.ndim != len(expected) or any(e is not None and s != e for s, e in zip(array.shape, expected, strict=True)):
        raise ValueError(_checks.message(where, arg, f"has shape {array.shape}", meaning))
    return array


def _token_arrays(where: str, logp: Any, old_logp: Any, mask: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """f32[B, T] log-probs, old log-probs and mask of one shape."""
    logp = _shape(where, "logp", logp, (None, None), "(B, T) token log-probabilities")
    old_logp = _shape(where, "old_logp", old_logp, logp.shape, f"{logp.shape} like `logp`")
    mask = _shape(where, "mask", mask, logp.shape, f"{logp.shape} like `logp`")
    return logp, old_logp, mask


def _token_advantages(where: str, advantages: Any, shape: tuple[int, int]) -> jax.Array:
    """f32[n, B, T] from f32[n, B, T] or f32[n, B] (one advantage per sequence)."""
    advantages = jnp.asarray(advantages, jnp.float32)
    if advantages.ndim == 2 and advantages.shape[1] == shape[0]:
        advantages = advantages[:, :, None]
    if advantages.ndim != 3 or advantages.shape[1] != shape[0] or advantages.shape[2] not in (1, shape[1]):
        raise ValueError(
            _checks.message(
                where, "advantages", f"has shape {advantages.shape}", f"(n, {shape[0]}, {shape[1]}) or (n, {shape[0]})"
            )
        )
    return jnp.broadcast_to(advantages, (advantages.shape[0], *shape))


def _clip_bounds(where: str, epsilon: Any, epsilon_high: Any) -> tuple[float, float]:
    """(1 - epsilon, 1 + epsilon_high) with epsilon_high defaulting to epsilon."""
    epsilon = _checks.in_range(where, "epsilon", epsilon, low=0.0, high=1.0)
    epsilon_high = epsilon if epsilon_high is None else _checks.nonnegative(where, "epsilon_high", epsilon_high)
    return 1.0 - epsilon, 1.0 + epsilon_high


def _masked_row_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """f32[..., B] mean over the tokens of each row; 0 for a row without tokens."""
    return safe_divide(jnp.sum(x * mask, axis=-1), jnp.sum(mask, axis=-1))


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of x f32[..., B, T] over the tokens where mask f32[B, T] is 1, f32[...]; 0 without tokens.

    Args:
        x: f32[B, T] (e.g. KL or entropy per token) or f32[n, B, T] (e.g. advantages).
        mask: f32[B, T] response mask.

    Returns:
        f32[] or f32[n].
    """
    mask = jnp.asarray(mask, jnp.float32)
    return safe_divide(jnp.sum(jnp.asarray(x, jnp.float32) * mask, axis=(-2, -1)), jnp.sum(mask))


def log_ratio(
    logp: jax.Array,
    old_logp: jax.Array,
    mask: jax.Array,
    *,
    importance_sampling_level: str = "token",
    log_ratio_clamp: float = 20.0,
) -> jax.Array:
    """log rho f32[B, T]: logp - old_logp per token, or GSPO's logp - sg(logp) + sg(mean_t(logp - old_logp)).

    Both are clamped to +-log_ratio_clamp before anyone takes ``exp``.

    Args:
        logp: f32[B, T] log-probabilities of the policy being trained.
        old_logp: f32[B, T] log-probabilities of the policy that sampled (or the last update's).
        mask: f32[B, T] response mask (the sequence mean runs over it).
        importance_sampling_level: "token" (PPO) or "sequence" (GSPO).
        log_ratio_clamp: bound on |log rho|.

    Returns:
        f32[B, T] log-ratios; under "sequence" every token of a row has the row's value and the gradient
        of its own logp (GSPO is meant to be aggregated with ``seq-mean-token-mean``, which verl enforces).

    References:
        Zheng et al., "Group Sequence Policy Optimization", 2025, arXiv 2507.18071.
    """
    where = "log_ratio"
    _checks.choice(where, "importance_sampling_level", importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
    bound = _checks.positive(where, "log_ratio_clamp", log_ratio_clamp)
    logp, old_logp, mask = _token_arrays(where, logp, old_logp, mask)
    token = logp - old_logp
    if importance_sampling_level == "sequence":
        sequence = jax.lax.stop_gradient(_masked_row_mean(token, mask))[:, None]
        token = logp - jax.lax.stop_gradient(logp) + sequence
    return jnp.clip(token, -bound, bound)


def ppo_token_losses(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    dual_clip: float | None = None,
    importance_sampling_level: str = "token",
    log_ratio_clamp: float = 20.0,
) -> jax.Array:
    """PPO-clip token losses f32[n, B, T] = max(-A rho, -A clip(rho, 1 - eps, 1 + eps_high)), dual-clipped if asked.

    Args:
        logp: f32[B, T] log-probabilities of the policy being trained.
        old_logp: f32[B, T] log-probabilities of the sampling policy.
        advantages: f32[n, B, T], or f32[n, B] broadcast over the tokens.
        mask: f32[B, T] response mask.
        epsilon: lower clip range in [0, 1].
        epsilon_high: upper clip range (None: ``epsilon``; DAPO uses 0.28).
        dual_clip: c > 1: for A < 0 the loss is min(L, -c A); None disables it (verl uses 3.0).
        importance_sampling_level: "token" (PPO) or "sequence" (GSPO), see ``log_ratio``.
        log_ratio_clamp: bound on |log rho| before ``exp``.

    Returns:
        f32[n, B, T] token losses (not masked; the aggregation masks them).

    References:
        Schulman et al., "Proximal Policy Optimization Algorithms", 2017, arXiv 1707.06347.
        Ye et al., "Mastering Complex Control in MOBA Games with Deep Reinforcement Learning", AAAI 2020,
        arXiv 1912.09729 (dual clip).
        Yu et al., "DAPO: An Open-Source LLM Reinforcement Learning System at Scale", 2025, arXiv 2503.14476.
        Zheng et al., "Group Sequence Policy Optimization", 2025, arXiv 2507.18071.
    """
    where = "ppo_policy_loss"
    low, high = _clip_bounds(where, epsilon, epsilon_high)
    if dual_clip is not None:
        dual_clip = _checks.in_range(where, "dual_clip", dual_clip, low=1.0, low_open=True)
    ratio = jnp.exp(
        log_ratio(
            logp, old_logp, mask, importance_sampling_level=importance_sampling_level, log_ratio_clamp=log_ratio_clamp
        )
    )
    advantages = _token_advantages(where, advantages, ratio.shape)
    losses = jnp.maximum(-advantages * ratio, -advantages * jnp.clip(ratio, low, high))
    if dual_clip is not None:
        losses = jnp.where(advantages < 0, jnp.minimum(losses, -dual_clip * advantages), losses)
    return losses


def loss_terms(token_losses: jax.Array, mask: jax.Array, loss_agg_mode: str = "token-mean") -> LossTerms:
    """(sums, counts) of token losses f32[..., B, T] for one aggregation mode; micro-batch terms add exactly.

    * ``token-mean``: (sum of m l, number of response tokens).
    * ``seq-mean-token-mean``: (sum over rows of the row's token mean, number of non-empty rows).
    * ``seq-mean-token-sum``: (sum over rows of the row's token sum, number of non-empty rows).
    * ``seq-mean-token-sum-norm``: (sum over rows of the row's token sum, number of non-empty rows); the
      loss divides the sums by ``loss_scale_factor`` instead of the counts (see ``aggregate``).

    Args:
        token_losses: f32[B, T] or f32[n, B, T].
        mask: f32[B, T] response mask, or f32[n, B, T] per objective (then the counts are f32[n]).
        loss_agg_mode: one of ``LOSS_AGG_MODES``.

    Returns:
        ``LossTerms(sums f32[...], counts)`` with counts f32[] for a f32[B, T] mask.

    References:
        Sheng et al., "HybridFlow: A Flexible and Efficient RLHF Framework" (verl), EuroSys 2025,
        arXiv 2409.19256 (``loss_agg_mode``).
    """
    _checks.choice("loss_terms", "loss_agg_mode", loss_agg_mode, LOSS_AGG_MODES)
    mask = jnp.asarray(mask, jnp.float32)
    token_losses = jnp.asarray(token_losses, jnp.float32)
    if loss_agg_mode == "token-mean":
        return LossTerms(jnp.sum(token_losses * mask, axis=(-2, -1)), jnp.sum(mask, axis=(-2, -1)))
    rows = jnp.sum((jnp.sum(mask, axis=-1) > 0).astype(jnp.float32), axis=-1)
    if loss_agg_mode == "seq-mean-token-mean":
        return LossTerms(jnp.sum(_masked_row_mean(token_losses, mask), axis=-1), rows)
    return LossTerms(jnp.sum(token_losses * mask, axis=(-2, -1)), rows)


def aggregate(terms: LossTerms, loss_agg_mode: str = "token-mean", loss_scale_factor: float | None = None) -> jax.Array:
    """The loss from (possibly accumulated) terms: sums / counts, or sums / loss_scale_factor for the "-norm" mode.

    Args:
        terms: ``LossTerms`` from ``loss_terms`` (or ``ppo_policy_terms``) with the same ``loss_agg_mode``,
            summed over micro-batches.
        loss_agg_mode: one of ``LOSS_AGG_MODES``.
        loss_scale_factor: the constant divisor of ``seq-mean-token-sum-norm`` (verl's default is the padded
            response length T, which ``ppo_policy_loss`` passes when it is None); unused by the other modes.

    Returns:
        f32[...] loss (f32[n] for per-objective terms); 0 when nothing was counted.

    References:
        Sheng et al., "HybridFlow: A Flexible and Efficient RLHF Framework" (verl), EuroSys 2025,
        arXiv 2409.19256.
    """
    where = "aggregate"
    _checks.choice(where, "loss_agg_mode", loss_agg_mode, LOSS_AGG_MODES)
    if loss_agg_mode != "seq-mean-token-sum-norm":
        return safe_divide(terms.sums, terms.counts)
    if loss_scale_factor is None:
        raise ValueError(
            _checks.message(where, "loss_scale_factor", "is None", "the divisor of 'seq-mean-token-sum-norm' (e.g. T)")
        )
    return terms.sums / _checks.positive(where, "loss_scale_factor", loss_scale_factor)


def ppo_policy_terms(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    loss_agg_mode: str = "token-mean",
    dual_clip: float | None = None,
    importance_sampling_level: str = "token",
    log_ratio_clamp: float = 20.0,
) -> LossTerms:
    """``LossTerms`` of the per-objective PPO-clip loss: ``loss_terms(ppo_token_losses(...), mask, loss_agg_mode)``.

    Args and References: see ``ppo_policy_loss``.

    Returns:
        ``LossTerms(sums f32[n], counts f32[])``; add the terms of micro-batches, then ``aggregate``.
    """
    losses = ppo_token_losses(
        logp,
        old_logp,
        advantages,
        mask,
        epsilon=epsilon,
        epsilon_high=epsilon_high,
        dual_clip=dual_clip,
        importance_sampling_level=importance_sampling_level,
        log_ratio_clamp=log_ratio_clamp,
    )
    return loss_terms(losses, mask, loss_agg_mode)


def ppo_policy_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    loss_agg_mode: str = "token-mean",
    loss_scale_factor: float | None = None,
    dual_clip: float | None = None,
    importance_sampling_level: str = "token",
    log_ratio_clamp: float = 20.0,
) -> jax.Array:
    """Per-objective PPO-clip policy losses f32[n], one per advantage column.

    Token loss L = max(-A rho, -A clip(rho, 1 - epsilon, 1 + epsilon_high)) with rho = exp(log-ratio
    clamped to +-log_ratio_clamp); with ``dual_clip`` = c, L = min(L, -c A) where A < 0. Under
    ``importance_sampling_level="sequence"`` (GSPO) rho is the sequence's geometric-mean ratio.
    Aggregation ``loss_agg_mode``:

    * ``token-mean``: sum over all response tokens / their count;
    * ``seq-mean-token-mean``: mean over the non-empty rows of each row's token mean;
    * ``seq-mean-token-sum``: mean over the non-empty rows of each row's token sum;
    * ``seq-mean-token-sum-norm``: sum over rows of each row's token sum / ``loss_scale_factor``
      (default T, the padded response length, as verl; Dr. GRPO's constant normaliser).

    Args:
        logp: f32[B, T] log-probabilities of the policy being trained.
        old_logp: f32[B, T] log-probabilities of the sampling policy.
        advantages: f32[n, B, T], or f32[n, B] broadcast over the tokens.
        mask: f32[B, T] response mask.
        epsilon: lower clip range in [0, 1].
        epsilon_high: upper clip range (None: ``epsilon``; DAPO uses 0.28).
        loss_agg_mode: one of ``LOSS_AGG_MODES``.
        loss_scale_factor: divisor of ``seq-mean-token-sum-norm`` (None: T).
        dual_clip: c > 1 for the dual clip of negative advantages; None disables it.
        importance_sampling_level: "token" (PPO) or "sequence" (GSPO).
        log_ratio_clamp: bound on |log rho| before ``exp`` (verl: 20).

    Returns:
        f32[n] losses.

    References:
        Schulman et al., "Proximal Policy Optimization Algorithms", 2017, arXiv 1707.06347.
        Ye et al., "Mastering Complex Control in MOBA Games with Deep Reinforcement Learning", AAAI 2020,
        arXiv 1912.09729.
        Zheng et al., "Group Sequence Policy Optimization", 2025, arXiv 2507.18071.
        Liu et al., "Understanding R1-Zero-Like Training: A Critical Perspective", 2025, arXiv 2503.20783.

    Example:
        >>> import jax.numpy as jnp
        >>> logp = jnp.log(jnp.array([[1.5, 0.5]]))
        >>> advantages = jnp.array([[1.0], [-1.0]])
        >>> [round(float(loss), 4) for loss in ppo_policy_loss(logp, jnp.zeros((1, 2)), advantages, jnp.ones((1, 2)))]
        [-0.85, 1.15]
    """
    terms = ppo_policy_terms(
        logp,
        old_logp,
        advantages,
        mask,
        epsilon=epsilon,
        epsilon_high=epsilon_high,
        loss_agg_mode=loss_agg_mode,
        dual_clip=dual_clip,
        importance_sampling_level=importance_sampling_level,
        log_ratio_clamp=log_ratio_clamp,
    )
    scale = jnp.shape(logp)[-1] if loss_scale_factor is None else loss_scale_factor
    return aggregate(terms, loss_agg_mode, scale)


def kl_estimate(logp: jax.Array, ref_logp: jax.Array, kind: str = "k3", *, clamp: float | None = None) -> jax.Array:
    """Per-token estimate f32[B, T] of KL(pi || pi_ref) from samples of pi, x = logp - ref_logp.

    ``k1`` = x, ``k2`` = x^2 / 2, ``k3`` = exp(-x) + x - 1 (unbiased and >= 0); aliases ``kl`` (k1),
    ``mse`` (k2), ``low_var_kl`` (k3). For k3 the exponent -x is clamped to +-20 (as verl) so that fp32
    never overflows; ``clamp`` bounds the result to [-clamp, clamp] (verl uses 10 for k3).

    Args:
        logp: f32[B, T] log-probabilities of the policy.
        ref_logp: f32[B, T] log-probabilities of the reference policy.
        kind: one of ``KL_ESTIMATORS``.
        clamp: optional bound on the result.

    Returns:
        f32[B, T] per-token estimate (not masked).

    References:
        Schulman, "Approximating KL Divergence", 2020, http://joschu.net/blog/kl-approx.html.

    Example:
        >>> import jax.numpy as jnp
        >>> round(float(kl_estimate(jnp.log(jnp.array([[2.0]])), jnp.zeros((1, 1)), "k3")[0, 0]), 4)
        0.1931
    """
    where = "kl_estimate"
    estimator = KL_ESTIMATORS[_checks.choice(where, "kind", kind, KL_ESTIMATORS)]
    bound = None if clamp is None else _checks.positive(where, "clamp", clamp)
    logp = jnp.asarray(logp, jnp.float32)
    x = logp - _shape(where, "ref_logp", ref_logp, logp.shape, f"{logp.shape} like `logp`")
    if estimator == "k1":
        estimate = x
    elif estimator == "k2":
        estimate = 0.5 * x**2
    else:
        x = jnp.clip(x, -_K3_EXPONENT_BOUND, _K3_EXPONENT_BOUND)
        estimate = jnp.exp(-x) + x - 1.0
    return estimate if bound is None else jnp.clip(estimate, -bound, bound)


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log softmax(logits)[target] f32[B, T] as the target's logit minus logsumexp, in fp32.

    The target logit is taken by a one-hot contraction rather than ``take_along_axis``, whose backward
    is a scatter that XLA:CPU runs slowly.

    Args:
        logits: [B, T, V] finite logits (any float dtype; computed in fp32). Mask vocabulary entries with a
            large negative number rather than -inf: the one-hot contraction multiplies them by 0.
        targets: i32[B, T] token ids.

    Returns:
        f32[B, T] log-probabilities of the targets.

    Example:
        >>> import jax.numpy as jnp
        >>> round(float(token_logprobs(jnp.zeros((1, 1, 4)), jnp.array([[2]]))[0, 0]), 4)
        -1.3863
    """
    logits = jnp.asarray(logits, jnp.float32)
    targets = jnp.asarray(targets)
    if logits.ndim != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(
            _checks.message(
                "token_logprobs",
                "targets",
                f"has shape {targets.shape} for logits {logits.shape}",
                "(B, T) = logits.shape[:2]",
            )
        )
    one_hot = jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32)
    return jnp.einsum("btv,btv->bt", logits, one_hot) - jax.nn.logsumexp(logits, axis=-1)


def _block_cotangents(hidden, head, logits, logsumexp, mean_logit, one_hot, logp_cotangent, entropy_cotangent):
    """(hidden part f32[B, T, D], head cotangent f32[D, V']) of one block of vocabulary columns.

    The logit cotangent is g (e_y - p) - g_H p (z - E_p[z]) for the cotangents g of the log-probs and g_H of the
    entropies. With g_H a symbolic zero, the hidden part is the g-free u = (e_y - p) W^T of the block (the caller
    scales the sum over blocks by g) and the head cotangent is (g h)^T (e_y - p); else the hidden part is the hidden
    states' cotangent itself.
    """
    probs = jnp.exp(logits - logsumexp[..., None])
    target_minus_mean = one_hot - probs
    weights = head.astype(hidden.dtype)
    if isinstance(entropy_cotangent, SymbolicZero):
        contracted = target_minus_mean.astype(hidden.dtype)
        scaled_hidden = (hidden * logp_cotangent[..., None]).astype(hidden.dtype)
    else:
        contracted = logp_cotangent[..., None] * target_minus_mean
        contracted -= entropy_cotangent[..., None] * probs * (logits - mean_logit[..., None])
        contracted, scaled_hidden = contracted.astype(hidden.dtype), hidden
    rows = token_rows(contracted)
    hidden_part = jnp.einsum("nv,dv->nd", rows, weights, preferred_element_type=jnp.float32)
    head_cotangent = rows_contraction(token_rows(scaled_hidden), rows, preferred_element_type=jnp.float32)
    return hidden_part.reshape(hidden.shape), head_cotangent


def _dense(cotangent: Any, like: jax.Array) -> jax.Array:
    """An array for a cotangent that may be a symbolic zero (zeros shaped like ``like``)."""
    return jnp.zeros(like.shape, like.dtype) if isinstance(cotangent, SymbolicZero) else cotangent


def _hidden_cotangent(hidden_part, logp_cotangent, entropy_cotangent, hidden) -> jax.Array:
    """The hidden states' cotangent from the summed hidden parts of :func:`_block_cotangents`."""
    if isinstance(entropy_cotangent, SymbolicZero):
        hidden_part = logp_cotangent[..., None] * hidden_part
    return hidden_part.astype(hidden.dtype)


def _full_vocabulary_outputs(hidden, head, targets):
    """(log-probs, entropies) and the logits, logsumexp and E_p[z] of softmax(hidden @ head).

    The targets' logits are gathered, not contracted with a one-hot: the contraction writes a [B, T, V] product
    before reducing it (a pass over the logits more), and the gather's scatter backward never runs, since the
    custom backward pass builds e_y - p itself.
    """
    logits = token_matmul(hidden, head)
    logsumexp = jax.nn.logsumexp(logits, axis=-1)
    mean_logit = jnp.sum(jnp.exp(logits - logsumexp[..., None]) * logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return (target_logit - logsumexp, logsumexp - mean_logit), (logits, logsumexp, mean_logit)


@jax.custom_vjp
def head_logprobs_and_entropy(hidden: jax.Array, head: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(log-probs, entropies) f32[B, T] of softmax(hidden @ head), with a backward pass shared by many pullbacks.

    With z = h W, p = softmax(z) and the target y, log p_y = z_y - logsumexp(z) has the logit cotangent
    g (e_y - p) for a log-prob cotangent g, so its hidden-state cotangent is g u with

        u = W (e_y - p) = W_y - E_p[W]        (one [B T, V] x [V, D] product, whatever g is).

    When the entropies are not differentiated (their cotangent is a symbolic zero: no entropy bonus), the backward
    pass computes u from the forward's residuals alone and scales it by g. The n pullbacks of the per-objective
    losses (vmapped over n cotangents, as probe and full mode run them) therefore share one LM head product for the
    hidden states instead of running n of them; the head's own gradient (g h)^T (e_y - p) stays per cotangent (XLA
    prunes it when nothing reads it, as for a frozen head). With an entropy cotangent g_H the logit cotangent gains
    -g_H p (z - E_p[z]) and the hidden-state cotangent is that sum times W, as plain autodiff computes it.

    Args:
        hidden: [B, T, D] final hidden states (compute dtype; the head is cast to it, logits accumulate in fp32).
        head: [D, V] the LM head (the transposed embedding for tied weights).
        targets: i32[B, T] token ids.

    Returns:
        f32[B, T] target log-probabilities and f32[B, T] entropies, equal to ``token_logprobs`` and
        ``token_entropy`` of the logits hidden @ head.
    """
    return _full_vocabulary_outputs(hidden, head, targets)[0]


def _head_forward(hidden, head, targets):
    outputs, statistics = _full_vocabulary_outputs(hidden.value, head.value, targets.value)
    return outputs, (hidden.value, head.value, targets.value, *statistics)


def _head_backward(residuals, cotangents):
    hidden, head, targets, logits, logsumexp, mean_logit = residuals
    logp_cotangent, entropy_cotangent = _dense(cotangents[0], logsumexp), cotangents[1]
    one_hot = jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32)
    hidden_part, head_cotangent = _block_cotangents(
        hidden, head, logits, logsumexp, mean_logit, one_hot, logp_cotangent, entropy_cotangent
    )
    hidden_cotangent = _hidden_cotangent(hidden_part, logp_cotangent, entropy_cotangent, hidden)
    return hidden_cotangent, head_cotangent.astype(head.dtype), None


head_logprobs_and_entropy.defvjp(_head_forward, _head_backward, symbolic_zeros=True)


def head_token_kernel(hidden: jax.Array, head: jax.Array, targets: jax.Array) -> jax.Array:
    """K f32[N, N] over the N = B T tokens with c_i^T K c_j = <g_i, g_j>, the head gradients' Gram (data, not
    differentiated).

    For log-prob cotangents c_i f32[N] (objective i's dL_i / d log p_y per token), the head's gradient through
    :func:`head_logprobs_and_entropy` is g_i = H^T diag(c_i) E with H [N, D] the hidden states and E = e_y - p [N, V],
    so <g_i, g_j> = sum_{t,s} c_{i,t} c_{j,s} (h_t . h_s)(e_t . e_s) = c_i^T K c_j with

        K = (H H^T) o (E E^T)        (o: the elementwise product; both factors PSD, so K is).

    That costs N^2 (D + V) multiply-adds, once, where the n gradients cost n N D V and their Gram n^2 D V / 2: fewer
    when N (D + V) < n D V, as in probe and full mode over short rollouts with an untied head (N < n D roughly).
    The logits are those of the forward pass (the same product, which XLA computes once).

    Args:
        hidden: [B, T, D] final hidden states (as the head op takes them).
        head: [D, V] the LM head.
        targets: i32[B, T] token ids.

    Returns:
        f32[B T, B T] the kernel K.
    """
    residual, rows = _head_residual_and_rows(hidden, head, targets)
    return _token_kernel(residual, rows)


def _head_residual_and_rows(hidden: jax.Array, head: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(E = e_y - p f32[N, V], H f32[N, D]) over the N = B T tokens, as data (not differentiated): the log-probs'
    derivative in the logits and the hidden states' rows."""
    hidden, head = jax.lax.stop_gradient(hidden), jax.lax.stop_gradient(head)
    logits = token_matmul(hidden, head)
    probs = jnp.exp(logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True))
    one_hot = jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32)
    return token_rows(one_hot - probs), token_rows(hidden).astype(jnp.float32)


def _token_kernel(residual: jax.Array, rows: jax.Array) -> jax.Array:
    """K = (H H^T) o (E E^T) f32[N, N] (:func:`head_token_kernel`)."""
    hidden_gram = jnp.einsum("nd,md->nm", rows, rows, preferred_element_type=jnp.float32)
    return hidden_gram * jnp.einsum("nv,mv->nm", residual, residual, preferred_element_type=jnp.float32)


def kernel_gram(kernel: jax.Array, logp_cotangents: jax.Array) -> jax.Array:
    """C K C^T f32[n, n]: the Gram of the head's n gradients from its token kernel K f32[N, N]
    (:func:`head_token_kernel`) and the objectives' log-prob cotangents C f32[n, N]."""
    highest = jax.lax.Precision.HIGHEST
    c = logp_cotangents.astype(jnp.float32)
    return jnp.matmul(jnp.matmul(c, kernel, precision=highest), c.T, precision=highest)


class TiedHeadKernel(NamedTuple):
    """What the Gram of a tied head's gradients needs from the forward pass (:func:`tied_head_token_kernel`), as
    data: with the log-prob cotangents and the cotangents of the layers' input, :func:`tied_head_gram` gives it."""

    kernel: jax.Array
    """f32[N, N]: the head part's token kernel K (:func:`head_token_kernel`)."""
    input_residual: jax.Array
    """f32[N, M]: E's columns at the M input tokens' ids, E = e_y - p the log-probs' derivative in the logits."""
    hidden_rows: jax.Array
    """f32[N, D]: the final hidden states H."""
    input_ids: jax.Array
    """i32[M]: the ids whose embedding rows were the layers' input (prompt and response, every position)."""


def tied_head_token_kernel(
    hidden: jax.Array, head: jax.Array, targets: jax.Array, input_ids: jax.Array
) -> TiedHeadKernel:
    """:func:`head_token_kernel` for a head tied to the input embedding: K and what the input part of the gradient
    needs (:class:`TiedHeadKernel`).

    Args:
        hidden: [B, T, D] final hidden states (as the head op takes them).
        head: [D, V] the LM head, the embedding table transposed.
        targets: i32[B, T] token ids.
        input_ids: i32[B, L] the ids looked up in the embedding table for the layers' input.

    Returns:
        The kernel's parts, as data (not differentiated).
    """
    residual, rows = _head_residual_and_rows(hidden, head, targets)
    ids = input_ids.reshape(-1)
    return TiedHeadKernel(_token_kernel(residual, rows), jnp.take(residual, ids, axis=1), rows, ids)


def tied_head_gram(parts: TiedHeadKernel, logp_cotangents: jax.Array, input_cotangents: jax.Array) -> jax.Array:
    """The Gram f32[n, n] of the n gradients of an embedding table tied to the LM head, from the token kernel's
    parts, without forming them.

    Objective i's gradient is the head part A_i = E^T diag(c_i) H (the transpose of :func:`head_token_kernel`'s g_i,
    in the table's [V, D] layout) plus the input part S_i, the scatter of the layers' input cotangents X_i [M, D] onto
    the rows of their ids: S_i[v] = sum_{p: id_p = v} X_i[p]. So, with R = E's columns at the input ids,

        <A_i, A_j> = c_i^T K c_j,
        <A_i, S_j> = sum_p <A_i[id_p], X_j[p]> = sum_{t,p} c_{i,t} R[t, p] (h_t . X_j[p]) = c_i . P_j,
                     P_j[t] = sum_p R[t, p] (H X_j^T)[t, p],
        <S_i, S_j> = sum_{p,q: id_p = id_q} X_i[p] . X_j[q],

    and G = C K C^T + C P^T + P C^T + S. Every term is over the N output and M input tokens: M D (N + M)
    multiply-adds per objective (S from S_j's rows at the ids, [id_p = id_q] X_j), against the n gradients' n N D V.

    Args:
        parts: :func:`tied_head_token_kernel`'s.
        logp_cotangents: f32[n, N] each objective's dL_i / d log p_y per token.
        input_cotangents: [n, M, D] each objective's cotangent of the layers' input (the looked-up rows).

    Returns:
        f32[n, n] the Gram of the n gradients of the tied table.
    """
    highest = jax.lax.Precision.HIGHEST
    c = logp_cotangents.astype(jnp.float32)
    x = input_cotangents.astype(jnp.float32)
    head = kernel_gram(parts.kernel, c)
    hidden_dot_inputs = jnp.einsum("td,jpd->jtp", parts.hidden_rows, x, precision=highest)
    cross = jnp.matmul(c, jnp.sum(parts.input_residual[None] * hidden_dot_inputs, axis=2).T, precision=highest)
    same_id = (parts.input_ids[:, None] == parts.input_ids[None, :]).astype(jnp.float32)
    rows_of_same_id = jnp.einsum("pq,jqd->jpd", same_id, x, precision=highest)  # S_j[id_p] for every p
    inputs = jnp.einsum("ipd,jpd->ij", x, rows_of_same_id, precision=highest)
    return head + cross + cross.T + inputs


def scatter_onto_rows(input_ids: jax.Array, cotangents: jax.Array, table: jax.Array) -> jax.Array:
    """The gradient of an embedding lookup: ``cotangents`` [M, D] added onto the rows of a zero table shaped and
    typed like ``table`` [V, D] at ``input_ids`` i32[M] (the input part S of :func:`tied_head_gram`)."""
    return jnp.zeros_like(table).at[input_ids].add(cotangents.astype(table.dtype))


def _vocabulary_chunks(head: jax.Array, chunk_size: int) -> tuple[jax.Array, jax.Array]:
    """The head [D, V] as chunks [V / chunk_size, D, chunk_size] and each chunk's first column i32[V / chunk_size]."""
    vocab = head.shape[1]
    chunks = head.reshape(head.shape[0], vocab // chunk_size, chunk_size).transpose(1, 0, 2)
    return chunks, jnp.arange(0, vocab, chunk_size)


def _chunk_one_hot(targets: jax.Array, start: jax.Array, chunk_size: int) -> jax.Array:
    """One-hot f32[B, T, chunk_size] of the targets that fall in the chunk starting at ``start``."""
    return jax.nn.one_hot(targets - start, chunk_size, dtype=jnp.float32)


def _chunked_statistics(hidden, head, targets, chunk_size):
    """(log-probs, entropies), (logsumexp, E_p[z]) f32[B, T] by an online softmax over vocabulary chunks."""
    chunks, starts = _vocabulary_chunks(head, chunk_size)

    def step(carry, chunk):
        peak, total, weighted, target_logit = carry
        weights, start = chunk
        logits = token_matmul(hidden, weights)
        new_peak = jnp.maximum(peak, jnp.max(logits, axis=-1))
        rescale = jnp.exp(peak - new_peak)
        exps = jnp.exp(logits - new_peak[..., None])
        return (
            new_peak,
            total * rescale + jnp.sum(exps, axis=-1),
            weighted * rescale + jnp.sum(exps * logits, axis=-1),
            target_logit + jnp.sum(_chunk_one_hot(targets, start, chunk_size) * logits, axis=-1),
        ), None

    shape = targets.shape
    start = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape), jnp.zeros(shape), jnp.zeros(shape))
    (peak, total, weighted, target_logit), _ = jax.lax.scan(step, start, (chunks, starts))
    logsumexp, mean_logit = peak + jnp.log(total), weighted / total
    return (target_logit - logsumexp, logsumexp - mean_logit), (logsumexp, mean_logit)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunked(hidden, head, targets, chunk_size):
    return _chunked_statistics(hidden, head, targets, chunk_size)[0]


def _chunked_forward(hidden, head, targets, chunk_size):
    outputs, statistics = _chunked_statistics(hidden.value, head.value, targets.value, chunk_size)
    return outputs, (hidden.value, head.value, targets.value, *statistics)


def _chunked_backward(chunk_size, residuals, cotangents):
    hidden, head, targets, logsumexp, mean_logit = residuals
    logp_cotangent, entropy_cotangent = _dense(cotangents[0], logsumexp), cotangents[1]
    chunks, starts = _vocabulary_chunks(head, chunk_size)

    def step(hidden_part, chunk):
        weights, start = chunk
        part, head_cotangent = _block_cotangents(
            hidden,
            weights,
            token_matmul(hidden, weights),
            logsumexp,
            mean_logit,
            _chunk_one_hot(targets, start, chunk_size),
            logp_cotangent,
            entropy_cotangent,
        )
        return hidden_part + part, head_cotangent

    hidden_part, head_chunks = jax.lax.scan(step, jnp.zeros(hidden.shape, jnp.float32), (chunks, starts))
    head_cotangent = head_chunks.transpose(1, 0, 2).reshape(head.shape).astype(head.dtype)
    return _hidden_cotangent(hidden_part, logp_cotangent, entropy_cotangent, hidden), head_cotangent, None


_chunked.defvjp(_chunked_forward, _chunked_backward, symbolic_zeros=True)


def chunked_logprobs_and_entropy(
    hidden: jax.Array, head: jax.Array, targets: jax.Array, chunk_size: int
) -> tuple[jax.Array, jax.Array]:
    """(log-probs, entropies) f32[B, T] of softmax(hidden @ head) without materialising the [B, T, V] logits.

    A ``lax.scan`` over vocabulary chunks of ``chunk_size`` keeps a running maximum m, s = sum exp(z - m),
    r = sum exp(z - m) z and the target's logit; then logsumexp = m + log s and the entropy is logsumexp - r / s.
    The backward pass recomputes each chunk's logits in a second scan, so the peak is [B, T, chunk]; it is the
    backward of :func:`head_logprobs_and_entropy` chunk by chunk, so vmapped pullbacks without an entropy cotangent
    share the head product for the hidden states in the same way.

    Args:
        hidden: [B, T, D] final hidden states (any float dtype; logits accumulate in fp32).
        head: [D, V] the LM head (the transposed embedding for tied weights).
        targets: i32[B, T] token ids.
        chunk_size: vocabulary columns per chunk; it must divide V.

    Returns:
        f32[B, T] target log-probabilities and f32[B, T] entropies, equal to ``token_logprobs`` and
        ``token_entropy`` of the full logits up to fp32 round-off.
    """
    where = "chunked_logprobs_and_entropy"
    vocab = head.shape[1]
    chunk_size = _checks.integer(where, "chunk_size", chunk_size, minimum=1)
    if vocab % chunk_size:
        raise ValueError(
            _checks.message(where, "chunk_size", f"is {chunk_size}", f"a divisor of the vocabulary size {vocab}")
        )
    return _chunked(hidden, head, targets, chunk_size)


def token_entropy(logits: jax.Array) -> jax.Array:
    """Entropy f32[B, T] of softmax(logits) per token: logsumexp(z) - sum_v p_v z_v, in fp32.

    Args:
        logits: [B, T, V] finite logits.

    Returns:
        f32[B, T] entropies in nats.
    """
    logits = jnp.asarray(logits, jnp.float32)
    return jax.nn.logsumexp(logits, axis=-1) - jnp.sum(jax.nn.softmax(logits, axis=-1) * logits, axis=-1)


def value_loss_terms(
    values: jax.Array, old_values: jax.Array, returns: jax.Array, mask: jax.Array, *, clip: float = 0.2
) -> LossTerms:
    """``LossTerms`` (token-mean) of the clipped value loss; ``value_loss`` is ``aggregate`` of them.

    Args and References: see ``value_loss``.

    Returns:
        ``LossTerms(sums f32[n], counts f32[] or f32[n])``.
    """
    where = "value_loss"
    clip = _checks.nonnegative(where, "clip", clip)
    values = _shape(where, "values", values, (None, None, None), "(n, B, T) values of the vector critic")
    old_values = _shape(where, "old_values", old_values, values.shape, f"{values.shape} like `values`")
    returns = _shape(where, "returns", returns, values.shape, f"{values.shape} like `values`")
    mask = jnp.asarray(mask, jnp.float32)
    if mask.shape not in (values.shape, values.shape[1:]):
        raise ValueError(
            _checks.message(where, "mask", f"has shape {mask.shape}", f"{values.shape[1:]} or {values.shape}")
        )
    clipped = jnp.clip(values, old_values - clip, old_values + clip)
    losses = 0.5 * jnp.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return loss_terms(losses, mask, "token-mean")


def value_loss(
    values: jax.Array, old_values: jax.Array, returns: jax.Array, mask: jax.Array, *, clip: float = 0.2
) -> jax.Array:
    """Clipped value loss f32[n] of the vector critic: 0.5 token-mean of max((V - R)^2, (clip(V, V_old +- c) - R)^2).

    Args:
        values: f32[n, B, T] values of the critic being trained.
        old_values: f32[n, B, T] values at rollout time.
        returns: f32[n, B, T] targets (e.g. from ``gae``).
        mask: f32[B, T] response mask, or f32[n, B, T] per objective so that a head is not trained on
            samples whose reward does not apply (NaN score).
        clip: c >= 0, the value clip range (TRL and Tunix 0.2; verl 0.5).

    Returns:
        f32[n] losses, one per value head.

    References:
        Schulman et al., "Proximal Policy Optimization Algorithms", 2017, arXiv 1707.06347.
    """
    return aggregate(value_loss_terms(values, old_values, returns, mask, clip=clip), "token-mean")


def clip_fraction(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    epsilon: float,
    epsilon_high: float | None = None,
) -> jax.Array:
    """Fraction f32[] of response tokens (over all objectives) where the clipped branch of PPO is active.

    The clipped branch is active where -A clip(rho) > -A rho, i.e. where the token has no gradient.

    Args:
        logp: f32[B, T] log-probabilities of the policy being trained.
        old_logp: f32[B, T] log-probabilities of the sampling policy.
        advantages: f32[n, B, T], or f32[n, B].
        mask: f32[B, T] response mask.
        epsilon: lower clip range.
        epsilon_high: upper clip range (None: ``epsilon``).

    Returns:
        f32[] in [0, 1]; 0 without response tokens.
    """
    where = "clip_fraction"
    low, high = _clip_bounds(where, epsilon, epsilon_high)
    mask = jnp.asarray(mask, jnp.float32)
    ratio = jnp.exp(log_ratio(logp, old_logp, mask))
    advantages = _token_advantages(where, advantages, ratio.shape)
    clipped = (-advantages * jnp.clip(ratio, low, high) > -advantages * ratio).astype(jnp.float32)
    return jnp.mean(masked_mean(clipped, mask))
