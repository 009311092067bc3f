"""Pure metric functions on tensors: no files, no training."""

from saekit.metrics.reconstruction import DEAD_THRESHOLD, dead_fraction, dense_fraction, fvu, l0, mse, sparsity_term
from saekit.metrics.recovery import cosine_matrix, first_reaching, matched_cosines, max_cosines, mmcs, mmcs_members, recovered_fraction

__all__ = [
    "DEAD_THRESHOLD",
    "cosine_matrix",
    "dead_fraction",
    "dense_fraction",
    "first_reaching",
    "fvu",
    "l0",
    "matched_cosines",
    "max_cosines",
    "mmcs",
    "mmcs_members",
    "mse",
    "recovered_fraction",
    "sparsity_term",
]
