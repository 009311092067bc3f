"""Seed consensus: how many features two SAEs trained from different initialisations both learned."""

from __future__ import annotations

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from saekit.metrics import cosine_matrix, mmcs


def consensus_directions(a: torch.Tensor, b: torch.Tensor, threshold: float = 0.9) -> torch.Tensor:
    """Pool the directions a (n_a, d) and b (n_b, d), link every pair with cosine > `threshold`, and keep the
    connected components holding directions from both: features both SAEs found (copies merged). Returns
    one unit direction per such component, the normalised mean of its members: (count, d)."""
    pooled = torch.nn.functional.normalize(torch.cat([a, b]).double(), dim=1)
    cos = cosine_matrix(pooled, pooled).cpu().numpy()
    rows, cols = np.nonzero(np.triu(cos > threshold, k=1))
    n = pooled.shape[0]
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    shared = sorted(set(labels[: a.shape[0]].tolist()) & set(labels[a.shape[0] :].tolist()))
    if not shared:
        return pooled.new_zeros(0, pooled.shape[1]).float()
    labels_t = torch.from_numpy(labels)
    means = torch.stack([pooled[labels_t == c].mean(dim=0) for c in shared])
    return torch.nn.functional.normalize(means, dim=1).float()


def consensus_count(a: torch.Tensor, b: torch.Tensor, threshold: float = 0.9) -> int:
    """How many features two SAEs both learned (see `consensus_directions`)."""
    return consensus_directions(a, b, threshold).shape[0]


def seed_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean of the two directions' mean max cosine between the live latents of two seeds (1 = same dictionary)."""
    if a.shape[0] == 0 or b.shape[0] == 0:
        return 0.0
    return 0.5 * (mmcs(b, a) + mmcs(a, b))
