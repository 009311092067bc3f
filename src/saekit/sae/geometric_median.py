"""The geometric median of a set of points, used to initialise a decoder bias (Bricken et al. 2023, "Towards Monosemanticity")."""

from __future__ import annotations

import torch


@torch.no_grad()
def geometric_median(x: torch.Tensor, iterations: int = 200, tol: float = 1e-6) -> torch.Tensor:
    """argmin_m sum_i ||x_i - m|| for x (N, d), by Weiszfeld's iteration from the mean; returns (d,) in x's dtype.

    Each step re-weights the points by 1 / their distance to the current estimate (distances floored at 1e-8 so that
    an estimate sitting on a data point does not divide by zero); it stops when the estimate moves less than
    tol x its norm.
    """
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"geometric_median expects (N, d) with N > 0, got {tuple(x.shape)}")
    points = x.double()
    m = points.mean(dim=0)
    for _ in range(iterations):
        w = 1.0 / (points - m).norm(dim=1).clamp_min(1e-8)
        new = (w[:, None] * points).sum(dim=0) / w.sum()
        moved = (new - m).norm()
        m = new
        if moved <= tol * max(m.norm().item(), 1e-12):
            break
    return m.to(x.dtype)
