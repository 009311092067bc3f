"""Seed consensus: how many features two SAEs trained from different initialisations both learned."""

from __future__ import annotations

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from saekit.metrics import cosine_matrix, mmcs


def consensus_count(a: torch.Tensor, b: torch.Tensor, threshold: float = 0.9) -> int:
    """Pool the directions a (n_a, d) and b (n_b, d), link every pair with cosine > `threshold`, and count
    the connected components holding directions from both: features both SAEs found (copies merged)."""
    pooled = torch.cat([a, b])
    cos = cosine_matrix(pooled, pooled).cpu().numpy()
    rows, cols = np.nonzero(np.triu(cos > threshold, k=1))
    n = pooled.shape[0]
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    from_a = set(labels[: a.shape[0]].tolist())
    from_b = set(labels[a.shape[0] :].tolist())
    return len(from_a & from_b)


def seed_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean of the two directions' mean max cosine between the live latents of two seeds (1 = same dictionary)."""
    if a.shape[0] == 0 or b.shape[0] == 0:
        return 0.0
    return 0.5 * (mmcs(b, a) + mmcs(a, b))
