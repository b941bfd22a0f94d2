"""Combiners: optax transforms from per-objective updates (leading objective axis n) to one update."""

from mojax.combiners._base import WeightsState, combine, tree_gram, weighted_combiner
from mojax.combiners.cagrad import cagrad
from mojax.combiners.ctwa import CtwaState, ctwa_controller_step, ctwa_next_weights, ctwa_reweight
from mojax.combiners.gapo import gapo_rescale
from mojax.combiners.grads import per_objective_grads, probe_combined_grads
from mojax.combiners.linear import linear_scalarize
from mojax.combiners.mgda import mgda
from mojax.combiners.minnorm import min_norm_weights
from mojax.combiners.nash_mtl import nash_mtl
from mojax.combiners.pama import (
    PamaState,
    noon,
    pama_closed_form,
    pama_combined_advantage,
    pama_solve,
    pama_statistics,
    pama_token_advantage,
)
from mojax.combiners.pcgrad import pcgrad
from mojax.combiners.upgrad import upgrad

__all__ = [
    "CtwaState",
    "PamaState",
    "WeightsState",
    "cagrad",
    "combine",
    "ctwa_controller_step",
    "ctwa_next_weights",
    "ctwa_reweight",
    "gapo_rescale",
    "linear_scalarize",
    "mgda",
    "min_norm_weights",
    "nash_mtl",
    "noon",
    "pama_closed_form",
    "pama_combined_advantage",
    "pama_solve",
    "pama_statistics",
    "pama_token_advantage",
    "pcgrad",
    "per_objective_grads",
    "probe_combined_grads",
    "tree_gram",
    "upgrad",
    "weighted_combiner",
]
