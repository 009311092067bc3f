"""What the `tms` and `compute` sources share: sparse input features and the loop that trains their model."""

from __future__ import annotations

from collections.abc import Callable

import torch

from saekit.sources.seeding import seeded_generator

MODEL_BATCH = 1024  # samples per Adam step when training a source's model
_FIT_STREAM, _EVAL_STREAM = 0x666974, 0x6576


def sparse_features(batch_size: int, n: int, sparsity: float, generator: torch.Generator, signed: bool = False) -> torch.Tensor:
    """(B, n) float32: each entry is 0 with probability `sparsity`, else Uniform[0, 1) (signed: Uniform[-1, 1))."""
    active = torch.rand(batch_size, n, generator=generator) >= sparsity
    values = torch.rand(batch_size, n, generator=generator)
    if signed:
        values = values * 2 - 1
    return values * active


def fit(
    params: list[torch.Tensor],
    loss_on: Callable[[torch.Tensor], torch.Tensor],
    sample: Callable[[int, torch.Generator], torch.Tensor],
    steps: int,
    seed: int,
    lr: float,
) -> float:
    """Adam on `params` for `steps` steps of fresh batches of MODEL_BATCH; returns the loss on 16 held-out batches.

    loss_on(x) is the model's loss on a batch x; sample(B, generator) draws a batch.
    """
    opt = torch.optim.Adam(params, lr=lr)
    g = seeded_generator(seed, _FIT_STREAM)
    for _ in range(steps):
        loss = loss_on(sample(MODEL_BATCH, g))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    held_out = seeded_generator(seed, _EVAL_STREAM)
    with torch.no_grad():
        return float(torch.stack([loss_on(sample(MODEL_BATCH, held_out)) for _ in range(16)]).mean())
