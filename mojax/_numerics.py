"""Numerical helpers shared across mojax modules."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero


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


def transposed_copies_pay_off() -> bool:
    """Whether this backend runs some matmuls faster on an operand transposed ahead of time, behind an optimization
    barrier (:func:`columns_matmul` for decode steps, :func:`rows_contraction` for wide weight gradients): the CPU,
    where that was measured to pay off. Elsewhere the GEMMs choose their own operand layouts and the barriers would
    only add transpose kernels."""
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


def rows_contraction(a: jax.Array, b: jax.Array, preferred_element_type=None) -> jax.Array:
    """a [N, K]^T @ b [N, M]: [K, M], the contraction over N token rows of a matmul's weight gradient x^T dy.

    Contracted over the leading axis of both operands, it compiles on XLA:CPU to an Eigen dot with a transposed
    operand, which at an LM head's widths runs at half the rate of XLA:CPU's GEMM on plain operands: 576 x 49152 over
    512 rows took 448-462 ms against 214 ms with a's transpose written out first, a 576 x 512 copy
    (``benchmarks/matmul_orientation.py --gradient-rows 512``). So on the CPU (:func:`transposed_copies_pay_off`)
    a^T is copied behind an optimization barrier, which keeps XLA's algebraic simplifier from folding the transpose
    back into the dot. At the decoder layers' widths (1536 columns and fewer) both forms run alike, so only the heads
    use this.
    """
    if transposed_copies_pay_off():
        a_transposed = jax.lax.optimization_barrier(a.T)
        return jnp.matmul(a_transposed, b, preferred_element_type=preferred_element_type)
    return jnp.einsum("nk,nm->km", a, b, preferred_element_type=preferred_element_type)


def token_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x [..., D] @ kernel [D, N] on :func:`token_rows`, in x's dtype with fp32 accumulation: f32[..., N]."""
    return _rows_times_kernel(token_rows(x), kernel).reshape(*x.shape[:-1], kernel.shape[-1])


def _rows_times_kernel(rows: jax.Array, kernel: jax.Array) -> jax.Array:
    """rows [N, D] @ kernel [D, M] in the rows' dtype, accumulated in fp32."""
    return jnp.einsum("td,dn->tn", rows, kernel.astype(rows.dtype), preferred_element_type=jnp.float32)


@jax.custom_jvp
def head_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """:func:`token_matmul` for a wide kernel (an LM head [D, V]): the same product, differentiated so that its weight
    gradient x^T dy contracts x's written-out transpose on the CPU, as :func:`rows_contraction` does.

    Its JVP multiplies the kernel's tangent by x^T transposed back (behind an optimization barrier on the CPU); reverse
    mode transposes that product into x^T-copy @ dy, where the plain product's autodiff gives the Eigen dot with a
    transposed operand that runs at half the rate at an LM head's widths. Forward mode works as for any product.
    """
    return token_matmul(x, kernel)


@functools.partial(head_matmul.defjvp, symbolic_zeros=True)
def _head_matmul_jvp(primals, tangents):
    x, kernel = primals
    x_dot, kernel_dot = tangents
    terms = []
    if not isinstance(x_dot, SymbolicZero):
        terms.append(_rows_times_kernel(token_rows(x_dot), kernel))
    if not isinstance(kernel_dot, SymbolicZero):
        rows = token_rows(x)
        written_out = jax.lax.optimization_barrier(rows.T).T if transposed_copies_pay_off() else rows
        terms.append(_rows_times_kernel(written_out, kernel_dot))
    shape = (*x.shape[:-1], kernel.shape[-1])
    return token_matmul(x, kernel), sum(terms[1:], terms[0]).reshape(shape)
