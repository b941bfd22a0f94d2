"""Numerical helpers shared across mojax modules."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """numerator / denominator where denominator > 0, else 0 (never NaN, and no NaN in the gradient)."""
    positive = denominator > 0
    return jnp.where(positive, numerator / jnp.where(positive, denominator, 1.0), 0.0)


def token_rows(x: jax.Array, feature_dims: int = 1) -> jax.Array:
    """x [*lead, *features] as [prod(lead), prod(features)]: a free reshape of contiguous axes.

    Matmuls over tokens run on such rows because XLA:CPU lays out the backward pass's weight gradient x^T dy,
    a contraction over every token axis, with a transposed copy of an operand when two axes ([B, T]) are
    contracted, and with none when one is (0.7 s of a 4 s SmolLM2 training step; ``benchmarks/RESULTS.md``).
    """
    lead = x.shape[: x.ndim - feature_dims]
    return x.reshape(math.prod(lead), math.prod(x.shape[x.ndim - feature_dims :]))


COLUMNS_MAX_ROWS = 48
"""The most token rows for which :func:`columns_matmul` beats the row-major product by a [V, D] LM head on XLA:CPU
(SmolLM2's 49152 x 576 head, ``benchmarks/matmul_orientation.py``: 8.6 against 14.9 ms at 16 rows, 21.6 against 24.7
at 48, even at 64, 56 against 50 at 128)."""


def columns_pay_off() -> bool:
    """Whether this backend multiplies decode-sized matmuls by columns (:func:`columns_matmul`): the CPU, where that
    was measured to pay off. Elsewhere the GEMMs choose their own operand layouts and the barriers would only add
    transpose kernels."""
    return jax.default_backend() == "cpu"


def columns_matmul(rows: jax.Array, kernel_t: jax.Array, preferred_element_type=None) -> jax.Array:
    """rows [N, K] @ kernel_t [M, K]^T computed as (kernel_t @ rows^T)^T: [N, M] in ``preferred_element_type``
    (default: the operands' dtype).

    For a few token rows (decode steps) on XLA:CPU. Its GEMM packs the right-hand operand at every call: with the
    weights on the right, as in ``rows @ kernel``, that repacks all the weights for a handful of rows; with them on
    the left only the N activation columns are packed. SmolLM2's 30 layers of projections at 16 rows: 32 against 52
    ms (``benchmarks/matmul_orientation.py``), the same time from about 128 rows up. The optimization barriers keep
    XLA's algebraic simplifier from folding the two transposes back into one dot with the weights on the right,
    which runs no faster than ``rows @ kernel`` (47 ms at 16 rows, 115 against 100 at 48).
    """
    barrier = jax.lax.optimization_barrier
    columns = jnp.matmul(kernel_t, barrier(rows.T), preferred_element_type=preferred_element_type)
    return barrier(columns).T


def token_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x [..., D] @ kernel [D, N] on :func:`token_rows`, in x's dtype with fp32 accumulation: f32[..., N]."""
    out = jnp.einsum("td,dn->tn", token_rows(x), kernel.astype(x.dtype), preferred_element_type=jnp.float32)
    return out.reshape(*x.shape[:-1], kernel.shape[-1])
