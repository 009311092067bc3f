"""Pure metric functions on tensors: no files, no training."""

from saekit.metrics.absorption import Absorption, AbsorptionCounts, absorbed_fraction, latents_per_feature, split_count
from saekit.metrics.detection import (
    DetectionCounts,
    DetectionScores,
    Matching,
    best_features,
    detection_scores,
    hungarian_matching,
    mcc,
    uniqueness,
)
from saekit.metrics.reconstruction import DEAD_THRESHOLD, dead_fraction, dense_fraction, fvu, l0, mse, shrinkage, sparsity_term
from saekit.metrics.recovery import cosine_matrix, first_reaching, matched_cosines, max_cosines, mmcs, mmcs_members, recovered_fraction
from saekit.metrics.truth_window import TruthWindow

__all__ = [
    "DEAD_THRESHOLD",
    "Absorption",
    "AbsorptionCounts",
    "DetectionCounts",
    "DetectionScores",
    "Matching",
    "TruthWindow",
    "absorbed_fraction",
    "best_features",
    "cosine_matrix",
    "dead_fraction",
    "dense_fraction",
    "detection_scores",
    "first_reaching",
    "fvu",
    "hungarian_matching",
    "l0",
    "latents_per_feature",
    "matched_cosines",
    "max_cosines",
    "mcc",
    "mmcs",
    "mmcs_members",
    "mse",
    "recovered_fraction",
    "shrinkage",
    "sparsity_term",
    "split_count",
    "uniqueness",
]
