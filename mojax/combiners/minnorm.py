"""Min-norm point of the convex hull of n gradients, computed from their Gram matrix alone.

    alpha* = argmin_{alpha in simplex} alpha^T G alpha,    d = sum_i alpha_i g_i

is MGDA's inner problem (Desideri 2012; Sener & Koltun 2018, arXiv 1810.04650). By its KKT
conditions <d, g_i> = ||d||^2 where alpha_i > 0 and <d, g_i> >= ||d||^2 elsewhere, i.e.
(G alpha)_i is smallest, and equal, on the support. Every solver below works in fp32 on G divided
by its largest diagonal entry, so G -> kG (k > 0) leaves the weights unchanged.

Solvers (``solver=``):

* n = 1: alpha = 1. n = 2: the closed form clip(<g2 - g1, g2> / ||g1 - g2||^2, 0, 1), decided by
  comparing G12 with G11 and G22 first (no cancellation for nearly parallel gradients): exactly 0
  or 1 at the boundaries and (1/2, 1/2) for identical gradients.
* ``"active_set"`` (default, n > 2): the exact active-set solver of ``mojax.combiners.qp``
  (Lawson-Hanson on the equivalent nonnegative QP; shared with CAGrad and UPGrad). It terminates
  in finitely many steps at the support of the optimum and solves the KKT system there, so it is
  accurate to fp32 round-off: weights to ~cond(G) x 1e-7.
* ``"frank_wolfe"``: Algorithm 2 of Sener & Koltun from the uniform point, as torchjd's ``MGDA``
  (stop when the step gamma < 1e-3, at most 100 iterations; also used for n = 2). Sublinear:
  ~1e-3 error when the optimum lies on a face. Use it to reproduce torchjd or the paper.

``active`` (bool[n]) excludes objectives from the solve: their weight is 0 and the simplex is the
one over the active objectives; with no active objective every weight is 0.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mojax import _checks as checks
from mojax.combiners._base import cosine_gram
from mojax.combiners.qp import simplex_min_norm

SOLVERS = ("active_set", "frank_wolfe")

# torchjd / Sener & Koltun Frank-Wolfe constants.
FW_EPSILON = 1e-3
FW_MAX_ITERS = 100
# Smallest divisor c_i of a rescaled gradient g_i / c_i: its loss weight alpha_i / c_i must stay finite in fp32.
MIN_DIVISOR = 1e-37


class MinNormState(NamedTuple):
    """State of a min-norm combiner: applied loss weights w, simplex weights alpha, gradient norms."""

    weights: jax.Array
    alpha: jax.Array
    grad_norms: jax.Array


def check_solver(name: str, solver: str) -> str:
    """`solver` if it is one of SOLVERS; ValueError naming the choices otherwise."""
    return checks.choice(name, "solver", solver, SOLVERS)


def check_divisor_floor(name: str, eps: float, power: float) -> None:
    """ValueError unless eps > 0 and eps**power >= MIN_DIVISOR, so that 1 / eps**power fits in fp32."""
    checks.positive(name, "eps", eps, "the floor of the gradient normalisers")
    if power * np.log10(eps) < np.log10(MIN_DIVISOR):
        raise ValueError(
            f"{name}: eps**{power:g} = 1e{power * np.log10(eps):.0f} is below {MIN_DIVISOR:g}; the loss weights "
            f"up to 1 / eps**{power:g} would overflow fp32. Use a larger eps."
        )


def _uniform(active: jax.Array) -> jax.Array:
    """1/|A| on the active set A, 0 elsewhere (all 0 when A is empty)."""
    mask = active.astype(jnp.float32)
    return mask / jnp.maximum(jnp.sum(mask), 1.0)


def _frank_wolfe(gram: jax.Array, active: jax.Array, epsilon: float, max_iters: int) -> jax.Array:
    """Sener & Koltun Alg. 2 (torchjd MGDA): step to the vertex argmin (G alpha) with the exact 2-point line search."""
    n = gram.shape[0]

    def unconverged(carry):
        k, _, gamma = carry
        return (k < max_iters) & (gamma >= epsilon)

    def iterate(carry):
        k, alpha, _ = carry
        progress = gram @ alpha
        vertex = jnp.argmin(jnp.where(active, progress, jnp.inf))
        a, b, c = progress[vertex], jnp.dot(alpha, progress), gram[vertex, vertex]
        inner = (b - a) / jnp.where(b + c - 2.0 * a > 0, b + c - 2.0 * a, 1.0)
        gamma = jnp.where(c <= a, 1.0, jnp.where(b <= a, 0.0, inner))
        return k + 1, (1.0 - gamma) * alpha + gamma * jax.nn.one_hot(vertex, n, dtype=jnp.float32), gamma

    carry = (jnp.zeros((), jnp.int32), _uniform(active), jnp.asarray(jnp.inf, jnp.float32))
    return jax.lax.while_loop(unconverged, iterate, carry)[1]


def _two_objectives(gram: jax.Array, active: jax.Array) -> jax.Array:
    """gamma = 1 if G12 >= G11, 0 if G12 >= G22, else (G22 - G12) / ((G11 - G12) + (G22 - G12)); 1/2 if both hold (g1 = g2)."""
    g11, g12, g22 = gram[0, 0], gram[0, 1], gram[1, 1]
    first_is_min, second_is_min = g12 >= g11, g12 >= g22
    # Both differences are > 0 in the interior case, so their sum has no cancellation.
    spread = jnp.where(first_is_min | second_is_min, 1.0, (g11 - g12) + (g22 - g12))
    interior = (g22 - g12) / spread
    gamma = jnp.where(first_is_min, jnp.where(second_is_min, 0.5, 1.0), jnp.where(second_is_min, 0.0, interior))
    pair = jnp.stack([gamma, 1.0 - gamma])
    return jnp.where(jnp.all(active), pair, _uniform(active))


def _normalized(gram: jax.Array, active: jax.Array) -> jax.Array:
    """G restricted to the active block (zeros elsewhere), divided by its largest diagonal entry."""
    mask = active.astype(jnp.float32)
    block = gram.astype(jnp.float32) * jnp.outer(mask, mask)
    peak = jnp.max(jnp.diag(block))
    return block / jnp.where(peak > 0, peak, 1.0)


def min_norm_weights(
    gram: jax.Array,
    *,
    active: jax.Array | None = None,
    solver: str = "active_set",
    tol: float | None = None,
    max_iters: int | None = None,
) -> jax.Array:
    """argmin_{alpha in simplex over the active set} alpha^T G alpha, f32[n] (Sener & Koltun, arXiv 1810.04650).

    ``tol`` / ``max_iters`` tune ``frank_wolfe`` only (default: stop when the step gamma < 1e-3, at
    most 100 steps, as torchjd); ``active_set`` is exact and takes neither.
    """
    check_solver("min_norm_weights", solver)
    gram = jnp.asarray(gram)
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] < 1:
        raise ValueError(
            f"min_norm_weights: `gram` has shape {gram.shape}; expected a square n x n matrix with n >= 1."
        )
    n = gram.shape[0]
    active = jnp.ones((n,), bool) if active is None else jnp.asarray(active, bool)
    if active.shape != (n,):
        raise ValueError(
            f"min_norm_weights: `active` has shape {active.shape}; expected a bool vector of length n = {n}."
        )
    if max_iters is not None and max_iters < 1:
        raise ValueError(f"min_norm_weights: max_iters must be a positive integer, got {max_iters}.")
    if tol is not None and not tol > 0:
        raise ValueError(f"min_norm_weights: tol must be > 0, got {tol}.")
    scaled = _normalized(gram, active)
    if n == 1:
        return active.astype(jnp.float32)
    if solver == "frank_wolfe":
        alpha = _frank_wolfe(scaled, active, tol or FW_EPSILON, max_iters or FW_MAX_ITERS)
    elif n == 2:
        alpha = _two_objectives(scaled, active)
    else:
        alpha = simplex_min_norm(scaled, active)
    return jnp.where(jnp.any(active), alpha, 0.0)


def grad_log_norms(gram: jax.Array, gram_scale: jax.Array | float = 1.0) -> jax.Array:
    """log ||g_i|| = log s + log(G_ii) / 2 from a Gram in units of s^2 (-inf for a zero gradient)."""
    diag = jnp.diag(gram).astype(jnp.float32)
    return jnp.log(jnp.asarray(gram_scale, jnp.float32)) + 0.5 * jnp.log(diag)


def rescaled_gram(gram: jax.Array, log_divisors: jax.Array) -> jax.Array:
    """Gram of g_i / c_i up to a positive factor, from cosines and log-lengths so no scale over/underflows."""
    cosines, _ = cosine_gram(gram)
    log_lengths = 0.5 * jnp.log(jnp.diag(gram).astype(jnp.float32)) - log_divisors
    longest = jnp.max(jnp.where(jnp.isfinite(log_lengths), log_lengths, -jnp.inf))
    relative = jnp.exp(log_lengths - jnp.where(jnp.isfinite(longest), longest, 0.0))
    return (cosines * relative[:, None]) * relative[None, :]


def rescaled_min_norm(
    gram: jax.Array, log_divisors: jax.Array, *, active: jax.Array, solver: str
) -> tuple[jax.Array, jax.Array]:
    """(alpha, w): alpha = MinNorm{g_i / c_i} over the active set and loss weights w_i = alpha_i / c_i (GAPO, arXiv 2507.01915)."""
    alpha = min_norm_weights(rescaled_gram(gram, log_divisors), active=active, solver=solver)
    return alpha, alpha * jnp.exp(-log_divisors)
