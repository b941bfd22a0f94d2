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


def token_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x [..., D] @ kernel [D, N] on :func:`token_rows`, in x's dtype with fp32 accumulation: f32[..., N]."""
    out = jnp.einsum("td,dn->tn", token_rows(x), kernel.astype(x.dtype), preferred_element_type=jnp.float32)
    return out.reshape(*x.shape[:-1], kernel.shape[-1])
