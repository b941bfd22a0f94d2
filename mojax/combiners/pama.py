"""PAMA (He & Maghsudi, arXiv 2508.07768): Noon-PPO advantages and O(n) closed-form objective weights.

PAMA clips every per-objective advantage at zero ("Noon PPO", A_t = max(A'_t, 0)) and bounds the
min-norm problem min_{c in simplex} ||sum_i c_i grad L_i|| by G_max * sum_i c_i a_i, where

    a_i = E_t[ max(A_t^(i), 0) * 1[u_t <= 1 + epsilon_high] ]

is the mean clipping-aware positive advantage of objective i (u_t is the PPO ratio, shared by all
objectives). Theorem 1 of the paper minimises (c^T a)^2 over the simplex: the optimum is the
projection of 0 onto [min_i a_i, max_i a_i], attained by mixing the argmin and argmax vertices.
Finding the minimum and maximum is O(n), and no per-objective gradient is ever needed.

Reading of the paper implemented here (the paper leaves the granularity open):

* ``pama_solve`` (mode "pama", the default reading): c* is one vector of n weights for the whole
  batch, applied to the per-objective Noon-PPO updates (or, in a trainer, to the per-objective
  Noon-PPO losses, sum_i c*_i L_i, equivalently to the combined advantage
  ``pama_combined_advantage``). Under Noon every a_i >= 0, so c* is the vertex of the objective with
  the smallest mean advantage; an objective with a_i = 0 makes the step exactly stationary.
* ``pama_token_advantage`` (mode "pama_token"): c chosen per token, giving the combined advantage
  s_t* = Proj_[min_i I_t, max_i I_t](0) = min_i I_t^(i) for the Noon-PPO loss. Per-token weights are
  not n objective weights, so this mode is a loss-level function for the trainer, not a combiner.
* The CTWA repository's port (one scalar s* used as the advantage of every token, u_t measured
  against the reference model) is not provided: it ignores which tokens carry the advantage.

The ratio u_t is whatever the caller passes: pi_theta / pi_old for standard PPO (the default
recommendation) or pi_theta / pi_ref for the paper's notation; absent means u_t = 1 (on-policy).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mojax import _checks as checks
from mojax._numerics import safe_divide
from mojax.combiners._base import initial_weights, require_extra_arg, require_num_objectives, weighted_combiner

_ADVANTAGES_DOC = "f32[n, B, T] per-objective token advantages, objective axis first"


class PamaState(NamedTuple):
    """Weights c* of the latest update, its statistics a, optimum s*, and stationary-step counters."""

    weights: jax.Array
    statistics: jax.Array
    optimum: jax.Array
    stationary: jax.Array
    num_steps: jax.Array
    num_stationary: jax.Array


def noon(advantages: jax.Array) -> jax.Array:
    """Noon-PPO advantages max(A, 0): no negative advantages (arXiv 2508.07768)."""
    return jnp.maximum(advantages, 0.0)


def _unclipped(ratio: jax.Array | None, upper: float) -> jax.Array:
    """1[u_t <= 1 + epsilon_high]: tokens whose positive-advantage PPO term still has a gradient; all ones if u is absent."""
    if ratio is None:
        return jnp.ones((), jnp.float32)
    return (jnp.asarray(ratio, jnp.float32) <= 1.0 + upper).astype(jnp.float32)


def _upper_clip(epsilon: float, epsilon_high: float | None) -> float:
    """The PPO clip range above 1: epsilon_high, or epsilon when it is None (TRL's convention)."""
    return epsilon if epsilon_high is None else epsilon_high


def _clipping_aware_advantages(advantages: jax.Array, ratio: jax.Array | None, upper: float) -> jax.Array:
    """I_t^(i) = max(A_t^(i), 0) * 1[u_t <= 1 + epsilon_high], f32[n, B, T] (arXiv 2508.07768, Eq. 10)."""
    return noon(jnp.asarray(advantages, jnp.float32)) * _unclipped(ratio, upper)


def pama_statistics(
    advantages: jax.Array,
    mask: jax.Array | None = None,
    ratio: jax.Array | None = None,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
) -> jax.Array:
    """a_i = sum_{b,t} m_bt I_bt^(i) / sum_{b,t} m_bt, the masked mean of max(A, 0) 1[u <= 1 + epsilon_high]; 0 with no tokens."""
    clipped = _clipping_aware_advantages(advantages, ratio, _upper_clip(epsilon, epsilon_high))
    weights = jnp.ones(clipped.shape[1:], jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
    summed = jnp.sum(clipped * weights, axis=(1, 2))
    return safe_divide(summed, jnp.sum(weights))


def _project_zero(low: jax.Array, high: jax.Array) -> jax.Array:
    """Proj_[low, high](0) = clip(0, low, high), the smallest |s| on the interval (PAMA Theorem 1)."""
    return jnp.clip(0.0, low, high)


def pama_closed_form(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(s*, c*): s* = Proj_[min a, max a](0) = min_{c in simplex} |c^T a|, c* attains it; ties split evenly (Thm 1)."""
    a = jnp.asarray(a, jnp.float32)
    low, high = jnp.min(a), jnp.max(a)
    at_low = (a == low).astype(jnp.float32)
    at_high = (a == high).astype(jnp.float32)
    low_vertex = at_low / jnp.sum(at_low)
    high_vertex = at_high / jnp.sum(at_high)
    span = high - low
    # Straddling 0: mix so that c^T a = 0, i.e. weight -low/span on the max and high/span on the min.
    share_high = jnp.where(span > 0, -low / jnp.where(span > 0, span, 1.0), 0.5)
    straddle = share_high * high_vertex + (1.0 - share_high) * low_vertex
    uniform = jnp.full_like(a, 1.0 / a.shape[0])
    weights = jnp.where(low > 0, low_vertex, jnp.where(high < 0, high_vertex, straddle))
    weights = jnp.where((low == 0) & (high == 0), uniform, weights)
    return _project_zero(low, high), weights


def pama_combined_advantage(advantages: jax.Array, weights: jax.Array) -> jax.Array:
    """Combined Noon advantage sum_i c_i max(A_t^(i), 0), f32[B, T]: the loss-level form of mode "pama"."""
    return jnp.tensordot(jnp.asarray(weights, jnp.float32), noon(jnp.asarray(advantages, jnp.float32)), axes=1)


def pama_token_advantage(
    advantages: jax.Array, ratio: jax.Array | None = None, epsilon: float = 0.2, epsilon_high: float | None = None
) -> jax.Array:
    """Mode "pama_token": s_t* = Proj_[min_i I_t^(i), max_i I_t^(i)](0) per token, f32[B, T] (= min_i I_t under Noon)."""
    clipped = _clipping_aware_advantages(advantages, ratio, _upper_clip(epsilon, epsilon_high))
    return _project_zero(jnp.min(clipped, axis=0), jnp.max(clipped, axis=0))


def _check_token_array(label: str, value: Any, shape: tuple[int, ...]) -> jax.Array:
    """`value` as f32 of exactly `shape` (B, T); ValueError naming the mismatch otherwise."""
    array = jnp.asarray(value, jnp.float32)
    if array.shape != shape:
        raise ValueError(
            f"pama_solve: `{label}` has shape {array.shape}; expected (B, T) = {shape}, matching `advantages`."
        )
    return array


def pama_solve(
    *, num_objectives: int, epsilon: float = 0.2, epsilon_high: float | None = None
) -> optax.GradientTransformationExtraArgs:
    """PAMA combiner: c* from the Noon statistics a of the extra args, d = sum_i c*_i g_i (arXiv 2508.07768).

    a_i is the masked mean of max(A^(i), 0) 1[u <= 1 + epsilon_high]; c* attains min_{c in simplex} |c^T a| (the
    vertex of the smallest a_i under Noon). No per-objective gradient is needed: scalar mode.

    Args:
      num_objectives: n.
      epsilon: the PPO clip range.
      epsilon_high: the clip range above 1 (None: epsilon).

    Extra args:
      ``advantages`` f32[n, B, T] (required), ``mask`` f32[B, T] and ``ratio`` u_t f32[B, T] (optional; absent ratio
      means on-policy, u = 1).

    Returns:
      A scalar-mode ``optax.GradientTransformationExtraArgs`` whose state is a ``PamaState`` (weights c*, statistics
      a, optimum s*, stationary-step counters).

    References:
      He, Maghsudi. PAMA: Pareto Multi-Objective Alignment. ECML-PKDD 2025, arXiv 2508.07768.

    Example:
      >>> import jax.numpy as jnp
      >>> from mojax.combiners import pama_solve
      >>> tx = pama_solve(num_objectives=2)
      >>> grads = {"w": jnp.asarray([[1.0, 0.0], [0.0, 2.0]])}  # g_1 = (1, 0), g_2 = (0, 2) on the objective axis
      >>> advantages = jnp.asarray([[[1.0, 0.0]], [[0.2, -1.0]]])  # f32[n=2, B=1, T=2]: a = (0.5, 0.1)
      >>> update, state = tx.update(grads, tx.init({"w": jnp.zeros(2)}), advantages=advantages)
      >>> [round(float(x), 3) for x in state.statistics], [round(float(x), 3) for x in state.weights]
      ([0.5, 0.1], [0.0, 1.0])
    """
    n = require_num_objectives("pama_solve", num_objectives)
    checks.nonnegative("pama_solve", "epsilon", epsilon, "the PPO clip range")
    checks.nonnegative("pama_solve", "epsilon_high", _upper_clip(epsilon, epsilon_high), "the PPO clip range above 1")

    def init_state() -> PamaState:
        zero_count = jnp.zeros((), jnp.int32)
        return PamaState(
            weights=initial_weights(n),
            statistics=jnp.zeros((n,), jnp.float32),
            optimum=jnp.zeros((), jnp.float32),
            stationary=jnp.zeros((), bool),
            num_steps=zero_count,
            num_stationary=zero_count,
        )

    def weighting(
        gram: None, gram_scale: jax.Array, state: PamaState, **extra_args: Any
    ) -> tuple[jax.Array, PamaState]:
        del gram, gram_scale
        advantages = require_extra_arg("pama_solve", extra_args, "advantages", _ADVANTAGES_DOC)
        if advantages.ndim != 3 or advantages.shape[0] != n:
            raise ValueError(
                f"pama_solve: `advantages` has shape {advantages.shape}; expected (n, B, T) with n = {n} ({_ADVANTAGES_DOC})."
            )
        token_shape = advantages.shape[1:]
        mask, ratio = (extra_args.get(key) for key in ("mask", "ratio"))
        mask = None if mask is None else _check_token_array("mask", mask, token_shape)
        ratio = None if ratio is None else _check_token_array("ratio", ratio, token_shape)
        statistics = pama_statistics(advantages, mask, ratio, epsilon, epsilon_high)
        optimum, weights = pama_closed_form(statistics)
        stationary = optimum == 0
        state = state._replace(
            statistics=statistics,
            optimum=optimum,
            stationary=stationary,
            num_steps=state.num_steps + 1,
            num_stationary=state.num_stationary + stationary.astype(jnp.int32),
        )
        return weights, state

    return weighted_combiner("pama_solve", weighting, init_state, num_objectives=n, uses_gram=False)
