"""Small jit-safe solvers on n x n Gram matrices (nonnegative, box and simplex QPs, the Nash log-barrier) and their shared checks.

All three QPs reduce to one exact active-set solver (Lawson & Hanson 1974, in the Gram form of
Bro & de Jong 1997); the Nash-MTL fixed point G a = 1/a is the minimiser of a self-concordant
function and is found by damped Newton (Nesterov & Nemirovski 1994). Everything is fp32 and built
from `lax.while_loop`, so it traces once and runs under `jit`, `vmap` and sharding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

# Relative size of a gradient entry or a coordinate that the active-set loop treats as zero.
_ACTIVE_SET_TOL = 1e-7
# Newton stops once the squared Newton decrement (an upper bound on f - f* near the optimum) is this small.
_NEWTON_TOL = 1e-12
# Inside this Newton decrement the full Newton step is safe for a self-concordant function.
_FULL_STEP_DECREMENT = 0.25


def _solve_on(passive: jax.Array, quadratic: jax.Array, linear: jax.Array) -> jax.Array:
    """x_P = -Q_PP^-1 p_P and x = 0 off the passive set P (identity rows stand in for the fixed coordinates)."""
    both = passive[:, None] & passive[None, :]
    system = jnp.where(both, quadratic, 0.0) + jnp.diag(jnp.where(passive, 0.0, 1.0))
    solution = jnp.linalg.solve(system, jnp.where(passive, -linear, 0.0))
    return jnp.where(passive, solution, 0.0)


def nonnegative_qp(quadratic: jax.Array, linear: jax.Array) -> jax.Array:
    """argmin_{x >= 0} 1/2 x^T Q x + p^T x for PSD Q, by the Lawson-Hanson active-set method in Gram form."""
    quadratic = jnp.asarray(quadratic, jnp.float32)
    linear = jnp.asarray(linear, jnp.float32)
    n = linear.shape[-1]
    magnitude = jnp.max(jnp.abs(quadratic)) + jnp.max(jnp.abs(linear))
    tol = _ACTIVE_SET_TOL * jnp.where(magnitude > 0, magnitude, 1.0)
    max_outer = 3 * n

    def descent(x: jax.Array) -> jax.Array:
        """-(Q x + p), the negative gradient."""
        return -(quadratic @ x + linear)

    def step_back(
        carry: tuple[jax.Array, jax.Array, jax.Array, jax.Array],
    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """Move from x towards the infeasible solve s until the first passive coordinate hits 0; drop it."""
        x, passive, trial, count = carry
        blocking = passive & (trial <= 0)
        ratios = jnp.where(blocking, x / jnp.where(blocking, x - trial, 1.0), jnp.inf)
        fraction = jnp.clip(jnp.min(ratios), 0.0, 1.0)
        x = x + fraction * (trial - x)
        passive = passive & (x > tol)
        x = jnp.where(passive, x, 0.0)
        return x, passive, _solve_on(passive, quadratic, linear), count + 1

    def keep_stepping_back(carry: tuple[jax.Array, jax.Array, jax.Array, jax.Array]) -> jax.Array:
        """The latest solve is infeasible on the passive set (at most n drops)."""
        _, passive, trial, count = carry
        return jnp.any(passive & (trial <= 0)) & (count < n)

    def free_one(
        carry: tuple[jax.Array, jax.Array, jax.Array, jax.Array],
    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """Free the steepest eligible coordinate, re-solve, restore feasibility; one whose solve is <= 0 is round-off: bar it."""
        x, passive, barred, outer = carry
        entering = jnp.argmax(jnp.where(passive | barred, -jnp.inf, descent(x)))
        widened = passive.at[entering].set(True)
        trial = _solve_on(widened, quadratic, linear)
        accepted = trial[entering] > 0
        _, new_passive, new_x, _ = lax.while_loop(keep_stepping_back, step_back, (x, widened, trial, 0))
        x = jnp.where(accepted, new_x, x)
        passive = jnp.where(accepted, new_passive, passive)
        return x, passive, barred.at[entering].set(~accepted), outer + 1

    def improvable(carry: tuple[jax.Array, jax.Array, jax.Array, jax.Array]) -> jax.Array:
        """Some fixed, unbarred coordinate still has a descent direction (KKT violated), within 3n rounds."""
        x, passive, barred, outer = carry
        return jnp.any(~passive & ~barred & (descent(x) > tol)) & (outer < max_outer)

    no = jnp.zeros((n,), bool)
    x, _, _, _ = lax.while_loop(improvable, free_one, (jnp.zeros((n,), jnp.float32), no, no, 0))
    return jnp.maximum(x, 0.0)


def box_qp(quadratic: jax.Array, lower: jax.Array) -> jax.Array:
    """argmin_{v >= u} v^T Q v for PSD Q: v = u + x with x the nonnegative QP of (Q, Q u)."""
    lower = jnp.asarray(lower, jnp.float32)
    return lower + nonnegative_qp(quadratic, quadratic @ lower)


def simplex_min_norm(gram: jax.Array, active: jax.Array | None = None) -> jax.Array:
    """argmin_{w in simplex over the active set} w^T K w: z = argmin_{z >= 0} z^T (K + 11^T) z - 2 a^T z, w = z / sum(z).

    An inactive coordinate (a_i = 0, its K row and column zeroed) has gradient sum(z) + 1 > 0 and stays at
    0; with no active coordinate every weight is 0.
    """
    n = gram.shape[-1]
    ones = jnp.ones((n,), jnp.float32)
    mask = ones if active is None else jnp.asarray(active, jnp.float32)
    block = jnp.asarray(gram, jnp.float32) * jnp.outer(mask, mask)
    z = nonnegative_qp(block + jnp.outer(ones, ones), 1.0 - 2.0 * mask)
    total = ones @ z
    return z / jnp.where(total > 0, total, 1.0)


def log_barrier_newton(gram: jax.Array, start: jax.Array, *, max_iters: int) -> jax.Array:
    """argmin_{a > 0} 1/2 a^T G a - sum(log a), i.e. G a = 1/a, by damped Newton from `start` (G positive definite)."""
    gram = jnp.asarray(gram, jnp.float32)

    def newton_step(a: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(H^-1 grad f, grad f . H^-1 grad f = squared Newton decrement) at a."""
        gradient = gram @ a - 1.0 / a
        hessian = gram + jnp.diag(1.0 / (a * a))
        step = jnp.linalg.solve(hessian, gradient)
        return step, gradient @ step

    def body(carry: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
        """a <- a - t H^-1 grad f, t = 1 / (1 + decrement) outside the quadratic region; a stays > 0."""
        a, _, count = carry
        step, decrement_sq = newton_step(a)
        decrement = jnp.sqrt(jnp.maximum(decrement_sq, 0.0))
        damping = jnp.where(decrement < _FULL_STEP_DECREMENT, 1.0, 1.0 / (1.0 + decrement))
        return a - damping * step, decrement_sq, count + 1

    def unconverged(carry: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
        """Squared decrement above tolerance and iterations left."""
        _, decrement_sq, count = carry
        return (decrement_sq > _NEWTON_TOL) & (count < max_iters)

    start = jnp.asarray(start, jnp.float32)
    a, _, _ = lax.while_loop(unconverged, body, (start, jnp.asarray(jnp.inf, jnp.float32), 0))
    return a


def trace_normalized(gram: jax.Array, gram_scale: jax.Array | float, norm_eps: float) -> jax.Array:
    """G / tr(G), or 0 when the true squared Frobenius norm gram_scale^2 tr(G) of J is below norm_eps (as TorchJD)."""
    gram = jnp.asarray(gram, jnp.float32)
    trace = jnp.trace(gram)
    frobenius = jnp.asarray(gram_scale, jnp.float32) * jnp.sqrt(jnp.maximum(trace, 0.0))
    negligible = frobenius <= jnp.sqrt(jnp.float32(norm_eps))
    return jnp.where(negligible, 0.0, gram / jnp.where(negligible, 1.0, trace))
