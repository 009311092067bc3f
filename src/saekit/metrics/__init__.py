"""Pure metric functions on tensors: no files, no training."""

from saekit.metrics.reconstruction import dead_fraction, dense_fraction, fvu, l0, mse, sparsity_term
from saekit.metrics.recovery import cosine_matrix, matched_cosines, max_cosines, mmcs, recovered_fraction

__all__ = [
    "cosine_matrix",
    "dead_fraction",
    "dense_fraction",
    "fvu",
    "l0",
    "matched_cosines",
    "max_cosines",
    "mmcs",
    "mse",
    "recovered_fraction",
    "sparsity_term",
]
