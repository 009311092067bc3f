"""Reconstruction quality and sparsity of one SAE's output on a batch."""

from __future__ import annotations

import torch

DEAD_THRESHOLD = 0.05  # a dictionary "has dead latents" when this fraction of its latents never fired
MIN_SHRINKAGE_NORM = 1e-6  # samples with a smaller input norm have no shrinkage ratio (as in SAELens)


def mse(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Mean squared error over samples and dimensions, (B, d) each: the report's reconstruction term."""
    return (x_hat.double() - x.double()).pow(2).mean().item()


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Fraction of variance unexplained: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over a batch (B, d)."""
    x, x_hat = x.double(), x_hat.double()
    total = (x - x.mean(dim=0, keepdim=True)).pow(2).sum().item()
    return (x_hat - x).pow(2).sum().item() / total if total > 0 else float("nan")


def shrinkage(x: torch.Tensor, x_hat: torch.Tensor, min_norm: float = MIN_SHRINKAGE_NORM) -> float:
    """Mean over samples of ||x_hat|| / ||x||, (B, d) each, skipping samples with ||x|| <= min_norm (1 means
    no shrinkage; an L1 penalty pulls it below 1). 0 when no sample is left."""
    norms = x.double().norm(dim=1)
    keep = norms > min_norm
    if not keep.any():
        return 0.0
    return (x_hat.double().norm(dim=1)[keep] / norms[keep]).mean().item()


def sparsity_term(codes: torch.Tensor, reduction: str = "mean") -> float:
    """The L1 term before its coefficient, codes (B, m): mean of |c| over latents and batch ("mean",
    the report) or its sum over latents averaged over the batch ("sum")."""
    a = codes.double().abs()
    if reduction == "mean":
        return a.mean().item()
    if reduction == "sum":
        return a.sum(dim=1).mean().item()
    raise ValueError(f"unknown reduction {reduction!r}; use 'mean' or 'sum'")


def l0(codes: torch.Tensor) -> float:
    """Mean number of non-zero latents per sample, codes (B, m)."""
    return (codes != 0).sum(dim=1).double().mean().item()


def dead_fraction(fire_counts: torch.Tensor) -> float:
    """Fraction of latents that never fired: fire_counts (m,) counts activations over a window of samples.
    The window should be long (saekit uses at least 100k fresh samples)."""
    return (fire_counts == 0).double().mean().item()


def dense_fraction(fire_counts: torch.Tensor, n_samples: int, threshold: float = 0.1) -> float:
    """Fraction of latents firing on more than `threshold` of the `n_samples` samples of the window."""
    return (fire_counts.double() / n_samples > threshold).double().mean().item()
