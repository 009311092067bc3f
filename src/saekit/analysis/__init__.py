"""The report's heuristics across runs and the feature-count / hyperparameter estimate (no ground truth)."""

from saekit.analysis.consensus import consensus_count, consensus_directions, seed_agreement
from saekit.analysis.estimate import estimate, recommend
from saekit.analysis.heuristics import collapse_points, consensus_table, cross_size_table, dead_table, heuristics, loss_table, power_law_fit
from saekit.analysis.sweep import Sweep, load_sweep

__all__ = [
    "Sweep",
    "collapse_points",
    "consensus_count",
    "consensus_directions",
    "consensus_table",
    "cross_size_table",
    "dead_table",
    "estimate",
    "heuristics",
    "load_sweep",
    "loss_table",
    "power_law_fit",
    "recommend",
    "seed_agreement",
]
