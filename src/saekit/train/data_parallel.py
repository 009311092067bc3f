"""Data-parallel training (`train.parallel: data` under torchrun): every rank holds every ensemble and trains
it on its slice of each batch; DistributedDataParallel averages the gradients.

One step on rank r: its rows x_r of batch t -> the ensemble's training loss on x_r (through DDP, whose
backward all-reduces the gradients) -> the decoder-gradient projection, Adam and the renormalisation,
run identically on every rank on the averaged gradient. Each rank's loss is weighted by
N * B_r / B (B_r its rows, B the batch's), so the average of the ranks' gradients is the gradient of the
loss on the whole batch even when a rank's slice is a few rows short (activations drop massive rows).

Batch statistics that live in buffers are combined across ranks instead of broadcast from rank 0 (DDP
runs with broadcast_buffers=False): TopK's and BatchTopK's `samples_since_fired` restart where a latent
fired on any rank, and count the whole batch; the `fired` window of resampling is the union over ranks.
Resampling itself runs on rank 0 (its candidate inputs are rank 0's) and its result is broadcast.

BatchTopK keeps the k*B largest activations of the whole batch: each rank sends its own k*B largest
(values only) to every other (all_gather), every rank finds the k*B-th largest of their union, and keeps
its entries at or above it; the smallest kept activation (the running threshold's input) is the same on
every rank. Only exact ties at that value can keep a few more entries than one process would.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from saekit.distributed import DistEnv
from saekit.errors import InputError
from saekit.sae.base import SparseAutoencoder
from saekit.sources.streams import Stream
from saekit.train.loop import optimisation_step

_DDP_ARGS = inspect.signature(DistributedDataParallel.__init__).parameters


def check_data_parallel(batch_size: int, env: DistEnv) -> None:
    """Refuse (InputError, one line) a batch that cannot be split evenly across `env.world_size` ranks."""
    if batch_size % env.world_size:
        raise InputError(
            f"train.parallel=data needs train.batch_size ({batch_size}) divisible by the number of processes ({env.world_size})"
        )


class RankBatches:
    """A source as rank r of a data-parallel run sees it: Stream.TRAIN gives the rank's rows of each batch; other
    streams (evaluation, resampling, initialisation) are the source's own.

    A source that reads only this rank's data (`source.shard`, activations split by shard files) gives
    B / N rows of its own stream; any other source's batch t is generated whole and the rank keeps its rows
    (the r-th of N equal slices), so N ranks together train on exactly the batch one process would.
    `local_rows` and `global_rows` are the last training batch's row counts (this rank's, all ranks')."""

    def __init__(self, source: Any, env: DistEnv) -> None:
        self.source, self.env = source, env
        self.d: int = source.d
        self.ground_truth = source.ground_truth
        self.sharded = getattr(source, "shard", None) is not None
        self.local_rows = self.global_rows = 0

    def __getattr__(self, name: str) -> Any:  # input_scale, norm_threshold, ... of the source
        return getattr(self.source, name)

    def batch(self, batch_size: int, step: int, stream: int = Stream.TRAIN) -> torch.Tensor:
        if stream != Stream.TRAIN:
            return self.source.batch(batch_size, step, stream)
        if self.sharded:
            x = self.source.batch(batch_size // self.env.world_size, step, Stream.TRAIN)
            rows = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
            dist.all_reduce(rows)
            self.local_rows, self.global_rows = x.shape[0], int(rows.item())
            return x
        whole = self.source.batch(batch_size, step, Stream.TRAIN)
        x = torch.tensor_split(whole, self.env.world_size)[self.env.rank]
        self.local_rows, self.global_rows = x.shape[0], whole.shape[0]
        return x


class _EnsembleLoss(nn.Module):
    """What DDP wraps: forward(x, weight) -> (weight * the members' summed training loss, the loss terms)."""

    def __init__(self, sae: SparseAutoencoder) -> None:
        super().__init__()
        self.sae = sae

    def forward(self, x: torch.Tensor, weight: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        terms = self.sae.training_loss(x)
        return terms["loss"].sum() * weight, terms


class DataParallel:
    """One ensemble's data-parallel machinery: its DDP wrapper (built collectively: rank 0's parameters and
    buffers are copied to every rank) and the collectives the training loop calls."""

    def __init__(self, sae: SparseAutoencoder, batches: RankBatches, device: torch.device) -> None:
        self.sae, self.batches, self.env = sae, batches, batches.env
        device_ids = [device.index] if device.type == "cuda" else None
        # buffers are combined by `_combine_firing`, never overwritten by rank 0's in forward (newer torch names
        # the switch forward_sync_buffers; both keep the copy of parameters and buffers at construction)
        no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in _DDP_ARGS else {"broadcast_buffers": False}
        self.ddp = DistributedDataParallel(_EnsembleLoss(sae), device_ids=device_ids, **no_sync)
        if hasattr(sae, "batch_group"):  # BatchTopK: the top k*B runs over every rank's rows
            sae.batch_group = self

    def optimisation_step(self, opt: torch.optim.Optimizer, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """loop.optimisation_step on this rank's rows x (B_r, d), gradients averaged over the ranks."""
        local, total = self.batches.local_rows, self.batches.global_rows
        weight = 1.0 if local * self.env.world_size == total else self.env.world_size * local / total
        terms = optimisation_step(self.sae, opt, x, forward=lambda rows: self.ddp(rows, weight))
        self._combine_firing(terms["codes"], local, total)
        return terms

    def _combine_firing(self, codes: torch.Tensor, local_rows: int, global_rows: int) -> None:
        """`samples_since_fired` (K, m), counted by the step on this rank's rows, as one process counts the whole
        batch: 0 where the latent fired on any rank, else the count before the step plus the batch's rows."""
        counts = getattr(self.sae, "samples_since_fired", None)
        if counts is None:
            return
        fired = self.union((codes > 0).any(dim=1))
        counts.add_(global_rows - local_rows).masked_fill_(fired, 0)

    def batch_top_k(self, sae: Any, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """BatchTopKSAE.batch_top_k over the whole batch, from this rank's pre-activations pre (K, B_r, m): (values
        (K, n), flat indices (K, n) into this rank's flattened (B_r, m) codes, smallest kept activation (K,) of the
        whole batch, NaN when none is positive). n is the most entries any member keeps on this rank."""
        K, B, m = pre.shape
        n_max = max(sae.k_values) * self.batches.global_rows  # entries kept over the whole batch, at most
        values, indices = pre.relu().reshape(K, B * m).topk(min(n_max, B * m), dim=1, sorted=True)
        candidates = torch.zeros(K, n_max, dtype=values.dtype, device=values.device)  # zeros are never kept
        candidates[:, : values.shape[1]] = values.detach()
        gathered = [torch.empty_like(candidates) for _ in range(self.env.world_size)]
        dist.all_gather(gathered, candidates)
        top = torch.cat(gathered, dim=1).topk(n_max, dim=1, sorted=True).values  # (K, n_max): the whole batch's largest
        kept = sae.kept_entries(top, self.batches.global_rows)
        cutoff = top.masked_fill(~kept, float("inf")).amin(dim=1)  # (K,), inf when a member keeps nothing
        mine = values.detach() >= cutoff[:, None]
        n = max(1, int(mine.sum(dim=1).max()))  # sorted: each member's kept entries come first
        values, indices = values[:, :n] * mine[:, :n], indices[:, :n]
        return values, indices, torch.where(kept.any(dim=1), cutoff, torch.full_like(cutoff, float("nan")))

    def union(self, flags: torch.Tensor) -> torch.Tensor:
        """A bool tensor true where it is true on any rank (flags are updated in place and returned)."""
        as_int = flags.to(torch.int32)
        dist.all_reduce(as_int, op=dist.ReduceOp.MAX)
        flags.copy_(as_int.bool())
        return flags

    def mean_row(self, row: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A log row of per-member batch means (K,), each rank's over its rows, -> the means over the whole batch."""
        keys = [k for k in ("loss", "reconstruction", "sparsity", "l0") if k in row]
        local, total = self.batches.local_rows, self.batches.global_rows
        packed = torch.stack([row[k].float() for k in keys]) * local
        dist.all_reduce(packed)
        packed /= total
        return {**row, **{k: packed[i] for i, k in enumerate(keys)}}

    def broadcast_state(self, opt: torch.optim.Optimizer) -> None:
        """Copy rank 0's parameters, buffers and Adam moments to every rank (after rank 0 alone changed them)."""
        for t in [*self.sae.parameters(), *self.sae.buffers()]:
            dist.broadcast(t.data, src=0)
        for p in self.sae.parameters():
            state = opt.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    dist.broadcast(state[key], src=0)

    def broadcast_int(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.long, device=self.sae.W_dec.device)
        dist.broadcast(t, src=0)
        return int(t.item())
