"""Deterministic generators and shuffled epochs: batch t of a stream depends only on (seed, stream, t)."""

from __future__ import annotations

import numpy as np
import torch

from saekit.sources.streams import Stream


def seeded_generator(seed: int, *salt: int) -> torch.Generator:
    """A CPU generator seeded from (seed, *salt) through numpy's SeedSequence (stable across versions)."""
    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence([seed, *salt]).generate_state(1, np.uint64)[0]) & 0x7FFF_FFFF_FFFF_FFFF)
    return g


class EpochSampler:
    """Batches of a fixed dataset (N, d) in shuffled epochs; the permutation of each epoch is seeded."""

    def __init__(self, data: torch.Tensor, seed: int) -> None:
        self.data, self.seed = data, seed
        self.n_samples = data.shape[0]
        self._orders: dict[tuple[int, int], torch.Tensor] = {}

    def _order(self, stream: int, epoch: int) -> torch.Tensor:
        key = (stream, epoch)
        if key not in self._orders:
            if len(self._orders) > 4:
                self._orders.clear()
            perm = torch.randperm(self.n_samples, generator=seeded_generator(self.seed, 0x6570, stream, epoch))
            self._orders[key] = perm.to(self.data.device)
        return self._orders[key]

    def batch(self, batch_size: int, step: int, stream: int = Stream.TRAIN) -> torch.Tensor:
        """Rows [step*B, (step+1)*B) of the concatenated epoch permutations: (B, d)."""
        start = step * batch_size
        first, last = start // self.n_samples, (start + batch_size - 1) // self.n_samples
        order = torch.cat([self._order(stream, e) for e in range(first, last + 1)])
        offset = start - first * self.n_samples
        return self.data[order[offset : offset + batch_size]]
