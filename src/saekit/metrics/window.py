"""Metrics over a window of many batches, accumulated without keeping the batches."""

from __future__ import annotations

import torch

from saekit.metrics.counting import fire_counts
from saekit.metrics.reconstruction import MIN_SHRINKAGE_NORM


class WindowStats:
    """Accumulates, for K stacked SAEs, what mse / fvu / l0 / sparsity / dead / shrinkage need over many batches.

    update(x (B, d), x_hat (K, B, d), codes (K, B, m)); the results equal the batch functions of
    `saekit.metrics` applied to the concatenation of all batches (a test checks this).
    """

    def __init__(self, n_members: int, d: int, dict_size: int, device: torch.device | str = "cpu") -> None:
        kw = {"dtype": torch.float64, "device": device}
        self.n = 0
        self.sq_err = torch.zeros(n_members, **kw)
        self.x_sum = torch.zeros(d, **kw)
        self.x_sq = torch.zeros((), **kw)
        self.active = torch.zeros(n_members, **kw)
        self.abs_sum = torch.zeros(n_members, **kw)
        self.fire_counts = torch.zeros(n_members, dict_size, dtype=torch.long, device=device)
        self.shrink_sum = torch.zeros(n_members, **kw)  # sum of ||x_hat|| / ||x|| over samples with ||x|| > MIN_SHRINKAGE_NORM
        self.shrink_n = torch.zeros((), dtype=torch.long, device=device)
        self.d, self.dict_size = d, dict_size

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor, codes: torch.Tensor) -> None:
        self.n += x.shape[0]
        self.sq_err += (x_hat - x).double().pow(2).sum(dim=(1, 2))
        xd = x.double()
        self.x_sum += xd.sum(dim=0)
        self.x_sq += xd.pow(2).sum()
        counts = fire_counts(codes)  # (K, m)
        self.active += counts.sum(dim=1).double()
        self.abs_sum += codes.abs().double().sum(dim=(1, 2))
        self.fire_counts += counts
        norms = xd.norm(dim=1)
        keep = norms > MIN_SHRINKAGE_NORM
        self.shrink_sum += (x_hat.double().norm(dim=2)[:, keep] / norms[keep]).sum(dim=1)
        self.shrink_n += keep.sum()

    def mse(self) -> torch.Tensor:
        """(K,) mean squared error over samples and dimensions."""
        return self.sq_err / (self.n * self.d)

    def fvu(self) -> torch.Tensor:
        """(K,) sum of squared errors over the total sum of squares about the window's mean."""
        total = self.x_sq - self.x_sum.pow(2).sum() / self.n
        return self.sq_err / total

    def l0(self) -> torch.Tensor:
        """(K,) mean number of active latents per sample."""
        return self.active / self.n

    def shrinkage(self) -> torch.Tensor:
        """(K,) mean of ||x_hat|| / ||x|| over the samples with ||x|| > MIN_SHRINKAGE_NORM (0 when none)."""
        return self.shrink_sum / self.shrink_n.clamp(min=1)

    def sparsity(self, reduction: str) -> torch.Tensor:
        """(K,) the L1 term: mean |c| over latents and samples ("mean") or summed over latents ("sum")."""
        per_sample = self.abs_sum / self.n
        if reduction == "mean":
            return per_sample / self.dict_size
        if reduction == "sum":
            return per_sample
        raise ValueError(f"unknown reduction {reduction!r}; use 'mean' or 'sum'")
