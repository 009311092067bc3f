"""The training loop over an ensemble of SAEs: Adam, lr schedule, decoder constraint, logging, checkpoints."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from saekit.config import TrainConfig
from saekit.sae.base import SparseAutoencoder
from saekit.sources import Source


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


@dataclass
class TrainState:
    """Where a run is: the step it will do next, and the optimiser (for checkpoints)."""

    step: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    resampled: int = 0


def lr_factor(step: int, n_steps: int, cfg: TrainConfig) -> float:
    """Multiplier of the base lr at `step`: 1, then (with lr_decay=linear) down to 0 over the last fraction."""
    if cfg.lr_decay == "none":
        return 1.0
    decay_steps = max(1, int(round(cfg.lr_decay_fraction * n_steps)))
    start = n_steps - decay_steps
    return 1.0 if step < start else max(0.0, (n_steps - step) / decay_steps)


def make_optimizer(
    sae: SparseAutoencoder, cfg: TrainConfig, n_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """Adam (fused where the device supports it) with the config's schedule."""
    params = list(sae.parameters())
    try:
        opt = torch.optim.Adam(params, lr=cfg.lr, fused=True)
    except (RuntimeError, TypeError):
        opt = torch.optim.Adam(params, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, n_steps, cfg))
    return opt, sched


RESAMPLE_STREAM = 2


def duplicate_latents(directions: torch.Tensor, threshold: float) -> torch.Tensor:
    """(K, m) bool: latents whose decoder direction has cosine > `threshold` with a lower-numbered latent's.

    directions: (K, m, d) unit rows. Of each group of near-copies the lowest-numbered latent is kept.
    """
    cos = torch.bmm(directions, directions.transpose(1, 2))  # (K, m, m)
    earlier = torch.ones(cos.shape[1], cos.shape[2], dtype=torch.bool, device=cos.device).tril(diagonal=-1)
    return ((cos > threshold) & earlier).any(dim=2)


def resample_dead(sae: SparseAutoencoder, source: Source, dead: torch.Tensor, state: TrainState, batch_size: int) -> int:
    """Resample `dead` (K, m) latents on a fresh batch of at least 8192 inputs from their own stream."""
    if not dead.any():
        return 0
    n = max(8192, batch_size)
    x = source.batch(n, state.step, RESAMPLE_STREAM)
    g = torch.Generator()
    g.manual_seed(state.step)
    count = sae.resample_latents(dead, x, state.optimizer, g)
    state.resampled += count
    return count


def n_steps_for(cfg: TrainConfig) -> int:
    return math.ceil(cfg.samples / cfg.batch_size)


def train(
    sae: SparseAutoencoder,
    source: Source,
    cfg: TrainConfig,
    *,
    on_log: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
    on_checkpoint: Callable[[TrainState, int], None] | None = None,
    state: TrainState | None = None,
    progress: bool = True,
    description: str = "train",
) -> TrainState:
    """Train `sae` on batches 0.. of the source's training stream for `cfg.samples` samples.

    One step: loss terms -> backward -> drop the decoder gradient's parallel part -> Adam
    -> renormalise decoder rows. Every `log_every` steps `on_log(samples, row)` gets per-member
    (K,) tensors; every `checkpoint_every` samples and at the end `on_checkpoint(state, samples)`.
    A non-finite loss raises TrainingDiverged before any checkpoint of the bad parameters.
    """
    n_steps = n_steps_for(cfg)
    if state is None:
        opt, sched = make_optimizer(sae, cfg, n_steps)
        state = TrainState(step=0, optimizer=opt, scheduler=sched)
    B = cfg.batch_size
    device = sae.W_dec.device
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    resampling = cfg.resample_every > 0
    fired = torch.zeros(sae.n_members, sae.dict_size, dtype=torch.bool, device=device)
    next_resample = (state.step * B // cfg.resample_every + 1) * cfg.resample_every if resampling else 0
    next_ckpt = (state.step * B // cfg.checkpoint_every + 1) * cfg.checkpoint_every
    bar = tqdm(
        total=n_steps * B, initial=state.step * B, unit="sample", unit_scale=True, disable=not progress, desc=description, leave=False
    )
    try:
        while state.step < n_steps:
            x = source.batch(B, state.step, 0)
            terms = sae.training_loss(x)
            state.optimizer.zero_grad(set_to_none=True)
            terms["loss"].sum().backward()
            sae.remove_parallel_grad()
            state.optimizer.step()
            state.scheduler.step()
            sae.normalize_decoder()
            nonfinite |= ~torch.isfinite(terms["loss"]).all()
            state.step += 1
            samples = state.step * B
            if resampling:
                fired |= (terms["codes"] > 0).any(dim=1)
                if samples >= next_resample:
                    if samples <= cfg.resample_until * cfg.samples:
                        stale = ~fired
                        if cfg.resample_duplicates:
                            stale |= duplicate_latents(sae.directions(), cfg.duplicate_cosine)
                        resample_dead(sae, source, stale, state, B)
                    fired.zero_()
                    next_resample += cfg.resample_every
            last = state.step == n_steps
            if state.step % cfg.log_every == 0 or last or samples >= next_ckpt:
                if nonfinite.item():
                    raise TrainingDiverged(f"loss became NaN/Inf by step {state.step} (samples {samples}); try a smaller train.lr")
                if on_log is not None and (state.step % cfg.log_every == 0 or last):
                    codes = terms["codes"]
                    on_log(
                        samples,
                        {
                            "loss": terms["loss"].detach(),
                            "reconstruction": terms["reconstruction"].detach(),
                            "sparsity": terms["sparsity"].detach(),
                            "l0": (codes != 0).sum(dim=2).float().mean(dim=1),
                            "lr": torch.tensor([state.optimizer.param_groups[0]["lr"]]),
                        },
                    )
                if on_checkpoint is not None and (samples >= next_ckpt or last):
                    on_checkpoint(state, min(samples, cfg.samples))
                while next_ckpt <= samples:
                    next_ckpt += cfg.checkpoint_every
            bar.update(B)
    finally:
        bar.close()
    return state
