"""How well a learned dictionary recovers known true features (the report's MMCS, and a one-to-one variant)."""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every row of a (n, d) with every row of b (k, d): (n, k), float64.

    An all-zero row has no direction and gets cosine 0 with everything. Any other row is scaled to unit
    norm however small it is (the norm is taken in float64, where no nonzero float32 row's norm is 0)."""
    return _unit_rows(a) @ _unit_rows(b).T


def _unit_rows(a: torch.Tensor) -> torch.Tensor:
    a = a.double()
    norms = a.norm(dim=1, keepdim=True)
    return a / torch.where(norms > 0, norms, torch.ones_like(norms))


def max_cosines(dictionary: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """For each row of `truth` (G, d), its largest cosine with any row of `dictionary` (m, d): (G,)."""
    return cosine_matrix(truth, dictionary).max(dim=1).values


def mmcs(dictionary: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean max cosine similarity (Sharkey et al. 2022): mean over the rows of `truth` of the best
    cosine with any row of `dictionary`. Swap the arguments for the other direction (how well each
    learned direction is explained by some true feature)."""
    return max_cosines(dictionary, truth).mean().item()


def mmcs_members(directions: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """`mmcs` of every member of an ensemble at once, in the directions' dtype (for tracking during
    training): directions (K, m, d) and truth (G, d), both unit rows -> (K,)."""
    cos = torch.matmul(directions, truth.to(directions).T)  # (K, m, G)
    return cos.amax(dim=1).mean(dim=1)


def first_reaching(history: list[dict], name: str, threshold: float) -> int | None:
    """The first `samples` of history rows ({samples, name: value}) at which `name` is >= threshold, or None."""
    for row in history:
        value = row.get(name)
        if value is not None and value >= threshold:
            return int(row["samples"])
    return None


def matched_cosines(dictionary: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Cosines of a one-to-one matching (Hungarian, maximising total cosine) of true features to
    dictionary rows: (min(G, m),). With m < G some true features stay unmatched and count as 0
    in `recovered_fraction`."""
    cos = cosine_matrix(truth, dictionary).cpu().numpy()
    rows, cols = linear_sum_assignment(cos, maximize=True)
    return torch.from_numpy(cos[rows, cols])


def recovered_fraction(dictionary: torch.Tensor, truth: torch.Tensor, threshold: float = 0.9, method: str = "max") -> float:
    """Fraction of true features whose cosine with the dictionary is at least `threshold`.

    method="max": the best cosine with any dictionary row (many-to-one allowed, as MMCS);
    method="matched": the cosine of its partner in a one-to-one matching (as SAELens's MCC).
    """
    if method == "max":
        cos = max_cosines(dictionary, truth)
    elif method == "matched":
        cos = matched_cosines(dictionary, truth)
    else:
        raise ValueError(f"unknown method {method!r}; use 'max' or 'matched'")
    return (cos >= threshold).sum().item() / truth.shape[0]
