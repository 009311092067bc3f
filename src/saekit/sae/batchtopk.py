"""BatchTopK sparse autoencoders: the top k*B activations of a whole batch, a single threshold at inference.

Bussmann, Leask & Nanda (2024), "BatchTopK Sparse Autoencoders". In training,
each member keeps the k*B largest of ReLU(W_e^T (x - b_d) + b_e) over the batch
(B samples x m latents), so a sample may use more or fewer than k latents while
the batch averages k. The smallest activation kept in each batch feeds a running
mean, the persistent buffer `threshold` (K,):

    threshold <- (1 - threshold_momentum) * threshold + threshold_momentum * smallest kept

(the first batch sets it directly; until then it is -1 and the threshold is off).
`encode` (evaluation, dashboards) does not look at the batch: z = a * (a > threshold),
a = ReLU(pre-activations). Everything else (unit-norm decoder, encoder initialised as
its transpose, AuxK on dead latents) is the TopK SAE's.
"""

from __future__ import annotations

from typing import Any

import torch

from saekit.archspec import BATCHTOPK
from saekit.sae.sparse_decode import decode_batch_topk
from saekit.sae.topk import TopKSAE

DEFAULTS = BATCHTOPK.constructor_defaults()


class BatchTopKSAE(TopKSAE):
    """K BatchTopK SAEs; member i keeps k[i]*B activations per training batch of B samples.

    Parameters as `TopKSAE`; one more persistent buffer, `threshold` (K,), the inference threshold.
    Training decodes the kept entries with `decode_batch_topk` (sparse or dense, whichever is faster for the shape).
    """

    arch = "batchtopk"
    # Set by data-parallel training (saekit.train.data_parallel.DataParallel): takes the top k*B over every rank's
    # rows of the batch. None: this process's batch is the whole batch.
    batch_group: Any = None

    def __init__(
        self,
        d: int,
        dict_size: int,
        seeds: list[int],
        k: list[int],
        aux_k: int | None = DEFAULTS["aux_k"],
        aux_coef: float = DEFAULTS["aux_coef"],
        dead_after: int = DEFAULTS["dead_after"],
        threshold_momentum: float = DEFAULTS["threshold_momentum"],
        decoder_bias: bool = DEFAULTS["decoder_bias"],
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__(d, dict_size, seeds, k, aux_k, aux_coef, dead_after, decoder_bias, device)
        if not 0 < threshold_momentum <= 1:
            raise ValueError(f"threshold_momentum must be in (0, 1], got {threshold_momentum}")
        self.threshold_momentum = float(threshold_momentum)
        self.register_buffer("threshold", torch.full((self.n_members,), -1.0, device=device))  # (K,); < 0 = not yet set

    def init_kwargs(self) -> dict:
        return {**super().init_kwargs(), "threshold_momentum": self.threshold_momentum}

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The inference path: x (B, d) or (K, B, d) -> a * (a > threshold), a = ReLU(pre-activations): (K, B, m)."""
        acts = self.pre_activations(x).relu()
        return acts * (acts > self.threshold[:, None, None])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, d) -> (x_hat (K, B, d), c (K, B, m)) through the threshold (inference path)."""
        c = self.encode(x)
        return self.decode(c), c

    def batch_top_k(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """pre: (K, B, m) -> (values (K, n), flat_indices (K, n) into the flattened (B, m) codes, smallest kept
        activation per member (K,), NaN when none is positive), n = max(k) * B. Member i keeps its k[i]*B largest
        ReLU activations over the whole batch; its entries beyond those (and any that are not positive) are 0.
        In data-parallel training the whole batch is every rank's rows (`batch_group`)."""
        if self.batch_group is not None:
            return self.batch_group.batch_top_k(self, pre)
        K, B, m = pre.shape
        values, indices = pre.relu().reshape(K, B * m).topk(min(max(self.k_values) * B, B * m), dim=1, sorted=True)
        kept = self.kept_entries(values, B)
        values = values * kept
        smallest = values.detach().masked_fill(~kept, float("inf")).amin(dim=1)
        return values, indices, torch.where(kept.any(dim=1), smallest, torch.full_like(smallest, float("nan")))

    def kept_entries(self, values: torch.Tensor, rows: int) -> torch.Tensor:
        """(K, n) bool for values (K, n) sorted in decreasing order: the entries among member i's k[i]*rows
        largest that are positive."""
        kept = torch.arange(values.shape[1], device=values.device)[None, :] < self.k_per_member[:, None] * rows
        return kept & (values > 0)

    @torch.no_grad()
    def update_threshold(self, smallest: torch.Tensor) -> None:
        """Fold one batch's smallest kept activations (K,) into the running mean (NaN entries are skipped)."""
        seen = ~torch.isnan(smallest)
        unset = self.threshold < 0
        running = (1 - self.threshold_momentum) * self.threshold + self.threshold_momentum * smallest
        self.threshold.copy_(torch.where(seen, torch.where(unset, smallest, running), self.threshold))

    def train_reconstruction(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch top-k training path (updates `threshold`): (x_hat, dense codes detached, fired (K, m))."""
        K, B, m = pre.shape
        values, indices, smallest = self.batch_top_k(pre)
        self.update_threshold(smallest)
        x_hat = decode_batch_topk(values, indices, self.W_dec, B)
        if self.b_dec is not None:
            x_hat = x_hat + self.b_dec[:, None, :]
        codes = torch.zeros(K, B * m, dtype=values.dtype, device=values.device).scatter(1, indices, values.detach()).view(K, B, m)
        return x_hat, codes, (codes > 0).any(dim=1)
