"""Combiners: optax transforms from per-objective updates (leading objective axis n, or ``ObjectiveTrees``: n
separate pytrees) to one update.

The factories and their state types are also exported at the top level of :mod:`mojax`; the building blocks
(``combine``, ``tree_gram``, ``weighted_combiner``, ``noon``, the PAMA and CTWA helpers, the min-norm solver) and the
registry live here.
"""

from mojax.combiners._base import (
    ObjectiveTrees,
    WeightsState,
    combine,
    cosine_gram,
    raw_tree_gram,
    tree_gram,
    weighted_combiner,
)
from mojax.combiners.cagrad import cagrad
from mojax.combiners.ctwa import CtwaState, ctwa_controller_step, ctwa_next_weights, ctwa_reweight
from mojax.combiners.gapo import gapo_rescale
from mojax.combiners.grads import per_objective_grads, probe_combined_grads
from mojax.combiners.lagrangian import LagrangianState, lagrangian
from mojax.combiners.linear import linear_scalarize
from mojax.combiners.mgda import mgda
from mojax.combiners.minnorm import MinNormState, min_norm_weights
from mojax.combiners.nash_mtl import NashMTLState, nash_mtl
from mojax.combiners.pama import (
    PamaState,
    noon,
    pama_closed_form,
    pama_combined_advantage,
    pama_solve,
    pama_statistics,
    pama_token_advantage,
)
from mojax.combiners.pcgrad import PCGradState, pcgrad
from mojax.combiners.registry import REGISTRY, CombinerSpec, make
from mojax.combiners.tchebycheff import TchebycheffState, tchebycheff
from mojax.combiners.upgrad import upgrad

PUBLIC = (
    "cagrad",
    "ctwa_reweight",
    "gapo_rescale",
    "lagrangian",
    "linear_scalarize",
    "mgda",
    "nash_mtl",
    "pama_solve",
    "pcgrad",
    "tchebycheff",
    "upgrad",
    "CtwaState",
    "LagrangianState",
    "MinNormState",
    "NashMTLState",
    "PamaState",
    "PCGradState",
    "TchebycheffState",
    "WeightsState",
    "per_objective_grads",
    "probe_combined_grads",
)
"""The names re-exported at the top level of mojax: every factory, every state type a user meets in
``opt_state``, and the two front doors for per-objective gradients."""

__all__ = [
    "cagrad",
    "ctwa_reweight",
    "gapo_rescale",
    "lagrangian",
    "linear_scalarize",
    "mgda",
    "nash_mtl",
    "pama_solve",
    "pcgrad",
    "tchebycheff",
    "upgrad",
    "CtwaState",
    "LagrangianState",
    "MinNormState",
    "NashMTLState",
    "PamaState",
    "PCGradState",
    "TchebycheffState",
    "WeightsState",
    "per_objective_grads",
    "probe_combined_grads",
    "ObjectiveTrees",
    "REGISTRY",
    "CombinerSpec",
    "combine",
    "cosine_gram",
    "ctwa_controller_step",
    "ctwa_next_weights",
    "make",
    "min_norm_weights",
    "noon",
    "pama_closed_form",
    "pama_combined_advantage",
    "pama_statistics",
    "pama_token_advantage",
    "raw_tree_gram",
    "tree_gram",
    "weighted_combiner",
]
