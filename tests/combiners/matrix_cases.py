"""Jacobians for the Gram-weighting tests (known answers, degenerate rows) and a jitted single-leaf update."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

# TorchJD's golden-value Jacobian (tests/unit/aggregation/test_values.py).
J_BASE = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], np.float32)

# Two objectives in R^3 that every weighting must survive without NaN.
DEGENERATE = {
    "zero_row": np.array([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]], np.float32),
    "all_zero": np.zeros((2, 3), np.float32),
    "identical": np.array([[1.0, -2.0, 0.5], [1.0, -2.0, 0.5]], np.float32),
    "anti_parallel": np.array([[1.0, -2.0, 0.5], [-3.0, 6.0, -1.5]], np.float32),
    "tiny": np.array([[1e-30, -2e-30, 0.0], [-1e-30, 0.0, 3e-30]], np.float32),
    "huge": np.array([[1e30, -2e30, 0.0], [-1e30, 0.0, 3e30]], np.float32),
    "mixed_scales": np.array([[1e-30, 0.0, 0.0], [-1.0, 1.0, 0.0]], np.float32),
}


def jacobians(n: int, d: int) -> st.SearchStrategy[np.ndarray]:
    """f32[n, d] with entries in [-4, 4] and a trace large enough for the Gram normalisations to act."""
    entries = st.floats(-4.0, 4.0, allow_nan=False, width=32)
    return hnp.arrays(np.float32, (n, d), elements=entries).filter(
        lambda j: float(np.sum(j.astype(np.float64) ** 2)) > 1e-2
    )


def jitted_update(tx: optax.GradientTransformationExtraArgs) -> Callable[[np.ndarray, Any], tuple[np.ndarray, Any]]:
    """(J f32[n, d], state) -> (d = the combined update f32[d], new state), compiled once per shape."""
    update = jax.jit(lambda jac, state: tx.update({"p": jac}, state))

    def run(jac: np.ndarray, state: Any = None) -> tuple[np.ndarray, Any]:
        state = tx.init({"p": jnp.zeros(np.shape(jac)[1:], jnp.asarray(jac).dtype)}) if state is None else state
        out, state = update(jnp.asarray(jac), state)
        return np.asarray(out["p"], np.float64), state

    return run


def balanced(jac: np.ndarray) -> bool:
    """Every row within 1e-3 of the largest in norm: scaling J by 1e-3 keeps every Gram entry inside fp32's normal range.

    A row 1e-19 times smaller than the largest has a squared norm that flushes to zero in the fp32 Gram, and
    Gram weightings then treat it as a zero row; scale tests exclude such Jacobians.
    """
    norms = np.linalg.norm(jac.astype(np.float64), axis=1)
    return bool(norms.min() >= 1e-3 * norms.max())


FP32_UNIT_ROUNDOFF = 2.0**-24


def min_trace_normalized_eigenvalue(jac: np.ndarray) -> float:
    """lambda_min(G / tr G) in float64, G = J J^T: how far the rows are from linear dependence (0: dependent)."""
    wide = jac.astype(np.float64)
    gram = wide @ wide.T
    return float(np.linalg.eigvalsh(gram / np.trace(gram))[0])


def gram_rounding_gap(d: int) -> float:
    """Bound on ||G^ - G^'||_2 between the fp32 trace-normalised Grams of J and of fl(k J) (or J rescaled by its peak).

    Per entry, each side is off by at most (d + 6) u relative to |g_i| |g_j| / tr G: 2u on each operand (fl(k J),
    then the 1 / peak rescaling of ``tree_gram``), so 4u per product, d u for the length-d fp32 dot, 2u for the
    trace normalisation. The matrix |g_i| |g_j| / tr G is rank one with spectral norm 1, so both sides together
    differ by at most 2 (d + 6) u in spectral norm.
    """
    return 2.0 * (d + 6) * FP32_UNIT_ROUNDOFF


def conditioning_for_weight_tolerance(d: int, tolerance: float, amplification: float) -> float:
    """The smallest lambda_min(G^) at which a weighting's fp32 rounding stays below `tolerance`.

    A weighting that minimises a quadratic in G^ over a convex set (the simplex, a box) moves by at most
    ||dG^|| / lambda_min when G^ moves by dG^ (the objective's curvature on the feasible directions is at least
    lambda_min); a further factor amplification / sqrt(lambda_min) (lambda_min <= 1) multiplies it when the
    weights are divided by |g_w| >= sqrt(lambda_min / n) |J|_F. Solving amplification * gap / lambda^(3/2) <=
    tolerance for lambda gives the bound.
    """
    return (amplification * gram_rounding_gap(d) / tolerance) ** (2.0 / 3.0)
