"""Gradient entanglement while training on preference pairs, and its two mitigations (arXiv 2410.13828).

A margin loss moves log pi(y_w) and log pi(y_l) through the per-pair gradients g_w, g_l only
(``mojax.diagnostics.entanglement`` has the first-order algebra). ``pair_entanglement`` measures them
during training: a forward pass of each pair (vmapped over the B pairs) and its two pullbacks give
grad log pi of every response on the probe parameters (LM head, last block or LoRA adapters for a large
model): 2B backward passes of one pair each, O(2B x probe size) memory. ``response_entanglement`` does the same
from a log-probability function of one response: a forward pass and one pullback per response, half the backward
work. Mitigations, as losses that autodiff turns into the update:

* NPO, the pairwise-normalised update c (g_w/|g_w| - g_l/|g_l|), c = |f'(m)|. Any margin loss gets it
  by feeding it log-probabilities whose value is unchanged and whose gradient is divided by the
  stop-gradient per-pair norm (``npo_preference_loss``): the chain rule then yields f'(m) times the
  normalised difference, for whichever f.
* Sparse token masks: a deterministic one on the shared prefix (``shared_prefix_mask``) or a learned
  one, mu = sigmoid(per-token logits) multiplying the token log-probabilities, with an L1 penalty
  l1 * mean(mu) keeping it sparse (``learned_token_mask``, ``token_mask_penalty``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mojax import _checks
from mojax._numerics import safe_divide
from mojax.combiners.grads import per_objective_grads
from mojax.diagnostics.entanglement import EntanglementStatistics, entanglement_statistics
from mojax.rl.preference import PREFERENCE_LOSSES, preference_loss


class PairEntanglement(NamedTuple):
    """Per-pair gradient geometry on the probe set and the first-order predictions, f32[B] each.

    ``statistics``: inner product, both norms, cosine, condition ratio and predicted moves.
    ``predicted_chosen`` / ``predicted_rejected``: sign (-1, 0, 1) of the move of log pi(y_w), log pi(y_l)
    after a small gradient step on a margin loss. ``chosen_logps`` / ``rejected_logps``: the forward pass.
    """

    statistics: EntanglementStatistics
    predicted_chosen: jax.Array
    predicted_rejected: jax.Array
    chosen_logps: jax.Array
    rejected_logps: jax.Array


def pair_entanglement(
    logp_fn: Callable[[Any, Any], tuple[jax.Array, jax.Array]],
    params: Any,
    batch: Any,
    *,
    probe_mask: Any,
    coeff_chosen: jax.Array | float = 1.0,
    coeff_rejected: jax.Array | float = 1.0,
    sequential: bool = False,
) -> PairEntanglement:
    """Per-pair <g_w, g_l>, norms, cosine, condition and predicted moves on the probe parameters.

    Each pair's two gradients come from its own forward pass and two pullbacks (``per_objective_grads`` of the pair's
    log-probabilities), vmapped over the pairs: 2B backward passes of one pair's two sequences each. Pulling the 2B
    unit cotangents back through one forward pass of the whole batch would run 2B backward passes of all 2B
    sequences: B times the work for the same gradients, since a cotangent on one response reaches no other's rows.
    When each response's log-probability can be computed alone, :func:`response_entanglement` does half the backward
    work: each pair's two pullbacks here still run through both of its sequences.

    Args:
      logp_fn: ``(params, batch) -> (chosen_logps f32[B], rejected_logps f32[B])``, the sequence
        log-probabilities the loss sees (length-averaged ones for SimPO); called here on one pair at a time (a
        batch of 1, vmapped), so a pair's log-probabilities must not depend on the other pairs of the batch.
      params: the parameter pytree.
      batch: whatever ``logp_fn`` reads, every leaf with the B pairs on its leading axis.
      probe_mask: an optax-style mask marking the probe parameters (a pytree of bools shaped like ``params`` or a
        prefix of it, or a callable params -> such a tree); gradients are taken on those only
        (:func:`mojax.combiners.per_objective_grads`, whose row i is grad log pi of response i).
      coeff_chosen, coeff_rejected: the margin coefficients a_w, a_l (scalars or f32[B]): 1 for DPO,
        IPO and SimPO on the log-probabilities they see; a_w > a_l for a loss with an SFT term.
      sequential: pull back each pair's two unit cotangents one after the other (``lax.map``) instead of vmapped,
        as ``per_objective_grads`` does.

    Returns:
      ``PairEntanglement``; its norms feed ``npo_preference_loss``.

    On XLA:CPU, jit a caller of the vmapped pullbacks with ``compiler_options=mojax.xla_cpu.batched_pullback_options()``
    as the DPO trainer does, or pass ``sequential=True``: with jaxlib 0.10's default fusions the per-pair gradients of
    a model of SmolLM2-135M's size can come out wrong (:mod:`mojax.xla_cpu`).

    References:
      Yuan et al., "A Common Pitfall of Margin-based Language Model Alignment: Gradient Entanglement",
      ICLR 2025, arXiv 2410.13828.

    Example:
      >>> import jax.numpy as jnp
      >>> logp_fn = lambda theta, phi: (phi[0] @ theta, phi[1] @ theta)  # log pi(y) = theta . phi(y)
      >>> phi = (jnp.array([[1.0, 1.0]]), jnp.array([[1.0, 0.9]]))  # shared features: entangled
      >>> out = pair_entanglement(logp_fn, jnp.zeros(2), phi, probe_mask=True)
      >>> float(out.predicted_chosen[0]), float(out.predicted_rejected[0])  # a DPO step raises both
      (1.0, 1.0)
    """

    _check_pairs("pair_entanglement", "batch", batch)

    def logps_of(params_: Any, pair: Any) -> jax.Array:
        chosen, rejected = logp_fn(params_, jax.tree.map(lambda leaf: leaf[None], pair))
        return jnp.concatenate([jnp.asarray(chosen, jnp.float32), jnp.asarray(rejected, jnp.float32)])

    def pair_gradients(pair: Any) -> tuple[jax.Array, Any]:
        return per_objective_grads(logps_of, params, pair, probe_mask=probe_mask, sequential=sequential)

    logps, stacked = jax.vmap(pair_gradients)(batch)  # logps [B, 2]; the probe leaves' gradients [B, 2, ...]
    grads = jax.tree.leaves(stacked)  # (MaskedNode off the probe has no leaf)
    chosen_grads, rejected_grads = [grad[:, 0] for grad in grads], [grad[:, 1] for grad in grads]
    return _entanglement_of(chosen_grads, rejected_grads, logps[:, 0], logps[:, 1], coeff_chosen, coeff_rejected)


def response_entanglement(
    response_logp_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    chosen: Any,
    rejected: Any,
    *,
    probe_mask: Any,
    coeff_chosen: jax.Array | float = 1.0,
    coeff_rejected: jax.Array | float = 1.0,
    sequential: bool = False,
) -> PairEntanglement:
    """:func:`pair_entanglement` for log-probabilities computed one response at a time: half its backward passes.

    Each response's gradient grad log pi(y) on the probe parameters comes from its own forward pass and one pullback,
    vmapped over the 2B responses: 2B backward passes of one sequence each, where ``pair_entanglement`` (whose
    ``logp_fn`` sees both responses of a pair at once) runs 2B backward passes of one pair's two sequences. Use it
    whenever log pi(y_w) does not read y_l, as for a causal LM scoring each response after the prompt.

    Args:
      response_logp_fn: ``(params, responses) -> f32[R]``, the sequence log-probability of each of R responses as the
        loss sees it; called here on one response at a time (R = 1, vmapped).
      params: the parameter pytree.
      chosen, rejected: the B chosen and the B rejected responses, whatever ``response_logp_fn`` reads: two pytrees of
        the same structure and leaf shapes, every leaf with the B pairs on its leading axis.
      probe_mask, coeff_chosen, coeff_rejected: as for :func:`pair_entanglement`.
      sequential: pull back one response after the other (``lax.map``, one response's activation gradients at a time)
        instead of vmapped over the 2B responses.

    Returns:
      ``PairEntanglement``, the same statistics as ``pair_entanglement`` of the pair function
      ``(params, (chosen, rejected)) -> (response_logp_fn(params, chosen), response_logp_fn(params, rejected))``.

    On XLA:CPU, jit a caller of the vmapped pullbacks with ``compiler_options=mojax.xla_cpu.batched_pullback_options()``
    as the DPO trainer does, or pass ``sequential=True`` (:mod:`mojax.xla_cpu`).

    References:
      Yuan et al., "A Common Pitfall of Margin-based Language Model Alignment: Gradient Entanglement",
      ICLR 2025, arXiv 2410.13828.

    Example:
      >>> import jax.numpy as jnp
      >>> response_logp_fn = lambda theta, phi: phi @ theta  # log pi(y) = theta . phi(y)
      >>> chosen, rejected = jnp.array([[1.0, 1.0]]), jnp.array([[1.0, 0.9]])  # shared features: entangled
      >>> out = response_entanglement(response_logp_fn, jnp.zeros(2), chosen, rejected, probe_mask=True)
      >>> float(out.predicted_chosen[0]), float(out.predicted_rejected[0])  # a DPO step raises both
      (1.0, 1.0)
    """
    where = "response_entanglement"
    pairs = _check_pairs(where, "chosen", chosen)
    _check_pairs(where, "rejected", rejected)
    shapes = lambda tree: jax.tree.map(jnp.shape, tree)
    if jax.tree.structure(chosen) != jax.tree.structure(rejected) or shapes(chosen) != shapes(rejected):
        raise ValueError(
            _checks.message(
                where,
                "rejected",
                f"has the structure and leaf shapes {shapes(rejected)}",
                f"the chosen responses' {shapes(chosen)}, so that the 2B responses form one batch",
            )
        )

    def logp_of(params_: Any, response: Any) -> jax.Array:
        return jnp.asarray(response_logp_fn(params_, jax.tree.map(lambda leaf: leaf[None], response)), jnp.float32)

    def response_gradient(response: Any) -> tuple[jax.Array, Any]:
        logp, stacked = per_objective_grads(logp_of, params, response, probe_mask=probe_mask)  # one plain pullback
        return logp[0], jax.tree.leaves(stacked)

    responses = jax.tree.map(lambda *sides: jnp.concatenate(sides), chosen, rejected)
    each = jax.lax.map(response_gradient, responses) if sequential else jax.vmap(response_gradient)(responses)
    logps, grads = each  # [2B], the probe leaves' gradients [2B, 1, ...]
    chosen_grads, rejected_grads = [grad[:pairs, 0] for grad in grads], [grad[pairs:, 0] for grad in grads]
    return _entanglement_of(chosen_grads, rejected_grads, logps[:pairs], logps[pairs:], coeff_chosen, coeff_rejected)


def _entanglement_of(
    chosen_grads: list[jax.Array],
    rejected_grads: list[jax.Array],
    chosen_logps: jax.Array,
    rejected_logps: jax.Array,
    coeff_chosen: jax.Array | float,
    coeff_rejected: jax.Array | float,
) -> PairEntanglement:
    """``PairEntanglement`` of the per-pair gradients (the probe leaves, each [B, ...]) and log-probabilities."""
    statistics = entanglement_statistics(chosen_grads, rejected_grads, coeff_chosen, coeff_rejected)
    return PairEntanglement(
        statistics,
        jnp.sign(statistics.delta_chosen),
        jnp.sign(statistics.delta_rejected),
        chosen_logps,
        rejected_logps,
    )


def _check_pairs(where: str, name: str, batch: Any) -> int:
    """The number of pairs B; a clear error unless every leaf of ``batch`` holds B rows on its leading axis."""
    leaves = jax.tree.leaves(batch)
    leading = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in leaves}
    if not leaves or len(leading) != 1 or None in leading:
        shapes = [jnp.shape(leaf) for leaf in leaves]
        raise ValueError(
            _checks.message(
                where, name, f"has leaves of shapes {shapes}", "arrays that all hold the pairs on their leading axis"
            )
        )
    return leading.pop()


def observed_moves_agree(pred_signs: jax.Array, before: jax.Array, after: jax.Array) -> jax.Array:
    """bool[B]: sign(after - before) == the predicted sign, per pair.

    Args:
      pred_signs: f32[B] ``PairEntanglement.predicted_chosen`` (or ``predicted_rejected``).
      before, after: f32[B] the same log-probabilities before and after the step.

    Returns:
      bool[B]; the first-order prediction holds for a small enough step.
    """
    moved = jnp.sign(jnp.asarray(after, jnp.float32) - jnp.asarray(before, jnp.float32))
    return moved == jnp.asarray(pred_signs, jnp.float32)


def normalised_gradient_logps(logps: jax.Array, norms: jax.Array) -> jax.Array:
    """sg(lp) + (lp - sg(lp)) / sg(norm), f32[B]: the same values, each pair's gradient divided by its norm.

    Feeding these to any loss gives NPO's pairwise-normalised update (``npo_preference_loss``; the trainer also
    feeds them to ``modpo_loss``). A zero norm leaves its pair's gradient unscaled.

    Args:
      logps: f32[B] sequence log-probabilities.
      norms: f32[B] the norms of their gradients on the probe set (``pair_entanglement``).

    Returns:
      f32[B] equal to `logps`.

    References:
      Yuan et al., "A Common Pitfall of Margin-based Language Model Alignment: Gradient Entanglement",
      ICLR 2025, arXiv 2410.13828.
    """
    logps = jnp.asarray(logps, jnp.float32)
    norms = jax.lax.stop_gradient(jnp.asarray(norms, jnp.float32))
    scale = jnp.where(norms > 0, norms, 1.0)
    constant = jax.lax.stop_gradient(logps)
    return constant + (logps - constant) / scale


def npo_preference_loss(
    loss_type: str | Sequence[str],
    chosen_logps: jax.Array,
    rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array | None = None,
    ref_rejected_logps: jax.Array | None = None,
    *,
    norm_chosen: jax.Array,
    norm_rejected: jax.Array,
    beta: float = 0.1,
    **options: Any,
) -> jax.Array:
    """Any margin loss with the pairwise-normalised gradient (NPO), f32[B]; same value as ``preference_loss``.

    The log-probabilities enter as sg(lp) + (lp - sg(lp)) / sg(|g|): per pair, the chosen and rejected
    terms are weighted by their stop-gradient inverse norms, so the gradient of l(D) is
    l'(D) (g_w/|g_w| - g_l/|g_l|) and a descent step changes log pi_w by eta c |g_w| (1 - cos) >= 0 and
    log pi_l by -eta c |g_l| (1 - cos) <= 0, c = |l'(D)|. A zero norm leaves its term unscaled.

    Args:
      loss_type: ``margin_based`` loss names of ``PREFERENCE_LOSSES`` (one or a list).
      chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps: as for ``preference_loss``.
      norm_chosen, norm_rejected: f32[B] |g_w|, |g_l| of those log-probabilities on the probe set
        (``pair_entanglement``).
      beta, **options: as for ``preference_loss``.

    Returns:
      f32[B] per-pair loss.

    References:
      Yuan et al., "A Common Pitfall of Margin-based Language Model Alignment: Gradient Entanglement",
      ICLR 2025, arXiv 2410.13828.
    """
    where = "npo_preference_loss"
    names = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    anchored = [name for name in names if name in PREFERENCE_LOSSES and not PREFERENCE_LOSSES[name].margin_based]
    if anchored:
        raise ValueError(
            _checks.message(where, "loss_type", f"holds anchored losses {anchored}", "margin_based losses")
        )
    return preference_loss(
        loss_type,
        normalised_gradient_logps(chosen_logps, norm_chosen),
        normalised_gradient_logps(rejected_logps, norm_rejected),
        ref_chosen_logps,
        ref_rejected_logps,
        beta=beta,
        **options,
    )


def learned_token_mask(mask_logits: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Soft token mask mu = sigmoid(mask_logits) * mask, f32[B, T], to multiply token log-probabilities.

    Use it as the mask of ``sequence_logps`` so the margin reads sum_t mu_t log pi(y_t | ...), and add
    ``token_mask_penalty`` to the loss; the logits are per-token parameters trained with the policy.

    Args:
      mask_logits: f32[B, T] per-token logits.
      mask: f32[B, T] response mask (padding gets mu = 0); default all ones.

    Returns:
      f32[B, T] in [0, 1].

    References:
      Yuan et al., "A Common Pitfall of Margin-based Language Model Alignment: Gradient Entanglement",
      ICLR 2025, arXiv 2410.13828. Christopoulou et al., "SparsePO: Controlling Preference Alignment of
      LLMs via Sparse Token Masks", 2024, arXiv 2410.05102.
    """
    mask_logits = jnp.asarray(mask_logits, jnp.float32)
    mask = jnp.ones_like(mask_logits) if mask is None else jnp.asarray(mask, jnp.float32)
    if mask.shape != mask_logits.shape:
        raise ValueError(
            _checks.message("learned_token_mask", "mask", f"has shape {mask.shape}", f"the logits' {mask_logits.shape}")
        )
    return jax.nn.sigmoid(mask_logits) * mask


def token_mask_penalty(token_mask: jax.Array, mask: jax.Array | None = None, *, l1: float) -> jax.Array:
    """L1 sparsity penalty l1 * mean(mu) over the response tokens, f32[] (0 when there are none).

    Args:
      token_mask: f32[B, T] mu from ``learned_token_mask`` (non-negative, so its mean is its L1 norm per token).
      mask: f32[B, T] response mask; default all ones.
      l1: penalty weight >= 0.

    Returns:
      f32[].

    References:
      Yuan et al., "A Common Pitfall of Margin-based Language Model Alignment: Gradient Entanglement",
      ICLR 2025, arXiv 2410.13828.
    """
    l1 = _checks.nonnegative("token_mask_penalty", "l1", l1)
    token_mask = jnp.asarray(token_mask, jnp.float32)
    mask = jnp.ones_like(token_mask) if mask is None else jnp.asarray(mask, jnp.float32)
    return l1 * safe_divide(jnp.sum(token_mask * mask), jnp.sum(mask))
