"""Exact per-column counts of 0/1 masks, through a matrix product (a bool tensor's sum over rows is slow on CPU)."""

from __future__ import annotations

import torch

EXACT_ROWS = 2**24  # float32 holds every integer up to 2^24: a sum of at most this many 0/1 values is exact


def column_counts(mask: torch.Tensor) -> torch.Tensor:
    """mask (K, B, m) of 0/1 values, float32 -> (K, m) int64: how many rows are 1 in each column."""
    K, B, m = mask.shape
    counts = torch.zeros(K, m, dtype=torch.long, device=mask.device)
    ones = torch.ones(K, 1, min(B, EXACT_ROWS), dtype=mask.dtype, device=mask.device)
    for start in range(0, B, EXACT_ROWS):
        part = mask[:, start : start + EXACT_ROWS]
        counts += torch.bmm(ones[:, :, : part.shape[1]], part)[:, 0].long()
    return counts


def fired(codes: torch.Tensor) -> torch.Tensor:
    """Where codes (..., m) are non-zero, as float32 0/1 (a latent fires where its code is non-zero)."""
    return (codes != 0).to(torch.float32)
