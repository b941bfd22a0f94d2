"""Numerical helpers shared across mojax modules."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """numerator / denominator where denominator > 0, else 0 (never NaN, and no NaN in the gradient)."""
    positive = denominator > 0
    return jnp.where(positive, numerator / jnp.where(positive, denominator, 1.0), 0.0)
