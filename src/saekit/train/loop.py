"""The training loop: ensembles of SAEs stepped in lockstep on one data stream.

One step of an ensemble: loss terms -> backward -> drop the decoder gradient's parallel part ->
Adam -> renormalise decoder rows (-> optionally resample dead latents). Every ensemble of a
sweep sees the same batch t at its step t, so batches are generated once per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from saekit.config import TrainConfig
from saekit.sae.base import SparseAutoencoder
from saekit.sources import Source, Stream
from saekit.sources.seeding import seeded_generator

RESAMPLE_SAMPLES = 8192  # resampling picks its inputs among at least this many fresh samples
RESAMPLE_SALT = 0x7273  # salt of the per-member generators that pick resampling inputs


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


@dataclass
class TrainState:
    """One ensemble in training: its SAE, Adam, the step it does next, and bookkeeping."""

    sae: SparseAutoencoder
    optimizer: torch.optim.Optimizer
    step: int = 0
    resampled: int = 0
    diverged: torch.Tensor | None = None  # (K,) bool: members whose loss was ever NaN/Inf
    fired: torch.Tensor | None = None  # (K, m) bool: latents that fired since the last resampling
    resumed_from: int = 0  # the step a resumed ensemble restarted at (0 = trained from scratch)
    failed: set[int] = field(default_factory=set)  # members reported as diverged
    parallel: Any = None  # a saekit.train.data_parallel.DataParallel when the ensemble trains on every rank's rows


def warmup_factor(step: int, n_steps: int, fraction: float) -> float:
    """Linear warm-up over the first `fraction` of `n_steps`: (step + 1) / warm-up steps, capped at 1; 1 when off."""
    if fraction <= 0:
        return 1.0
    warm_steps = max(1, int(round(fraction * n_steps)))
    return min(1.0, (step + 1) / warm_steps)


def lr_factor(step: int, n_steps: int, cfg: TrainConfig) -> float:
    """Multiplier of the base lr at `step`: the warm-up (lr_warmup), then 1, then (with lr_decay=linear)
    down to 0 over the last `lr_decay_fraction`."""
    factor = warmup_factor(step, n_steps, cfg.lr_warmup)
    if cfg.lr_decay == "none":
        return factor
    decay_steps = max(1, int(round(cfg.lr_decay_fraction * n_steps)))
    start = n_steps - decay_steps
    return factor if step < start else min(factor, max(0.0, (n_steps - step) / decay_steps))


def make_state(sae: SparseAutoencoder, cfg: TrainConfig, step: int = 0) -> TrainState:
    """A fresh TrainState with Adam (fused where the device supports it)."""
    params = list(sae.parameters())
    try:
        opt = torch.optim.Adam(params, lr=cfg.lr, fused=True)
    except (RuntimeError, TypeError):
        opt = torch.optim.Adam(params, lr=cfg.lr)
    device = sae.W_dec.device
    return TrainState(
        sae=sae,
        optimizer=opt,
        step=step,
        diverged=torch.zeros(sae.n_members, dtype=torch.bool, device=device),
        fired=torch.zeros(sae.n_members, sae.dict_size, dtype=torch.bool, device=device),
    )


def n_steps_for(cfg: TrainConfig) -> int:
    return math.ceil(cfg.samples / cfg.batch_size)


def duplicate_latents(directions: torch.Tensor, threshold: float) -> torch.Tensor:
    """(K, m) bool: latents whose decoder direction has cosine > `threshold` with a lower-numbered latent's.

    directions: (K, m, d) unit rows. Of each group of near-copies the lowest-numbered latent is kept.
    """
    cos = torch.bmm(directions, directions.transpose(1, 2))  # (K, m, m)
    earlier = torch.ones(cos.shape[1], cos.shape[2], dtype=torch.bool, device=cos.device).tril(diagonal=-1)
    return ((cos > threshold) & earlier).any(dim=2)


def resample_dead(state: TrainState, source: Source, dead: torch.Tensor, batch_size: int) -> int:
    """Resample `dead` (K, m) latents on a fresh batch of at least RESAMPLE_SAMPLES inputs from their own stream;
    member k picks its inputs with a generator seeded by (its init seed, the step), not shared with the other members."""
    if not dead.any():
        return 0
    x = source.batch(max(RESAMPLE_SAMPLES, batch_size), state.step, Stream.RESAMPLE)
    # one generator per member, from its init seed and the step: a member resamples alike in any ensemble
    generators = [seeded_generator(seed, RESAMPLE_SALT, state.step) for seed in state.sae.seeds]
    count = state.sae.resample_latents(dead, x, state.optimizer, generators)
    state.resampled += count
    return count


def optimisation_step(
    sae: SparseAutoencoder,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    forward: Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]] | None = None,
) -> dict[str, torch.Tensor]:
    """Loss terms -> backward -> the SAE's decoder constraint (by default: drop the decoder gradient's
    parallel part) -> Adam -> its projection (by default: renormalise decoder rows).

    `forward(x) -> (loss to backpropagate, loss terms)` replaces the members' summed training loss
    (data-parallel training passes its DDP wrapper, whose backward averages the gradients over ranks)."""
    if forward is None:
        terms = sae.training_loss(x)
        loss = terms["loss"].sum()
    else:
        loss, terms = forward(x)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    sae.before_optimizer_step()
    opt.step()
    sae.after_optimizer_step()
    return terms


def training_step(state: TrainState, x: torch.Tensor, source: Source, cfg: TrainConfig, n_steps: int) -> dict[str, torch.Tensor]:
    """One optimisation step of an ensemble on batch x (B, d); returns its loss terms."""
    sae, opt = state.sae, state.optimizer
    lr = cfg.lr * lr_factor(state.step, n_steps, cfg)
    for group in opt.param_groups:
        group["lr"] = lr
    sae.sparsity_scale = warmup_factor(state.step, n_steps, cfg.l1_warmup)
    terms = optimisation_step(sae, opt, x) if state.parallel is None else state.parallel.optimisation_step(opt, x)
    state.diverged |= ~torch.isfinite(terms["loss"])
    state.step += 1
    if cfg.resample_every > 0:
        state.fired |= (terms["codes"] > 0).any(dim=1)
        maybe_resample(state, source, cfg)
    terms["lr"] = torch.tensor([lr])
    return terms


def maybe_resample(state: TrainState, source: Source, cfg: TrainConfig) -> None:
    """After the step that crosses a multiple of `resample_every` samples: resample the latents that did not fire
    since the last one (and with `resample_duplicates` near-copies of others) while within `resample_until` of
    training, then start a new window of `state.fired`."""
    samples = state.step * cfg.batch_size
    if samples // cfg.resample_every == (samples - cfg.batch_size) // cfg.resample_every:
        return
    if samples <= cfg.resample_until * cfg.samples:
        if state.parallel is not None:  # a latent that fired on any rank's rows fired
            state.parallel.union(state.fired)
        stale = ~state.fired
        if cfg.resample_duplicates:
            stale |= duplicate_latents(state.sae.directions(), cfg.duplicate_cosine)
        _resample_on_every_rank(state, source, stale, cfg.batch_size)
    state.fired.zero_()


def _resample_on_every_rank(state: TrainState, source: Source, stale: torch.Tensor, batch_size: int) -> None:
    """resample_dead; in data-parallel training on rank 0's candidate inputs, then its parameters and Adam
    moments copied to every rank."""
    if state.parallel is None:
        resample_dead(state, source, stale, batch_size)
        return
    count = resample_dead(state, source, stale, batch_size) if state.parallel.env.is_main else 0
    state.parallel.broadcast_state(state.optimizer)
    state.resampled += state.parallel.broadcast_int(count) - count


def _log_row(terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    codes = terms["codes"]
    return {
        "loss": terms["loss"].detach(),
        "reconstruction": terms["reconstruction"].detach(),
        "sparsity": terms["sparsity"].detach(),
        "l0": (codes != 0).sum(dim=2).float().mean(dim=1),
        "lr": terms["lr"].expand(codes.shape[0]),
    }


@contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """torch.set_float32_matmul_precision(precision) inside the block, the previous setting after it."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def train_lockstep(
    states: list[TrainState],
    source: Source,
    cfg: TrainConfig,
    *,
    on_log: Callable[[TrainState, int, dict[str, torch.Tensor]], None] | None = None,
    on_checkpoint: Callable[[TrainState, int], None] | None = None,
    on_diverged: Callable[[TrainState, list[int], str], None] | None = None,
    progress: bool = True,
    description: str = "train",
) -> list[TrainState]:
    """Train every ensemble to `cfg.samples` samples, all on the same stream; returns those still training.

    Ensembles may start at different steps (after a resume); batch t is generated once and given to
    every ensemble whose next step is t. Every `log_every` steps `on_log(state, samples, row)` gets
    per-member (K,) tensors; every `checkpoint_every` samples and at the end, `on_checkpoint(state, samples)`.
    Members whose loss became NaN/Inf are reported to `on_diverged(state, members, message)` at the next
    log or checkpoint boundary, before any checkpoint; an ensemble whose members all diverged stops
    (no checkpoint of its bad parameters is written).
    """
    n_steps, B = n_steps_for(cfg), cfg.batch_size
    active = [s for s in states if s.step < n_steps]
    start = min((s.step for s in active), default=n_steps)
    bar = tqdm(total=(n_steps - start) * B, unit="sample", unit_scale=True, disable=not progress, desc=description, leave=False)
    with bar, matmul_precision(cfg.matmul_precision):
        for t in range(start, n_steps):
            due = [s for s in active if s.step == t]
            if not due:
                continue
            x = source.batch(B, t, Stream.TRAIN)
            for state in due:
                terms = training_step(state, x, source, cfg, n_steps)
                samples = state.step * B
                last = state.step == n_steps
                log_now = state.step % cfg.log_every == 0 or last
                ckpt_now = last or samples // cfg.checkpoint_every > (samples - B) // cfg.checkpoint_every
                if not (log_now or ckpt_now):
                    continue
                report_divergence(state, samples, on_diverged)
                if len(state.failed) == state.sae.n_members:
                    active.remove(state)
                    continue
                if log_now:
                    _log(state, terms, samples, on_log)
                if ckpt_now and on_checkpoint is not None:
                    on_checkpoint(state, min(samples, cfg.samples))
            bar.update(B)
    return active


def report_divergence(state: TrainState, samples: int, on_diverged: Callable[[TrainState, list[int], str], None] | None) -> None:
    """Members whose loss became NaN/Inf since the last report join `state.failed` and go to
    `on_diverged(state, members, message)` (in data-parallel training: diverged on any rank)."""
    if state.parallel is not None:  # every rank takes the same decisions
        state.parallel.union(state.diverged)
    bad = [k for k in state.diverged.nonzero().flatten().tolist() if k not in state.failed]
    if not bad:
        return
    state.failed.update(bad)
    if on_diverged is not None:
        on_diverged(state, bad, f"loss became NaN/Inf by step {state.step} (samples {samples}); try a smaller train.lr")


def _log(
    state: TrainState,
    terms: dict[str, torch.Tensor],
    samples: int,
    on_log: Callable[[TrainState, int, dict[str, torch.Tensor]], None] | None,
) -> None:
    """`on_log(state, samples, row)` with the step's per-member log row (in data-parallel training: the whole
    batch's means, computed on every rank even without `on_log`, since it takes every rank's part)."""
    if on_log is None and state.parallel is None:
        return
    row = _log_row(terms) if state.parallel is None else state.parallel.mean_row(_log_row(terms))
    if on_log is not None:
        on_log(state, samples, row)


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
    """Train one ensemble (often K = 1) on batches 0.. of the source's training stream.

    Raises TrainingDiverged when any member's loss became NaN/Inf (before checkpointing it).
    """
    state = state or make_state(sae, cfg)

    def diverged(st: TrainState, members: list[int], msg: str) -> None:
        raise TrainingDiverged(msg)

    train_lockstep(
        [state],
        source,
        cfg,
        on_log=None if on_log is None else (lambda st, samples, row: on_log(samples, row)),
        on_checkpoint=on_checkpoint,
        on_diverged=diverged,
        progress=progress,
        description=description,
    )
    return state
