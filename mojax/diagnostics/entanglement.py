"""Gradient entanglement in margin-based preference optimisation (arXiv 2410.13828).

A margin loss l = f(m), m = a_w log pi(y_w|x) - a_l log pi(y_l|x), moves the parameters by
d theta = eta (a_w g_w - a_l g_l) (|f'(m)| folded into the coefficients), with g = grad log pi(y|x).
To first order

    d log pi_w / eta = a_w ||g_w||^2 - a_l <g_w, g_l>,     d log pi_l / eta = a_w <g_w, g_l> - a_l ||g_l||^2,

so the chosen log-probability falls, or the rejected one rises, when <g_w, g_l> is large against
the norms. Coefficients of the usual losses: DPO / IPO a_w = a_l = beta |f'|; SimPO
a = beta |f'| / |y| (length normalisation); CPO or any SFT-regularised loss adds its NLL weight
lambda to a_w. The mitigations are the pairwise-normalised update (``npo_loss``) and masking the
tokens shared by both responses (``shared_prefix_mask``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mojax._numerics import safe_divide


class EntanglementStatistics(NamedTuple):
    """Per-pair gradient geometry and the predicted first-order moves of both log-probabilities (f32[P])."""

    inner: jax.Array
    norm_chosen: jax.Array
    norm_rejected: jax.Array
    cosine: jax.Array
    condition: jax.Array
    delta_chosen: jax.Array
    delta_rejected: jax.Array


def _pair_count(tree: Any, label: str) -> int:
    """Size P of the leading pair axis shared by every leaf of `tree`; ValueError otherwise."""
    sizes = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in jax.tree.leaves(tree)}
    if not sizes or None in sizes or len(sizes) > 1:
        raise ValueError(
            f"entanglement_statistics: every leaf of `{label}` needs the same leading pair axis P; got leading sizes {sizes}."
        )
    (pairs,) = sizes
    return pairs


def _pair_dot(left: Any, right: Any) -> jax.Array:
    """sum over leaves of the per-pair inner product <left_p, right_p>, f32[P]."""

    def leaf_dot(a: jax.Array, b: jax.Array) -> jax.Array:
        a = jnp.reshape(a, (a.shape[0], -1)).astype(jnp.float32)
        b = jnp.reshape(b, (b.shape[0], -1)).astype(jnp.float32)
        return jnp.sum(a * b, axis=1)

    return sum(jax.tree.leaves(jax.tree.map(leaf_dot, left, right)))


def entanglement_statistics(
    grad_chosen: Any, grad_rejected: Any, coeff_chosen: jax.Array | float = 1.0, coeff_rejected: jax.Array | float = 1.0
) -> EntanglementStatistics:
    """<g_w,g_l>, norms, cosine, <g_w,g_l>/min(|g_w|^2,|g_l|^2), and d log pi_w, d log pi_l per unit step (2410.13828).

    The sign of ``delta_*`` is the predicted direction of each log-probability after a small gradient step on the
    margin loss: delta_chosen = a_w |g_w|^2 - a_l <g_w, g_l>, delta_rejected = a_w <g_w, g_l> - a_l |g_l|^2. A
    ``condition`` near or above 1 flags entanglement (the chosen log-probability can fall, or the rejected one rise).

    Args:
      grad_chosen: pytree of grad log pi(y_w|x) with a leading pair axis P on every leaf.
      grad_rejected: pytree of grad log pi(y_l|x), same structure and P.
      coeff_chosen: a_w, the margin coefficient of the chosen response (scalar or f32[P]).
      coeff_rejected: a_l, that of the rejected response (scalar or f32[P]).

    Returns:
      ``EntanglementStatistics`` of f32[P]: inner, norm_chosen, norm_rejected, cosine, condition, delta_chosen,
      delta_rejected (0 where a ratio's denominator is 0).

    References:
      H. Yuan, Y. Zeng, Y. Wu, H. Wang, M. Wang, L. Leqi. A Common Pitfall of Margin-based Language Model Alignment:
      Gradient Entanglement. ICLR 2025, arXiv 2410.13828.

    Example:
      >>> import jax.numpy as jnp
      >>> from mojax.diagnostics import entanglement_statistics
      >>> stats = entanglement_statistics({"w": jnp.asarray([[1.0, 0.0]])}, {"w": jnp.asarray([[0.6, 0.8]])})  # P = 1
      >>> [round(float(x), 3) for x in (stats.cosine[0], stats.condition[0], stats.delta_chosen[0], stats.delta_rejected[0])]
      [0.6, 0.6, 0.4, -0.4]
    """
    if jax.tree.structure(grad_chosen) != jax.tree.structure(grad_rejected):
        raise ValueError(
            "entanglement_statistics: `grad_chosen` and `grad_rejected` must be pytrees of the same structure."
        )
    pairs = _pair_count(grad_chosen, "grad_chosen")
    if _pair_count(grad_rejected, "grad_rejected") != pairs:
        raise ValueError(
            "entanglement_statistics: `grad_chosen` and `grad_rejected` disagree on the number of pairs P."
        )
    inner = _pair_dot(grad_chosen, grad_rejected)
    square_chosen = _pair_dot(grad_chosen, grad_chosen)
    square_rejected = _pair_dot(grad_rejected, grad_rejected)
    norm_chosen, norm_rejected = jnp.sqrt(square_chosen), jnp.sqrt(square_rejected)
    a_w = jnp.asarray(coeff_chosen, jnp.float32)
    a_l = jnp.asarray(coeff_rejected, jnp.float32)
    return EntanglementStatistics(
        inner=inner,
        norm_chosen=norm_chosen,
        norm_rejected=norm_rejected,
        cosine=safe_divide(inner, norm_chosen * norm_rejected),
        condition=safe_divide(inner, jnp.minimum(square_chosen, square_rejected)),
        delta_chosen=a_w * square_chosen - a_l * inner,
        delta_rejected=a_w * inner - a_l * square_rejected,
    )


def npo_loss(
    logp_chosen: jax.Array,
    logp_rejected: jax.Array,
    norm_chosen: jax.Array,
    norm_rejected: jax.Array,
    margin_grad_coeff: jax.Array | float,
) -> jax.Array:
    """Pairwise-normalised loss mean_p sg(c)(-log pi_w / sg|g_w| + log pi_l / sg|g_l|) (NPO, arXiv 2410.13828).

    Its gradient is c (g_l/|g_l| - g_w/|g_w|), so a descent step changes log pi_w by
    eta c |g_w| (1 - cos) >= 0 and log pi_l by -eta c |g_l| (1 - cos) <= 0. ``margin_grad_coeff`` is
    c = |f'(m)| of the underlying margin loss (e.g. beta sigmoid(-beta m) for DPO). A zero norm
    (a zero gradient) contributes nothing.
    """
    coeff = jax.lax.stop_gradient(jnp.asarray(margin_grad_coeff, jnp.float32))
    safe_w = jax.lax.stop_gradient(jnp.where(norm_chosen > 0, norm_chosen, 1.0))
    safe_l = jax.lax.stop_gradient(jnp.where(norm_rejected > 0, norm_rejected, 1.0))
    return jnp.mean(coeff * (-logp_chosen / safe_w + logp_rejected / safe_l))


def shared_prefix_mask(
    chosen_ids: jax.Array,
    rejected_ids: jax.Array,
    chosen_mask: jax.Array | None = None,
    rejected_mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(mu_w f32[P, T_w], mu_l f32[P, T_l]): 0 on the longest common prefix of the two responses, else the mask.

    The deterministic sparse-token baseline of arXiv 2410.13828: tokens of a shared prefix have
    identical gradients that cancel in g_w - g_l but inflate <g_w, g_l>. Responses start at position 0
    (right padding); the masks default to all ones.
    """
    chosen_ids, rejected_ids = jnp.asarray(chosen_ids), jnp.asarray(rejected_ids)
    if chosen_ids.ndim != 2 or rejected_ids.ndim != 2 or chosen_ids.shape[0] != rejected_ids.shape[0]:
        raise ValueError(
            f"shared_prefix_mask: ids have shapes {chosen_ids.shape} and {rejected_ids.shape}; expected (P, T_w) and (P, T_l)."
        )
    chosen_mask = (
        jnp.ones(chosen_ids.shape, jnp.float32) if chosen_mask is None else jnp.asarray(chosen_mask, jnp.float32)
    )
    rejected_mask = (
        jnp.ones(rejected_ids.shape, jnp.float32) if rejected_mask is None else jnp.asarray(rejected_mask, jnp.float32)
    )
    if chosen_mask.shape != chosen_ids.shape or rejected_mask.shape != rejected_ids.shape:
        raise ValueError("shared_prefix_mask: each mask must have the shape of its ids, (P, T).")
    overlap = min(chosen_ids.shape[1], rejected_ids.shape[1])
    same = (
        (chosen_ids[:, :overlap] == rejected_ids[:, :overlap])
        & (chosen_mask[:, :overlap] > 0)
        & (rejected_mask[:, :overlap] > 0)
    )
    prefix = jnp.cumprod(same.astype(jnp.float32), axis=1)

    def unmasked(mask: jax.Array) -> jax.Array:
        padded = jnp.pad(prefix, ((0, 0), (0, mask.shape[1] - overlap)))
        return mask * (1.0 - padded)

    return unmasked(chosen_mask), unmasked(rejected_mask)
