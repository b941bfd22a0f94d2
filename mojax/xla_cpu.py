"""XLA:CPU compile options for programs with batched pullbacks: YNNPACK's reduction fusions off.

jaxlib 0.10's XLA:CPU hands two kinds of operations to YNNPACK by default (the debug option
``xla_cpu_experimental_ynn_fusion_type``): single matmuls and reductions fused with their elementwise neighbours. One
fused reduction computes wrong values:

    y = p * sum(c * p, axis=-1, keepdims=True),   p f32[16, 80, 64],   c f32[1, 80, 64] (broadcast along p's axis 0)

comes out right in y[0] and wrong in y[1:] (errors of the size of y itself: :func:`broadcast_reduce_error`). A
pullback vmapped over several cotangents makes exactly that pattern: the forward pass's residuals are shared by every
cotangent, so they broadcast along the vmapped axis. The RMSNorm backward pass, vmapped over four cotangents at
SmolLM2-135M's width, gave wrong per-objective gradients that way. One pullback at a time does not broadcast its
residuals, and its gradients agreed with and without the fusions on SmolLM2.

Without the reduction fusions the batched pullbacks are right, but the scalar and probe steps took 6-31% longer
without them on the 56M configuration and SmolLM2-135M (``benchmarks/xla_cpu_options.py``). So mojax turns them
off only in the programs that vmap a pullback: the RL step with ``combiner.pullbacks: batched`` and the DPO step
(per-objective gradients and the per-pair entanglement). Users who vmap pullbacks in their own jitted code
(:func:`mojax.combiners.per_objective_grads`) can pass :func:`batched_pullback_options` the same way, or run the
pullbacks in sequence (``per_objective_grads(..., sequential=True)``), which needs no options. JAX takes
``compiler_options`` on a top-level ``jax.jit`` only: a step jitted with them raises if it is called inside another
jit, so call it directly (lower it to inspect it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

NO_YNN_REDUCTION_FUSIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
"""XLA:CPU's default YNNPACK fusions (single matmuls and reductions) without the reductions. The option takes one
fusion type, so it names the one kept."""


def batched_pullback_options() -> dict[str, str] | None:
    """``jax.jit``'s ``compiler_options`` for a program that vmaps a pullback: :data:`NO_YNN_REDUCTION_FUSIONS` when
    JAX's default backend is the CPU, else None (XLA's defaults; the option is XLA:CPU's)."""
    return dict(NO_YNN_REDUCTION_FUSIONS) if jax.default_backend() == "cpu" else None


def broadcast_reduce_error(compiler_options: dict[str, str] | None = None) -> float:
    """max |jit(p * sum(c * p, -1)) - numpy| for p f32[16, 80, 64] and c f32[1, 80, 64], compiled with
    ``compiler_options``: the fused reduction XLA:CPU gets wrong with its default YNNPACK fusions (module docstring).
    The values are of order 100, so a right program reads about 1e-5."""
    generator = np.random.default_rng(0)
    p = generator.standard_normal((16, 80, 64), dtype=np.float32)
    c = generator.standard_normal((1, 80, 64), dtype=np.float32)
    program = jax.jit(lambda p, c: p * jnp.sum(c * p, axis=-1, keepdims=True), compiler_options=compiler_options)
    exact = p.astype(np.float64) * np.sum(c * p.astype(np.float64), axis=-1, keepdims=True)
    return float(np.abs(np.asarray(program(p, c)) - exact).max())
