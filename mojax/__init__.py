"""mojax: multi-objective alignment for LLMs in JAX/Flax.

Combiners are optax gradient transformations: put one first in an `optax.chain`, feed it
updates whose every leaf carries a leading objective axis of size n, and it returns one update.
The factories, their state types and the per-objective gradient front doors are exported here
(building blocks and the registry stay in `mojax.combiners`), with the diagnostics of
`mojax.diagnostics`; models live in `mojax.models`, the RL trainer in `mojax.rl`.
"""

from mojax import combiners, diagnostics  # noqa: F401 (the subpackages, as attributes of mojax)
from mojax.combiners import (
    CtwaState,
    LagrangianState,
    MinNormState,
    NashMTLState,
    PamaState,
    PCGradState,
    TchebycheffState,
    WeightsState,
    cagrad,
    ctwa_reweight,
    gapo_rescale,
    lagrangian,
    linear_scalarize,
    mgda,
    nash_mtl,
    pama_solve,
    pcgrad,
    per_objective_grads,
    probe_combined_grads,
    tchebycheff,
    upgrad,
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

# Kept equal to combiners.PUBLIC + diagnostics.__all__ (checked by a test).
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
    "CovarianceStatistics",
    "EntanglementStatistics",
    "covariance_statistics",
    "ctwa_signal",
    "entanglement_statistics",
    "npo_loss",
    "shared_prefix_mask",
]
