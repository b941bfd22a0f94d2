"""Registry of every mojax combiner: how to build it for n objectives and the extra arguments it reads.

Shared by the cross-cutting combiner tests and by `benchmarks/combiners.py`, so that adding a method
means adding one `CombinerCase` here.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

import jax
import numpy as np
import optax


def graded_weights(n: int) -> np.ndarray:
    """f32[n] proportional to 1..n and summing to 1: a non-uniform point of the simplex."""
    ramp = np.arange(1, n + 1, dtype=np.float32)
    return ramp / ramp.sum()


@dataclasses.dataclass(frozen=True)
class CombinerCase:
    """One combiner: its module, a factory for n objectives, and the extra arguments it requires or accepts."""

    name: str
    module: str
    build: Callable[[ModuleType, int], optax.GradientTransformationExtraArgs]
    uses_gram: bool
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()

    def make(self, n: int) -> optax.GradientTransformationExtraArgs:
        """The combiner built for n objectives."""
        return self.build(importlib.import_module(self.module), n)


CASES: dict[str, CombinerCase] = {
    case.name: case
    for case in (
        CombinerCase(
            "linear", "mojax.combiners.linear", lambda m, n: m.linear_scalarize(graded_weights(n)), uses_gram=False
        ),
        CombinerCase("mgda", "mojax.combiners.mgda", lambda m, n: m.mgda(num_objectives=n), uses_gram=True),
        CombinerCase(
            "mgda_frank_wolfe",
            "mojax.combiners.mgda",
            lambda m, n: m.mgda(num_objectives=n, solver="frank_wolfe"),
            uses_gram=True,
        ),
        CombinerCase(
            "mgda_loss_plus",
            "mojax.combiners.mgda",
            lambda m, n: m.mgda(num_objectives=n, normalize="loss+", drop_zero_norm=True),
            uses_gram=True,
            required=("losses",),
        ),
        CombinerCase(
            "gapo", "mojax.combiners.gapo", lambda m, n: m.gapo_rescale(p=1.0, num_objectives=n), uses_gram=True
        ),
        CombinerCase(
            "p_gapo",
            "mojax.combiners.gapo",
            lambda m, n: m.gapo_rescale(p=1.0, preference=graded_weights(n), num_objectives=n),
            uses_gram=True,
        ),
        CombinerCase(
            "pcgrad", "mojax.combiners.pcgrad", lambda m, n: m.pcgrad(num_objectives=n, seed=0), uses_gram=True
        ),
        CombinerCase(
            "cagrad", "mojax.combiners.cagrad", lambda m, n: m.cagrad(num_objectives=n, c=0.5), uses_gram=True
        ),
        CombinerCase("upgrad", "mojax.combiners.upgrad", lambda m, n: m.upgrad(num_objectives=n), uses_gram=True),
        CombinerCase("nash_mtl", "mojax.combiners.nash_mtl", lambda m, n: m.nash_mtl(num_objectives=n), uses_gram=True),
        CombinerCase(
            "pama",
            "mojax.combiners.pama",
            lambda m, n: m.pama_solve(num_objectives=n),
            uses_gram=False,
            required=("advantages",),
            optional=("mask",),
        ),
        CombinerCase(
            "ctwa",
            "mojax.combiners.ctwa",
            lambda m, n: m.ctwa_reweight(np.full((n,), 1.0 / n, np.float32), np.full((n,), 0.1, np.float32)),
            uses_gram=False,
            required=("rewards", "signal"),
            optional=("group_ids", "mask"),
        ),
    )
}


def per_sample_statistics(n: int, batch: int, length: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Every per-sample extra argument of the contract (DESIGN.md §3) for n objectives, B = batch, T = length."""
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, length), np.float32)
    mask[::2, length // 2 :] = 0.0  # every other completion ends early
    return {
        "rewards": rng.uniform(0.0, 1.0, (batch, n)).astype(np.float32),
        "signal": rng.standard_normal(batch).astype(np.float32),
        "group_ids": (np.arange(batch) // 2).astype(np.int32),
        "advantages": rng.standard_normal((n, batch, length)).astype(np.float32),
        "losses": rng.uniform(0.5, 2.0, n).astype(np.float32),
        "mask": mask,
    }


def extra_args(case: CombinerCase, n: int, batch: int = 8, length: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """The extra arguments `case` reads (required and optional), for n objectives and a (batch, length) rollout."""
    stats = per_sample_statistics(n, batch, length, seed)
    return {key: stats[key] for key in case.required + case.optional}


def llama_like_shapes(hidden: int, ffn: int, vocab: int, layers: int) -> dict[str, Any]:
    """Parameter shapes of a LLaMA-style decoder (GQA with hidden/4 key-value width), as a nested dict."""
    kv = hidden // 4
    block = {
        "attn_norm": (hidden,),
        "q": (hidden, hidden),
        "k": (hidden, kv),
        "v": (hidden, kv),
        "o": (hidden, hidden),
        "mlp_norm": (hidden,),
        "gate": (hidden, ffn),
        "up": (hidden, ffn),
        "down": (ffn, hidden),
    }
    return {
        "embed": (vocab, hidden),
        "layers": [dict(block) for _ in range(layers)],
        "final_norm": (hidden,),
        "lm_head": (hidden, vocab),
    }


def is_shape(node: Any) -> bool:
    """Whether a node of a shapes tree is a leaf shape (a tuple of ints)."""
    return isinstance(node, tuple) and all(isinstance(size, int) for size in node)


def stacked_gradients(shapes: Any, n: int, seed: int = 0, dtype: Any = np.float32) -> Any:
    """Per-objective gradients f[n, *shape] for every leaf shape: a shared direction with signed loadings plus noise, so objectives conflict."""
    rng = np.random.default_rng(seed)
    loadings = np.linspace(1.0, -0.5, n, dtype=np.float32)

    def leaf(shape: tuple[int, ...]) -> np.ndarray:
        shared = rng.standard_normal(shape, np.float32)
        noise = rng.standard_normal((n, *shape), np.float32)
        return (loadings.reshape((n,) + (1,) * len(shape)) * shared + noise).astype(dtype)

    return jax.tree.map(leaf, shapes, is_leaf=is_shape)
