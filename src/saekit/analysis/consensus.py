"""Seed consensus: how many features two SAEs trained from different initialisations both learned."""

from __future__ import annotations

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from saekit.metrics import mmcs

LINK_ROWS = 2048  # rows of the cosine matrix built at once when linking directions


def consensus_directions(a: torch.Tensor, b: torch.Tensor, threshold: float = 0.9) -> torch.Tensor:
    """Pool the directions a (n_a, d) and b (n_b, d), link every pair with cosine > `threshold`, and keep the
    connected components holding directions from both: features both SAEs found (copies merged). Returns
    one unit direction per such component, the normalised mean of its members: (count, d).

    The links are found LINK_ROWS rows of the cosine matrix at a time, so memory stays O(n) for any size."""
    pooled = torch.nn.functional.normalize(torch.cat([a, b]).float(), dim=1)
    n = pooled.shape[0]
    rows, cols = [], []
    for start in range(0, n, LINK_ROWS):
        block = pooled[start : start + LINK_ROWS] @ pooled.T  # (rows, n)
        r, c = torch.nonzero(block > threshold, as_tuple=True)
        upper = c > r + start
        rows.append((r[upper] + start).numpy())
        cols.append(c[upper].numpy())
    rows_np, cols_np = (np.concatenate(x) if x else np.zeros(0, dtype=np.int64) for x in (rows, cols))
    graph = coo_matrix((np.ones(len(rows_np)), (rows_np, cols_np)), shape=(n, n))
    n_groups, labels = connected_components(graph, directed=False)
    shared = sorted(set(labels[: a.shape[0]].tolist()) & set(labels[a.shape[0] :].tolist()))
    if not shared:
        return pooled.new_zeros(0, pooled.shape[1])
    labels_t = torch.from_numpy(labels).long()
    sums = torch.zeros(n_groups, pooled.shape[1], dtype=torch.float64).index_add_(0, labels_t, pooled.double())
    return torch.nn.functional.normalize(sums[torch.tensor(shared)], dim=1).float()


def consensus_count(a: torch.Tensor, b: torch.Tensor, threshold: float = 0.9) -> int:
    """How many features two SAEs both learned (see `consensus_directions`)."""
    return consensus_directions(a, b, threshold).shape[0]


def seed_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean of the two directions' mean max cosine between the live latents of two seeds (1 = same dictionary)."""
    if a.shape[0] == 0 or b.shape[0] == 0:
        return 0.0
    return 0.5 * (mmcs(b, a) + mmcs(a, b))
