"""Diagnostics: covariance-law statistics and Interference Index (CTWA), gradient entanglement (margin losses)."""

from mojax.diagnostics.covariance import CovarianceStatistics, covariance_statistics, ctwa_signal
from mojax.diagnostics.entanglement import EntanglementStatistics, entanglement_statistics, npo_loss, shared_prefix_mask

__all__ = [
    "CovarianceStatistics",
    "EntanglementStatistics",
    "covariance_statistics",
    "ctwa_signal",
    "entanglement_statistics",
    "npo_loss",
    "shared_prefix_mask",
]
