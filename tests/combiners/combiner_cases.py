"""Every combiner configuration the cross-cutting tests check, derived from ``mojax.combiners.REGISTRY``.

One case per registry entry (built by ``make`` with its defaults) plus the solver and normaliser variants that are
options of an entry, so a new registry entry is covered without touching this file.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import optax

from mojax.combiners import REGISTRY, make
from mojax.testing import graded_weights, per_sample_statistics

# Options that make a registry entry's defaults non-trivial, so weights differ between objectives.
_GRADED = {"linear": lambda n: {"weights": graded_weights(n)}, "p_gapo": lambda n: {"preference": graded_weights(n)}}
# Solver and normaliser variants: (registry name, options, extra args they require).
_VARIANTS = {
    "mgda_frank_wolfe": ("mgda", {"solver": "frank_wolfe"}, ()),
    "mgda_loss_plus": ("mgda", {"normalize": "loss+", "drop_zero_norm": True}, ("losses",)),
}


@dataclasses.dataclass(frozen=True)
class CombinerCase:
    """One combiner configuration: its registry entry, options, and the extra arguments it requires or accepts."""

    name: str
    entry: str
    options: dict[str, Any]
    required: tuple[str, ...]
    optional: tuple[str, ...]

    @property
    def uses_gram(self) -> bool:
        return REGISTRY[self.entry].uses_gram

    def make(self, n: int) -> optax.GradientTransformationExtraArgs:
        """The combiner built for n objectives."""
        graded = _GRADED.get(self.name, lambda n: {})(n)
        return make(self.entry, n, **graded, **self.options)


def _case(name: str, entry: str, options: dict[str, Any], required: tuple[str, ...]) -> CombinerCase:
    spec = REGISTRY[entry]
    required = tuple(dict.fromkeys(spec.requires + required))
    return CombinerCase(name, entry, options, required, tuple(key for key in spec.reads if key not in required))


CASES: dict[str, CombinerCase] = {
    **{name: _case(name, name, {}, ()) for name in REGISTRY},
    **{name: _case(name, entry, options, required) for name, (entry, options, required) in _VARIANTS.items()},
}


def extra_args(case: CombinerCase, n: int, batch: int = 8, length: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """The extra arguments `case` reads (required and optional), for n objectives and a (batch, length) rollout."""
    stats = per_sample_statistics(n, batch, length, seed)
    return {key: stats[key] for key in case.required + case.optional}
