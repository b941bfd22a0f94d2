"""The combiner registry: one stable name per method, how to build it for n objectives, and what it reads.

Everything that needs "every combiner" (the trainer's choice of mode, the contract and sharding tests, the
benchmarks, the demo, the README table) derives from :data:`REGISTRY`, so adding a method means adding one
:class:`CombinerSpec` here. Solver and normaliser variants (MGDA's Frank-Wolfe solver, its loss normalisers) are
options of an entry passed through :func:`make`, not entries of their own.

The trainer picks its mode from ``uses_gram``: combiners without a Gram (linear, CTWA, PAMA, ...) run in *scalar*
mode (one backward pass of the weighted loss), Gram combiners in *probe* or *full* mode (per-objective gradients of
a probe subset or of every parameter).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import numpy as np
import optax

from mojax import _checks as checks
from mojax.combiners.cagrad import cagrad
from mojax.combiners.ctwa import ctwa_reweight
from mojax.combiners.gapo import gapo_rescale
from mojax.combiners.lagrangian import lagrangian
from mojax.combiners.linear import linear_scalarize
from mojax.combiners.mgda import mgda
from mojax.combiners.nash_mtl import nash_mtl
from mojax.combiners.pama import pama_solve
from mojax.combiners.pcgrad import pcgrad
from mojax.combiners.tchebycheff import tchebycheff
from mojax.combiners.upgrad import upgrad

CTWA_DEFAULT_COV_TARGET = 0.05
"""Default covariance target of every objective for ``make("ctwa", n)`` (the authors' defaults are 0.05 to 0.15)."""


def _uniform(n: int) -> np.ndarray:
    """f32[n] = 1/n."""
    return np.full((n,), 1.0 / n, np.float32)


@dataclasses.dataclass(frozen=True)
class CombinerSpec:
    """One registered combiner.

    Attributes:
      name: the stable registry name (what configs and the trainer use).
      factory: the public factory, e.g. :func:`mojax.mgda`.
      uses_gram: whether the combiner needs the Gram of per-objective gradients (probe/full modes) or only
        per-sample statistics (scalar mode).
      reads: the extra arguments of ``update`` it reads (required ones first).
      requires: the subset of ``reads`` without which ``update`` raises.
      summary: one line for tables and ``--help``.
      defaults: n -> the factory's keyword arguments that make a working combiner for n objectives.
      hyperparameters: float hyperparameters that ``optax.inject_hyperparams`` may drive.
      guarantees: properties the method guarantees, checked by the shared property tests:
        ``"permutation_equivariant"`` (permuting objectives permutes the weights), ``"scale_invariant"``
        (G -> kG leaves the update direction unchanged), ``"non_conflicting"`` (<d, g_i> >= 0 for every i),
        ``"convex_weights"`` (weights on the simplex).
    """

    name: str
    factory: Callable[..., optax.GradientTransformationExtraArgs]
    uses_gram: bool
    reads: tuple[str, ...]
    requires: tuple[str, ...]
    summary: str
    defaults: Callable[[int], dict[str, Any]]
    hyperparameters: tuple[str, ...] = ()
    guarantees: frozenset[str] = frozenset()

    @property
    def mode(self) -> str:
        """The trainer mode it runs in by default: ``"probe"`` for Gram combiners, else ``"scalar"``."""
        return "probe" if self.uses_gram else "scalar"


_SPECS = (
    CombinerSpec(
        "linear",
        linear_scalarize,
        uses_gram=False,
        reads=(),
        requires=(),
        summary="fixed weights, d = sum_i w_i g_i (MORLHF)",
        defaults=lambda n: {"weights": _uniform(n)},
        guarantees=frozenset({"permutation_equivariant"}),
    ),
    CombinerSpec(
        "mgda",
        mgda,
        uses_gram=True,
        reads=("losses",),
        requires=(),
        summary="min-norm point of the convex hull of the gradients (Sener & Koltun 2018)",
        defaults=lambda n: {"num_objectives": n},
        guarantees=frozenset({"permutation_equivariant", "scale_invariant", "non_conflicting", "convex_weights"}),
    ),
    CombinerSpec(
        "gapo",
        gapo_rescale,
        uses_gram=True,
        reads=(),
        requires=(),
        summary="MGDA on gradients rescaled by ||g_i||^-p: progress proportional to ||g_i||^p (GAPO)",
        defaults=lambda n: {"num_objectives": n, "p": 1.0},
        guarantees=frozenset({"permutation_equivariant", "scale_invariant", "non_conflicting"}),
    ),
    CombinerSpec(
        "p_gapo",
        gapo_rescale,
        uses_gram=True,
        reads=(),
        requires=(),
        summary="sum_i lambda_i g_i / ||g_i||: user preferences on unit gradients (P-GAPO)",
        defaults=lambda n: {"num_objectives": n, "p": 1.0, "preference": _uniform(n)},
        guarantees=frozenset({"scale_invariant"}),
    ),
    CombinerSpec(
        "pcgrad",
        pcgrad,
        uses_gram=True,
        reads=(),
        requires=(),
        summary="project each gradient off the conflicting others, then sum (PCGrad)",
        defaults=lambda n: {"num_objectives": n},
        guarantees=frozenset({"scale_invariant"}),
    ),
    CombinerSpec(
        "cagrad",
        cagrad,
        uses_gram=True,
        reads=(),
        requires=(),
        summary="best worst-case improvement in a ball around the mean gradient (CAGrad)",
        defaults=lambda n: {"num_objectives": n},
        hyperparameters=("c",),
        guarantees=frozenset({"permutation_equivariant", "scale_invariant"}),
    ),
    CombinerSpec(
        "upgrad",
        upgrad,
        uses_gram=True,
        reads=(),
        requires=(),
        summary="average of projections onto the dual cone of the gradients (UPGrad)",
        defaults=lambda n: {"num_objectives": n},
        guarantees=frozenset({"permutation_equivariant", "scale_invariant", "non_conflicting"}),
    ),
    CombinerSpec(
        "nash_mtl",
        nash_mtl,
        uses_gram=True,
        reads=(),
        requires=(),
        summary="Nash bargaining solution, G a = 1/a (Nash-MTL)",
        defaults=lambda n: {"num_objectives": n},
        guarantees=frozenset({"permutation_equivariant", "scale_invariant", "non_conflicting"}),
    ),
    CombinerSpec(
        "pama",
        pama_solve,
        uses_gram=False,
        reads=("advantages", "mask", "ratio"),
        requires=("advantages",),
        summary="closed-form O(n) weights on Noon (clipped-positive) advantages (PAMA)",
        defaults=lambda n: {"num_objectives": n},
        hyperparameters=("epsilon",),
        guarantees=frozenset({"permutation_equivariant", "convex_weights"}),
    ),
    CombinerSpec(
        "ctwa",
        ctwa_reweight,
        uses_gram=False,
        reads=("rewards", "signal", "group_ids", "mask"),
        requires=("rewards", "signal"),
        summary="raise the weight of objectives whose reward covaries too little with the training signal (CTWA)",
        defaults=lambda n: {"init_weights": _uniform(n), "cov_targets": np.full((n,), CTWA_DEFAULT_COV_TARGET)},
        hyperparameters=("lr",),
        guarantees=frozenset({"permutation_equivariant"}),
    ),
    CombinerSpec(
        "lagrangian",
        lagrangian,
        uses_gram=False,
        reads=("rewards",),
        requires=("rewards",),
        summary="PPO-Lagrangian: rewards plus multiplier-weighted costs held under thresholds (Safe-RLHF)",
        defaults=lambda n: {"num_objectives": n},
        hyperparameters=("lambda_lr",),
    ),
    CombinerSpec(
        "tchebycheff",
        tchebycheff,
        uses_gram=False,
        reads=("rewards",),
        requires=("rewards",),
        summary="weight on the objective furthest from a running ideal point (Tchebycheff scalarisation)",
        defaults=lambda n: {"num_objectives": n},
        guarantees=frozenset({"permutation_equivariant", "convex_weights"}),
    ),
)

REGISTRY: Mapping[str, CombinerSpec] = MappingProxyType({spec.name: spec for spec in _SPECS})
"""Read-only mapping from the stable combiner name to its :class:`CombinerSpec`."""


def spec(name: str) -> CombinerSpec:
    """The registry entry `name`; ValueError listing the registered names otherwise."""
    if not isinstance(name, str):
        raise TypeError(checks.message("mojax.combiners.make", "name", f"is a {type(name).__name__}", "a string"))
    return REGISTRY[checks.choice("mojax.combiners.make", "name", name, REGISTRY)]


def make(name: str, num_objectives: int, **options: Any) -> optax.GradientTransformationExtraArgs:
    """The combiner `name` for `num_objectives` objectives, with the registry's defaults filled in.

    Args:
      name: a key of :data:`REGISTRY` (``"linear"``, ``"mgda"``, ``"gapo"``, ``"p_gapo"``, ``"pcgrad"``,
        ``"cagrad"``, ``"upgrad"``, ``"nash_mtl"``, ``"pama"``, ``"ctwa"``, ``"lagrangian"``, ``"tchebycheff"``).
      num_objectives: n, the size of the leading objective axis of the updates.
      **options: keyword arguments of the factory; they override the defaults (uniform linear weights, uniform
        P-GAPO preference, uniform CTWA initial weights with covariance targets
        :data:`CTWA_DEFAULT_COV_TARGET`, ...).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state has a ``weights`` field f32[n].

    Example:
      >>> import jax.numpy as jnp
      >>> from mojax.combiners import make
      >>> tx = make("mgda", num_objectives=2)
      >>> grads = {"w": jnp.asarray([[1.0, 0.0], [0.0, 1.0]])}  # g_1 and g_2 on a leading objective axis
      >>> update, state = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
      >>> [round(float(x), 3) for x in state.weights]
      [0.5, 0.5]
    """
    entry = spec(name)
    n = checks.integer("mojax.combiners.make", "num_objectives", num_objectives, minimum=1)
    combiner = entry.factory(**{**entry.defaults(n), **options})
    built_for = combiner.init(None).weights.shape
    if built_for != (n,):
        raise ValueError(
            checks.message(
                "mojax.combiners.make", "num_objectives", f"is {n}", f"n = {built_for[0]}, as the options imply"
            )
        )
    return combiner
