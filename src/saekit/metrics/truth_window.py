"""The known-feature metrics of K stacked SAEs over an evaluation window, accumulated batch by batch.

From the dictionary alone: `mcc` and `uniqueness` (`saekit.metrics.detection`). From the window's latents and true
codes: mean `precision`, `recall` and `f1` of the latents as feature detectors, `split` (features with two or
more latents) and, when some feature has a parent, `absorption` (`saekit.metrics.absorption`).
"""

from __future__ import annotations

from typing import Any

import torch

from saekit.errors import InputError
from saekit.metrics.absorption import AbsorptionCounts, has_parents, latents_per_feature
from saekit.metrics.detection import DetectionCounts, best_from_cosines, check_directions, matching_from_cosines
from saekit.metrics.recovery import cosine_matrix

# the keys `TruthWindow.rows` may give, in the order the final evaluation adds them
TRUTH_KEYS = ("mcc", "uniqueness", "precision", "recall", "f1", "split", "absorption")


class TruthWindow:
    """directions (K, m, d), truth (G, d), parent (G,) int64 or None; update(latents (K, B, m), codes (B, G)),
    then rows(fire_counts).

    A member whose directions are not finite (a diverged SAE) gets no values; its latents are still fed along."""

    def __init__(self, directions: torch.Tensor, truth: torch.Tensor, parent: torch.Tensor | None = None) -> None:
        if directions.ndim != 3:
            raise InputError(f"directions must be (K, m, d), got shape {tuple(directions.shape)}")
        K, m, d = directions.shape
        check_directions(torch.ones(1, d), truth)  # the truth's shape, width and values
        G = truth.shape[0]
        self.finite = [bool(torch.isfinite(directions[k]).all()) for k in range(K)]
        self.mcc, self.uniqueness = [float("nan")] * K, [float("nan")] * K
        best = torch.zeros(K, m, dtype=torch.long, device=directions.device)
        self.best_cosine = torch.zeros(K, m, dtype=torch.float64, device=directions.device)
        latent_of = torch.full((K, G), -1, dtype=torch.long)
        for k in (k for k in range(K) if self.finite[k]):
            cos = cosine_matrix(truth, directions[k])  # (G, m)
            matching = matching_from_cosines(cos)
            self.mcc[k] = matching.cosines.mean().item()
            latent_of[k] = matching.latent_of(G)
            best[k], self.best_cosine[k] = best_from_cosines(cos)
            self.uniqueness[k] = best[k].unique().numel() / m
        self.detection = DetectionCounts(best, G)
        self.absorption = AbsorptionCounts(parent, latent_of.to(directions.device)) if has_parents(parent) else None

    @torch.no_grad()
    def update(self, latents: torch.Tensor, codes: torch.Tensor) -> None:
        self.detection.update(latents, codes)
        if self.absorption is not None:
            self.absorption.update(latents, codes)

    def rows(self, fire_counts: torch.Tensor) -> list[dict[str, Any]]:
        """Per member, the metrics of TRUTH_KEYS it has: mcc and uniqueness always (finite members), the others
        once codes were seen, absorption only with parents (None when no parent fired or was matched).
        fire_counts (K, m): how often each latent fired over the same samples (`WindowStats.fire_counts`)."""
        K = len(self.finite)
        rows: list[dict[str, Any]] = [{"mcc": self.mcc[k], "uniqueness": self.uniqueness[k]} for k in range(K)]
        if self.detection.n > 0:
            scores = self.detection.scores(fire_counts)
            means = {name: v.tolist() for name, v in scores.means().items()}
            per_feature = latents_per_feature(self.detection.best, self.best_cosine, scores.precision, self.detection.n_features)
            split = (per_feature >= 2).sum(dim=1).tolist()
            absorbed = self.absorption.means() if self.absorption is not None else None
            for k, row in enumerate(rows):
                row.update(precision=means["precision"][k], recall=means["recall"][k], f1=means["f1"][k], split=int(split[k]))
                if absorbed is not None:
                    row["absorption"] = absorbed[k]
        return [row if self.finite[k] else {} for k, row in enumerate(rows)]
