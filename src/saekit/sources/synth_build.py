"""Generating a synthetic model from `source.*` keys: saekit's own implementation of SynthSAEBench's generator.

The recipe (Chanin & Garriga-Alonso 2026, "SynthSAEBench"; SAELens's sae_lens.synthetic):

- firing probabilities over feature ranks 1..G: zipfian p ~ rank^-exponent, mapped linearly onto
  [firing_min, firing_max]; linear from firing_max down to firing_min; random uniform in that range;
  constant firing_max;
- a forest: features 0..roots-1 are roots; breadth first, each node above `depth` gets `branching` children
  with the next free indices (so frequent features are parents); a random `exclusive_portion` of the parents
  have mutually exclusive children. Compensation multiplies a child's probability by 1 / p(parent) and, in an
  exclusive group, by 1 + (sum of its siblings' p) / p(parent), then caps it at 1;
- a low-rank copula: factor entries N(0, scale^2); rows whose squared norm would leave a diagonal below 0.01
  are shrunk to squared norm 0.99; diag = 1 - squared row norm;
- magnitudes: mean linear from mean_first (feature 0) to mean_last (feature G-1); std per feature
  |N(std, std_spread^2)| (std itself when std_spread is 0);
- directions: Gaussian rows made unit, then `orthogonalize_steps` Adam steps on
  sum_{i != j} (f_i . f_j)^2 + G * sum_i (|f_i|^2 - 1)^2, then made unit again;
- bias: a random direction of norm bias_norm (0: none).

Random draws use saekit's seeded generators (one salt per part), so a seed gives the same model on every
machine; it is not SAELens's model for the same seed.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from saekit.sources.seeding import seeded_generator
from saekit.sources.synth_model import SynthModel

_SALTS = {"probs": 0x7370, "forest": 0x7366, "corr": 0x7363, "mags": 0x736D, "dict": 0x7364, "bias": 0x7362}
_MIN_DIAG = 0.01  # the smallest diagonal the copula keeps (SAELens's generate_random_low_rank_correlation_matrix)

FiringKind = Literal["zipfian", "linear", "random", "constant"]


def firing_probabilities(kind: FiringKind, G: int, high: float, low: float, exponent: float, seed: int) -> torch.Tensor:
    """(G,) float64 probabilities in [low, high], feature 0 the most frequent (except `random`)."""
    if kind == "constant":
        return torch.full((G,), high, dtype=torch.float64)
    if G == 1:
        return torch.tensor([high], dtype=torch.float64)
    if kind == "linear":
        return torch.linspace(high, low, G, dtype=torch.float64)
    if kind == "random":
        return low + (high - low) * torch.rand(G, dtype=torch.float64, generator=seeded_generator(seed, _SALTS["probs"]))
    power = torch.arange(1, G + 1, dtype=torch.float64) ** -exponent
    return low + (high - low) * (power - power[-1]) / (power[0] - power[-1])


def forest(G: int, roots: int, branching: int, depth: int, exclusive_portion: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(parent (G,) int64, exclusive (G,) bool): roots 0..roots-1, children numbered breadth first."""
    parent = torch.full((G,), -1, dtype=torch.long)
    level = list(range(min(roots, G)))
    next_free, parents_with_children = len(level), []
    for _ in range(depth):
        children_level = []
        for node in level:
            children = list(range(next_free, min(next_free + branching, G)))
            next_free += len(children)
            parent[children] = node
            children_level += children
            if len(children) >= 2:
                parents_with_children.append(node)
        level = children_level
    exclusive = torch.zeros(G, dtype=torch.bool)
    n_exclusive = int(len(parents_with_children) * exclusive_portion)
    if n_exclusive:
        pick = torch.randperm(len(parents_with_children), generator=seeded_generator(seed, _SALTS["forest"]))[:n_exclusive]
        exclusive[torch.tensor(parents_with_children)[pick]] = True
    return parent, exclusive


def exclusive_groups(parent: torch.Tensor, exclusive: torch.Tensor) -> torch.Tensor:
    """(G,) int64: each exclusive parent's children share a group id (0, 1, ... in parent order); -1 elsewhere."""
    ids = torch.full((parent.shape[0],), -1, dtype=torch.long)
    ids[exclusive] = torch.arange(int(exclusive.sum()))
    return torch.where(parent >= 0, ids[parent.clamp(min=0)], -1)


def compensate(base: torch.Tensor, parent: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Sampling probabilities (G,) that bring each child's rate back near its base probability, capped at 1."""
    has_parent = parent >= 0
    parent_p = torch.where(has_parent, base[parent.clamp(min=0)], 1.0)
    factor = torch.where(parent_p > 0, 1 / parent_p, 1.0)
    members = group >= 0
    if bool(members.any()):
        sums = torch.zeros(int(group.max()) + 1, dtype=base.dtype).index_add_(0, group[members], base[members])
        others = (sums[group[members]] - base[members]).clamp_min(0)
        factor[members] *= torch.where(parent_p[members] > 0, 1 + others / parent_p[members], 1.0)
    return (base * factor).clamp(max=1.0)


def low_rank_copula(G: int, rank: int, scale: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(factor (G, rank), diag (G,)) float32 with diag = 1 - |factor row|^2 >= 0.01."""
    factor = torch.randn(G, rank, generator=seeded_generator(seed, _SALTS["corr"]), dtype=torch.float64) * scale
    sq = (factor**2).sum(dim=1)
    capped = 1 - sq < _MIN_DIAG
    factor[capped] *= ((1 - _MIN_DIAG) / sq[capped]).sqrt()[:, None]
    diag = 1 - (factor**2).sum(dim=1)
    return factor.float(), diag.float()


def magnitudes(G: int, mean_first: float, mean_last: float, std: float, std_spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (G,), std (G,)) float32 (see the module docstring)."""
    mean = torch.linspace(mean_first, mean_last, G, dtype=torch.float64) if G > 1 else torch.tensor([mean_first], dtype=torch.float64)
    stds = torch.full((G,), std, dtype=torch.float64)
    if std_spread > 0:
        stds = (std + std_spread * torch.randn(G, dtype=torch.float64, generator=seeded_generator(seed, _SALTS["mags"]))).abs()
    return mean.float(), stds.float()


def orthogonalize(
    vectors: torch.Tensor, steps: int, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
) -> torch.Tensor:
    """Adam on sum_{i != j} (f_i . f_j)^2 + G sum_i (|f_i|^2 - 1)^2, then unit rows: (G, d) -> (G, d).

    The gradient is 4 (F (F^T F) - |f_i|^2 f_i) + 4 G (|f_i|^2 - 1) f_i, computed through the (d, d) Gram
    matrix F^T F (cost G d^2 a step, not G^2 d). Adam as torch.optim.Adam defines it (bias-corrected moments)."""
    G = vectors.shape[0]
    F = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-8)
    m, v = torch.zeros_like(F), torch.zeros_like(F)
    for t in range(1, steps + 1):
        sq = (F * F).sum(dim=1, keepdim=True)
        grad = 4 * (F @ (F.T @ F) - sq * F) + 4 * G * (sq - 1) * F
        m.mul_(betas[0]).add_(grad, alpha=1 - betas[0])
        v.mul_(betas[1]).addcmul_(grad, grad, value=1 - betas[1])
        step = lr / (1 - betas[0] ** t)
        F = F - step * m / ((v / (1 - betas[1] ** t)).sqrt() + eps)
    return F / F.norm(dim=1, keepdim=True).clamp_min(1e-8)


def directions(G: int, d: int, steps: int, lr: float, seed: int) -> torch.Tensor:
    """(G, d) float32 unit feature vectors, orthogonalised for `steps` Adam steps."""
    vectors = torch.randn(G, d, generator=seeded_generator(seed, _SALTS["dict"]))
    vectors = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-8)
    with torch.no_grad():
        return orthogonalize(vectors, steps, lr) if steps > 0 else vectors


def random_bias(d: int, norm: float, seed: int) -> torch.Tensor:
    """(d,) float32: a random direction of length `norm` (zeros when norm is 0)."""
    if norm == 0:
        return torch.zeros(d)
    b = torch.randn(d, generator=seeded_generator(seed, _SALTS["bias"]))
    return b / b.norm() * norm


def build_model(keys: dict, vectors: torch.Tensor | None = None) -> SynthModel:
    """The model the generator keys describe (`keys`: SynthSource's arguments); `vectors` (G, d) when already made."""
    G, d, seed = keys["n_features"], keys["d"], keys["seed"]
    base = firing_probabilities(keys["firing"], G, keys["firing_max"], keys["firing_min"], keys["firing_exponent"], seed)
    if keys["hierarchy_roots"] > 0:
        parent, exclusive = forest(
            G, keys["hierarchy_roots"], keys["hierarchy_branching"], keys["hierarchy_depth"], keys["exclusive_portion"], seed
        )
    else:
        parent, exclusive = torch.full((G,), -1, dtype=torch.long), torch.zeros(G, dtype=torch.bool)
    group = exclusive_groups(parent, exclusive)
    probs = compensate(base, parent, group) if keys["hierarchy_compensate"] else base
    factor = diag = None
    if keys["correlation_rank"] > 0 and keys["correlation_scale"] > 0:
        factor, diag = low_rank_copula(G, keys["correlation_rank"], keys["correlation_scale"], seed)
    mean, std = magnitudes(
        G, keys["magnitude_mean"], keys["magnitude_mean_last"], keys["magnitude_std"], keys["magnitude_std_spread"], seed
    )
    if vectors is None:
        vectors = directions(G, d, keys["orthogonalize_steps"], keys["orthogonalize_lr"], seed)
    rescale = (parent >= 0) & torch.tensor(bool(keys["hierarchy_scale_children"]))
    return SynthModel(
        vectors=vectors, bias=random_bias(d, keys["bias_norm"], seed), sampling_probs=probs, mean=mean, std=std,
        parent=parent, rescale=rescale, group=group, exclusive=exclusive, factor=factor, diag=diag,
    )


def expected_active(probs: torch.Tensor) -> float:
    """Mean number of active features per sample (the sum of the realised rates)."""
    return math.fsum(probs.tolist())
