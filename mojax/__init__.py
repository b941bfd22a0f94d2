"""mojax: multi-objective alignment for LLMs in JAX/Flax.

Combiners are optax gradient transformations: put one first in an `optax.chain`, feed it
updates whose every leaf carries a leading objective axis of size n, and it returns one update.
Models live in `mojax.models`, diagnostics in `mojax.diagnostics`.
"""

from mojax.combiners import (
    CtwaState,
    PamaState,
    WeightsState,
    cagrad,
    combine,
    ctwa_controller_step,
    ctwa_next_weights,
    ctwa_reweight,
    gapo_rescale,
    linear_scalarize,
    mgda,
    min_norm_weights,
    nash_mtl,
    noon,
    pama_closed_form,
    pama_combined_advantage,
    pama_solve,
    pama_statistics,
    pama_token_advantage,
    pcgrad,
    per_objective_grads,
    probe_combined_grads,
    tree_gram,
    upgrad,
    weighted_combiner,
)
from mojax.diagnostics import (
    CovarianceStatistics,
    EntanglementStatistics,
    covariance_statistics,
    ctwa_signal,
    entanglement_statistics,
    npo_loss,
    shared_prefix_mask,
)

__version__ = "0.1.0"

__all__ = [
    "CovarianceStatistics",
    "CtwaState",
    "EntanglementStatistics",
    "PamaState",
    "WeightsState",
    "cagrad",
    "combine",
    "covariance_statistics",
    "ctwa_controller_step",
    "ctwa_next_weights",
    "ctwa_reweight",
    "ctwa_signal",
    "entanglement_statistics",
    "gapo_rescale",
    "linear_scalarize",
    "mgda",
    "min_norm_weights",
    "nash_mtl",
    "noon",
    "npo_loss",
    "pama_closed_form",
    "pama_combined_advantage",
    "pama_solve",
    "pama_statistics",
    "pama_token_advantage",
    "pcgrad",
    "per_objective_grads",
    "probe_combined_grads",
    "shared_prefix_mask",
    "tree_gram",
    "upgrad",
    "weighted_combiner",
]
