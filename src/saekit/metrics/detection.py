"""SAE latents scored against known features the way SAELens's SynthSAEBench scores them.

Dictionary-only metrics: `mcc` (mean |cosine| of a one-to-one Hungarian matching of latents to true features)
and `uniqueness` (distinct best-matching true features per latent). Window metrics, accumulated batch by batch
(`DetectionCounts`): each latent as a binary detector of its best-matching true feature (by |cosine| of its
decoder direction), with per-latent precision, recall, F1 and accuracy, and their means over all latents.

Shapes: dictionary (m, d) decoder directions (any norm), truth (G, d) true feature directions, latents
(K, B, m) codes of K stacked SAEs, codes (B, G) true feature activations (0 where a feature is off).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment

from saekit.errors import InputError
from saekit.metrics.counting import Groups, fire_counts, one_cpu_thread
from saekit.metrics.recovery import cosine_matrix


def check_directions(dictionary: torch.Tensor, truth: torch.Tensor) -> None:
    """InputError unless dictionary (m, d) and truth (G, d) are finite non-empty matrices of one width."""
    for name, t in (("dictionary", dictionary), ("truth", truth)):
        if t.ndim != 2 or t.shape[0] == 0 or t.shape[1] == 0:
            raise InputError(f"{name} must be a non-empty (rows, d) matrix, got shape {tuple(t.shape)}")
        if not torch.isfinite(t).all():
            raise InputError(f"{name} holds NaN or Inf")
    if dictionary.shape[1] != truth.shape[1]:
        raise InputError(f"dictionary has width {dictionary.shape[1]} but truth has width {truth.shape[1]}")


@dataclass(frozen=True)
class Matching:
    """A one-to-one matching of true features to latents: pairs (features[i], latents[i]) with |cosine| cosines[i],
    min(G, m) pairs, each tensor (n,)."""

    features: torch.Tensor
    latents: torch.Tensor
    cosines: torch.Tensor

    def latent_of(self, n_features: int) -> torch.Tensor:
        """(G,) int64: the latent matched to each true feature, -1 for features left unmatched (when m < G)."""
        out = torch.full((n_features,), -1, dtype=torch.long)
        out[self.features] = self.latents
        return out


def hungarian_matching(dictionary: torch.Tensor, truth: torch.Tensor) -> Matching:
    """The one-to-one matching of true features to latents that maximises the total |cosine| (Hungarian
    algorithm, scipy's linear_sum_assignment), as SynthSAEBench's MCC matches them."""
    check_directions(dictionary, truth)
    return matching_from_cosines(cosine_matrix(truth, dictionary))


def matching_from_cosines(cos: torch.Tensor) -> Matching:
    """`hungarian_matching` from the cosine matrix (G, m) of true features with latents (finite)."""
    cos = cos.abs().cpu()
    rows, cols = linear_sum_assignment(cos.numpy(), maximize=True)
    features, latents = torch.from_numpy(rows).long(), torch.from_numpy(cols).long()
    return Matching(features, latents, cos[features, latents])


def mcc(dictionary: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean correlation coefficient: the mean |cosine| over the min(G, m) pairs of `hungarian_matching`."""
    return hungarian_matching(dictionary, truth).cosines.mean().item()


def best_features(dictionary: torch.Tensor, truth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each latent, the true feature of largest |cosine| with its direction and that (signed) cosine:
    ((m,) int64, (m,) float64). Many latents may share a feature."""
    check_directions(dictionary, truth)
    return best_from_cosines(cosine_matrix(truth, dictionary))


def best_from_cosines(cos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`best_features` from the cosine matrix (G, m) of true features with latents."""
    best = cos.abs().argmax(dim=0)
    return best, cos.gather(0, best[None])[0]


def uniqueness(dictionary: torch.Tensor, truth: torch.Tensor) -> float:
    """Number of distinct true features that are some latent's best match, over the number of latents m
    (1 when every latent tracks a different feature; dead latents count too)."""
    best, _ = best_features(dictionary, truth)
    return best.unique().numel() / dictionary.shape[0]


def check_codes(codes: torch.Tensor, batch: int, n_features: int) -> None:
    """InputError unless codes is a finite (batch, n_features) matrix."""
    if codes.ndim != 2 or tuple(codes.shape) != (batch, n_features):
        raise InputError(f"true codes must have shape ({batch}, {n_features}), got {tuple(codes.shape)}")
    if codes.numel() and not all(torch.isfinite(v) for v in torch.aminmax(codes)):  # NaN propagates to min and max
        raise InputError("true codes hold NaN or Inf")


@dataclass(frozen=True)
class DetectionScores:
    """Per-latent scores of K stacked SAEs, each (K, m) float64; a ratio with a zero denominator is 0."""

    precision: torch.Tensor  # TP / (TP + FP): of the samples where the latent fires, the share where its feature is on
    recall: torch.Tensor  # TP / (TP + FN): of the samples where its feature is on, the share where the latent fires
    f1: torch.Tensor  # 2 P R / (P + R)
    accuracy: torch.Tensor  # (TP + TN) / N

    def means(self) -> dict[str, torch.Tensor]:
        """Means over latents, (K,) each, as SynthSAEBench reports them: precision, recall, f1, accuracy."""
        return {name: getattr(self, name).mean(dim=1) for name in ("precision", "recall", "f1", "accuracy")}


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))


class DetectionCounts:
    """Confusion counts of every latent of K stacked SAEs as a detector of one true feature each, over a window.

    best: (K, m) int64, the feature each latent is scored against (`best_features`); a latent fires where its
    code is non-zero, a feature is on where its true code is > 0. update(latents (K, B, m), codes (B, G)) counts
    true positives from the samples' active features only (true codes are sparse), so a batch costs about its
    number of active features, not B x m. How often each latent fired is counted elsewhere (`WindowStats`,
    `counting.fire_counts`) and given to `scores`.
    """

    def __init__(self, best: torch.Tensor, n_features: int) -> None:
        if best.ndim != 2 or (best.numel() and (best.min() < 0 or best.max() >= n_features)):
            raise InputError(f"best must be (K, m) feature indices below {n_features}")
        self.best, self.n_features, self.n = best, n_features, 0
        K, m = best.shape
        self.by_feature = [Groups(best[k], n_features) for k in range(K)]  # each member's latents by best feature
        self.true_positives = torch.zeros(K, m, dtype=torch.long, device=best.device)
        self.feature_on = torch.zeros(n_features, dtype=torch.long, device=best.device)

    @torch.no_grad()
    def update(self, latents: torch.Tensor, codes: torch.Tensor) -> None:
        K, m = self.best.shape
        if latents.ndim != 3 or latents.shape[0] != K or latents.shape[2] != m:
            raise InputError(f"latents must have shape ({K}, B, {m}), got {tuple(latents.shape)}")
        check_codes(codes, latents.shape[1], self.n_features)
        with one_cpu_thread(codes.device):
            rows, features = (codes > 0).nonzero(as_tuple=True)  # the active (sample, feature) pairs
            self.feature_on += torch.bincount(features, minlength=self.n_features)
            for k in range(K):
                for pair, latent in self.by_feature[k].members(features):  # latents whose best feature is on
                    hit = latents[k, rows[pair], latent] != 0
                    self.true_positives[k] += torch.bincount(latent[hit], minlength=m)
        self.n += latents.shape[1]

    def scores(self, fires: torch.Tensor) -> DetectionScores:
        """The scores, given how often each latent fired over the same window: fires (K, m) (`fire_counts`)."""
        tp = self.true_positives.double()
        fires, on = fires.to(tp).reshape(tp.shape), self.feature_on[self.best].double()  # (K, m) each
        precision, recall = _ratio(tp, fires), _ratio(tp, on)
        f1 = _ratio(2 * precision * recall, precision + recall)
        true_negatives = self.n - fires - on + tp
        accuracy = (tp + true_negatives) / max(self.n, 1)
        return DetectionScores(precision, recall, f1, accuracy)


def detection_scores(latents: torch.Tensor, codes: torch.Tensor, dictionary: torch.Tensor, truth: torch.Tensor) -> DetectionScores:
    """Per-latent scores of one SAE on one batch: latents (N, m), codes (N, G), dictionary (m, d), truth (G, d).
    The returned tensors are (1, m). For a long window, feed `DetectionCounts` batch by batch instead."""
    best, _ = best_features(dictionary, truth)
    counts = DetectionCounts(best[None], truth.shape[0])
    counts.update(latents[None], codes)
    return counts.scores(fire_counts(latents[None]))
