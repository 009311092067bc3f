"""Feature absorption and feature splitting, measured against known hierarchical features.

Absorption (Chanin et al. 2024, "A is for Absorption"): a latent that tracks a child feature also takes over
its parent's direction, so the parent's own latent stays silent exactly when the child is there. Splitting: one
true feature is represented by several latents. Both use the truth: feature directions (G, d), true codes (B, G)
and, for absorption, each feature's parent (G,) int64 (-1 for none).

Definitions (matching: the one-to-one Hungarian matching of `saekit.metrics.detection.hungarian_matching`,
the one MCC uses):

- Absorbed fraction of a parent p (a feature that is the direct parent of at least one other feature) matched
  to latent l(p): the share of the window's samples with p on (true code > 0) on which l(p) is silent (code 0)
  while the latent matched to at least one of p's direct children fires (code non-zero). Parents left
  unmatched (possible when m < G) and parents that never fire in the window have no value (NaN); children
  left unmatched have no latent and never count as firing. `absorption` is the mean over parents with a value.
- Split count: the number of true features g represented by two or more latents, where latent j represents g
  when g is j's best-matching feature by |cosine| (as for precision and recall), its signed cosine with g is at
  least 0.9, and its precision as a detector of g is at least 0.5 (it fires mostly when g is on).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saekit.errors import InputError
from saekit.metrics.counting import Groups, fire_counts, one_cpu_thread
from saekit.metrics.detection import DetectionCounts, best_features, check_codes, hungarian_matching

SPLIT_COSINE = 0.9  # a latent represents a feature only with at least this cosine to it ...
SPLIT_PRECISION = 0.5  # ... and when at least this share of its firings fall where the feature is on


def check_parent(parent: torch.Tensor, n_features: int) -> None:
    """InputError unless parent is (G,) integer with entries in [-1, G) and no feature its own parent."""
    if parent.ndim != 1 or parent.shape[0] != n_features or parent.is_floating_point() or parent.dtype == torch.bool:
        raise InputError(f"parent must be ({n_features},) integer feature indices, got {tuple(parent.shape)} {parent.dtype}")
    if parent.numel() and (parent.min() < -1 or parent.max() >= n_features):
        raise InputError(f"parent holds an index outside [-1, {n_features})")
    if (parent == torch.arange(n_features, device=parent.device)).any():
        raise InputError("a feature cannot be its own parent")


def has_parents(parent: torch.Tensor | None) -> bool:
    """Whether a source's `parent` (G,) names any parent at all."""
    return parent is not None and bool((parent >= 0).any())


class AbsorptionCounts:
    """Per parent feature, its firings and the absorbed ones (see the module docstring), for K stacked SAEs.

    parent: (G,) int64; latent_of: (K, G) int64, each feature's matched latent or -1.
    update(latents (K, B, m), codes (B, G)) looks only at the samples where a parent is on, and at that parent's
    children there; `fractions()` (K, P) and `means()` at the end.
    """

    def __init__(self, parent: torch.Tensor, latent_of: torch.Tensor) -> None:
        n_features = latent_of.shape[1]
        check_parent(parent, n_features)
        device = latent_of.device
        parent = parent.to(device)
        self.latent_of = latent_of
        self.parents = parent[parent >= 0].unique()  # (P,) sorted
        self.slot = torch.full((n_features,), -1, dtype=torch.long, device=device)  # feature -> its index in parents
        self.slot[self.parents] = torch.arange(len(self.parents), device=device)
        self.children = (parent >= 0).nonzero()[:, 0]  # (C,)
        self.by_parent = Groups(self.slot[parent[self.children]], len(self.parents))  # items: positions in children
        self.parent_on = torch.zeros(len(self.parents), dtype=torch.long, device=device)
        self.absorbed = torch.zeros(latent_of.shape[0], len(self.parents), dtype=torch.long, device=device)

    @torch.no_grad()
    def update(self, latents: torch.Tensor, codes: torch.Tensor) -> None:
        K = self.latent_of.shape[0]
        if latents.ndim != 3 or latents.shape[0] != K:
            raise InputError(f"latents must have shape ({K}, B, m), got {tuple(latents.shape)}")
        check_codes(codes, latents.shape[1], self.latent_of.shape[1])
        with one_cpu_thread(codes.device):
            rows, slots = (codes[:, self.parents] > 0).nonzero(as_tuple=True)  # (sample, parent) pairs with the parent on
            P = len(self.parents)
            self.parent_on += torch.bincount(slots, minlength=P)
            for k in range(K):
                own = self.latent_of[k, self.parents[slots]]  # unmatched parents (-1) are dropped in fractions()
                silent = latents[k, rows, own.clamp(min=0)] == 0
                child_fired = torch.zeros(len(rows), dtype=torch.long, device=rows.device)
                for pair, item in self.by_parent.members(slots):
                    child = self.latent_of[k, self.children[item]]
                    fires = (child >= 0) & (latents[k, rows[pair], child.clamp(min=0)] != 0)
                    child_fired += torch.bincount(pair[fires], minlength=len(rows))
                self.absorbed[k] += torch.bincount(slots[silent & (child_fired > 0)], minlength=P)

    def fractions(self) -> torch.Tensor:
        """(K, P) float64: each parent's absorbed fraction, NaN for parents unmatched or never on."""
        frac = self.absorbed.double() / self.parent_on.double().clamp(min=1)
        matched = self.latent_of[:, self.parents] >= 0
        return torch.where(matched & (self.parent_on > 0), frac, torch.full_like(frac, float("nan")))

    def means(self) -> list[float | None]:
        """Per member, the mean absorbed fraction over parents with a value (None when no parent has one)."""
        out: list[float | None] = []
        for row in self.fractions():
            valid = row[~row.isnan()]
            out.append(valid.mean().item() if valid.numel() else None)
        return out


@dataclass(frozen=True)
class Absorption:
    """One SAE's absorption: `parents` (P,) feature indices, `fractions` (P,) their absorbed fractions (NaN: no
    value), and `mean` over the parents with a value (None when none has)."""

    parents: torch.Tensor
    fractions: torch.Tensor
    mean: float | None


def absorbed_fraction(
    latents: torch.Tensor, codes: torch.Tensor, parent: torch.Tensor, dictionary: torch.Tensor, truth: torch.Tensor
) -> Absorption:
    """Absorption of one SAE on one batch: latents (N, m), codes (N, G), parent (G,), dictionary (m, d), truth
    (G, d). For a long window, feed `AbsorptionCounts` batch by batch instead."""
    latent_of = hungarian_matching(dictionary, truth).latent_of(truth.shape[0]).to(latents.device)
    counts = AbsorptionCounts(parent, latent_of[None])
    counts.update(latents[None], codes)
    return Absorption(counts.parents, counts.fractions()[0], counts.means()[0])


def latents_per_feature(
    best: torch.Tensor,
    best_cosine: torch.Tensor,
    precision: torch.Tensor,
    n_features: int,
    cosine: float = SPLIT_COSINE,
    min_precision: float = SPLIT_PRECISION,
) -> torch.Tensor:
    """How many latents represent each true feature (see the module docstring): best, best_cosine and
    precision (K, m) per latent (from `best_features` and `DetectionCounts`) -> (K, G) int64."""
    represents = (best_cosine >= cosine) & (precision >= min_precision)  # (K, m)
    counts = torch.zeros(best.shape[0], n_features, dtype=torch.long, device=best.device)
    return counts.scatter_add_(1, best, represents.long())


def split_count(latents: torch.Tensor, codes: torch.Tensor, dictionary: torch.Tensor, truth: torch.Tensor) -> int:
    """Split count of one SAE on one batch (latents (N, m), codes (N, G), dictionary (m, d), truth (G, d)): the
    number of true features represented by two or more latents."""
    best, cos = best_features(dictionary, truth)
    counts = DetectionCounts(best[None], truth.shape[0])
    counts.update(latents[None], codes)
    per_feature = latents_per_feature(best[None], cos[None], counts.scores(fire_counts(latents[None])).precision, truth.shape[0])
    return int((per_feature >= 2).sum())
