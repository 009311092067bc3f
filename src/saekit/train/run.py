"""`saekit train`: plan a config's sweep, start its ensembles, train them in lockstep, then evaluate, checkpoint
and record every SAE. Each process does what its `Role` says: alone, or as one rank under torchrun."""

from __future__ import annotations

import gc
import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from saekit.atomic import atomic_write_bytes
from saekit.config import SPARSITY_KNOBS, Config, RunSpec
from saekit.device import resolve_device
from saekit.distributed import (
    DistEnv,
    all_gather_objects,
    barrier,
    broadcast_object,
    device_for_rank,
    distributed_env,
    process_group,
    raise_if_any,
)
from saekit.errors import InputError
from saekit.io import load_optimizer_state, load_sae, read_cfg, save_checkpoint
from saekit.metrics import first_reaching, mmcs_members
from saekit.outlock import hold_out_dir
from saekit.sae import ARCHITECTURES, SparseAutoencoder
from saekit.sae.geometric_median import geometric_median
from saekit.sources import Stream, make_source
from saekit.store import RunStore, done_run_ids, merge_rank_stores
from saekit.train.data_parallel import DataParallel, RankBatches, check_data_parallel
from saekit.train.evaluate import LATER_KEYS, eval_batch_size, evaluate_window
from saekit.train.identity import grid_runs, run_config_dict
from saekit.train.loop import TrainState, make_state, train_lockstep
from saekit.train.plan import EnsemblePlan, memory_limit, memory_refusal
from saekit.train.role import Role, role_for

# The MMCS at which a run counts as having found the features, for `samples_to_mmcs_0_95` (`saekit compare`'s table).
MMCS_TARGET = 0.95

# Decoder directions are also kept from this point of training, so the analysis can check that what it
# counts no longer changes ("stable between the last checkpoints").
LATE_FRACTION = 0.8

SOURCE_CACHE = "sources"  # trained models of `tms` and `compute` sources, by config hash
SOURCE_INFO = "source.json"  # what the source says of itself (e.g. how many features its model represents)

# The refusal of a command that runs in one process, started by torchrun among several.
ONE_PROCESS = "this command runs in one process; under torchrun only `saekit train` and `saekit count` share their work between processes"

BIAS_INIT_SAMPLES = 8192  # the decoder bias's geometric median is taken on this many samples of Stream.BIAS_INIT

Row = dict[str, Any]


@dataclass(frozen=True)
class SweepPlan:
    """What this process trains, and where, decided and checked before anything is written."""

    out: Path  # OUT: runs.sqlite (or this rank's file), checkpoints
    device: torch.device  # where its ensembles train
    source: Any  # the Source
    batches: Any  # what training reads: the source, or this rank's rows of its batches (RankBatches)
    run_ids: list[str]  # every SAE of the config, in grid order: one result row each
    plans: list[EnsemblePlan]  # this process's ensembles with runs left to train
    downstream: Any  # a saekit.lm.downstream.DownstreamEvaluator, or None


def run_config(
    cfg: Config,
    out_dir: str | Path,
    *,
    progress: bool = True,
    on_result: Callable[[Row], None] | None = None,
    max_memory: int | None = None,
    dist_env: DistEnv | None = None,
    wait: bool = False,
    specs: list[RunSpec] | None = None,
) -> tuple[list[Row], list[str]]:
    """Train every SAE the config describes into `out_dir`; returns (result rows, errors of failed runs).
    `specs` replaces the config's grid by these SAEs (each with the config's other settings): a set that is not a
    product of axes, as the feature-count search trains.

    SAEs of one size form an ensemble (one stacked model, one batched step), all ensembles train in lockstep on
    one data stream. Finished SAEs in `out_dir` are skipped, unfinished ensembles resume from their checkpoint.
    Device, source, data files and memory are checked before any result is written (a `tms` or `compute` source
    may first cache its trained model in OUT/sources).

    `dist_env` (`saekit.distributed.distributed_env()` under torchrun) shares the work among its ranks as
    `cfg.train.parallel` says (`saekit.train.role`); every rank calls this alike, on an OUT every rank sees. Rank 0
    returns every SAE's row (and calls `on_result`), the others none; every rank returns every rank's errors.
    Without `dist_env` a process torchrun started among several is refused; `DistEnv()` runs it alone anyway.

    OUT is held for the call (`saekit.outlock`): another process on it is refused in one line, or, with `wait`,
    waited for."""
    role, device = _launch(cfg, dist_env)
    with process_group(role.env, device), hold_on_main(Path(out_dir), role.env, wait):
        sweep = _plan(cfg, Path(out_dir), role, device, max_memory, specs)
        errors: list[str] = []
        with _session(sweep.out, role) as (store, states):
            states += _start(cfg, sweep, store, role)
            seconds, late = _train(cfg, sweep, states, store, errors, progress and role.env.is_main, role)
            _finish(cfg, sweep, states, store, seconds, late)
        return _results(sweep.out, role, sweep.run_ids, errors, on_result)


# -- plan -------------------------------------------------------------------------------------------------------


@contextmanager
def hold_on_main(out: Path, env: DistEnv, wait: bool) -> Iterator[None]:
    """OUT held by the main process of this command (`saekit.outlock`); a refusal there stops every rank alike."""
    with ExitStack() as held:
        message = None
        if env.is_main:
            try:
                held.enter_context(hold_out_dir(out, wait=wait))
            except InputError as err:
                message = str(err)
        raise_if_any(message, env)
        yield


def refuse_several_processes() -> None:
    """InputError in a process torchrun started among several, for a command that runs in one process."""
    if distributed_env().enabled:
        raise InputError(ONE_PROCESS)


def training_device(cfg: Config, env: DistEnv) -> torch.device:
    """`train.device` resolved, and under torchrun this rank's own GPU (`device_for_rank`)."""
    return device_for_rank(resolve_device(cfg.train.device, "train.device"), env)


def _launch(cfg: Config, dist_env: DistEnv | None) -> tuple[Role, torch.device]:
    """This process's role and training device (one GPU per rank; a batch that splits evenly for data parallelism)."""
    if dist_env is None:
        refuse_several_processes()
    role = role_for(dist_env or DistEnv(), cfg.train.parallel)
    device = training_device(cfg, role.env)
    if role.data_parallel:
        check_data_parallel(cfg.train.batch_size, role.env)
    return role, device


def _plan(
    cfg: Config, out: Path, role: Role, device: torch.device, max_memory: int | None, specs: list[RunSpec] | None = None
) -> SweepPlan:
    """The source and this process's ensembles, checked on every rank (source, memory, the language model of
    the downstream loss) before anything is written."""
    source = _make_source_on_ranks(cfg, out, device, role)
    specs, run_ids = grid_runs(cfg, specs)
    plans = role.plans(specs, run_ids, skip=_done_runs(out, role))
    eval_batch = eval_batch_size(cfg.train.batch_size) if role.writes else 0
    limit = memory_limit(max_memory, device, role.env)
    raise_if_any(memory_refusal(plans, source, role.batch_rows(cfg.train.batch_size), eval_batch, limit, role.rank_name), role.env)
    downstream = None
    if plans and role.writes:
        from saekit.lm.downstream import downstream_evaluator  # needs torch only; transformers loads with a model

        downstream = downstream_evaluator(source, cfg.train.ce_eval_tokens)
    batches = RankBatches(source, role.env) if role.data_parallel else source
    return SweepPlan(out, device, source, batches, run_ids, plans, downstream)


def _make_source_on_ranks(cfg: Config, out: Path, device: torch.device, role: Role) -> Any:
    """The source, built by rank 0 first (a `tms` or `compute` source trains its model and caches it in OUT/sources)
    and then by the others (which read the cache). Data-parallel activations: each rank reads its own shard
    files, with rank 0's measured scale. A bad source stops every rank with the first failing rank's one-line reason."""
    env = role.env
    shard = (env.rank, env.world_size) if role.data_parallel and cfg.source.kind == "activations" else None
    source, norms = None, None
    for turn in (True, False):  # rank 0's turn, then the others'
        failure = None
        if env.is_main == turn:
            try:
                source = make_source(cfg.source, device, cache_dir=out / SOURCE_CACHE, shard=shard, norms=norms)
            except InputError as err:
                failure = str(err)
        raise_if_any(failure, env)
        norms = broadcast_object(getattr(source, "norms", None), env)
    return source


def _done_runs(out: Path, role: Role) -> set[str]:
    """Runs already done in OUT (read by rank 0, sent to the others). Rank files left by an interrupted
    distributed sweep are kept when every rank records into its own file (each rank continues its own, with the
    history of the ensembles it resumes) and merged into OUT/runs.sqlite otherwise."""
    done: set[str] = set()
    if role.env.is_main:
        if not role.rank_stores:
            merge_rank_stores(out)
        done = done_run_ids(out)
    return broadcast_object(done, role.env)


# -- start ------------------------------------------------------------------------------------------------------


@contextmanager
def _session(out: Path, role: Role) -> Iterator[tuple[RunStore | None, list[TrainState]]]:
    """This process's run store (None when it does not write) and a list for its ensembles' states; afterwards,
    also after a failure, the store is closed and data-parallel wrappers are freed."""
    store = RunStore(out, role.store_file) if role.writes else None
    states: list[TrainState] = []
    try:
        yield store, states
    finally:
        if store is not None:
            store.close()
        if role.data_parallel:
            _release_data_parallel(states)


def _release_data_parallel(states: list[TrainState]) -> None:
    """Free every DDP wrapper now, before `destroy_process_group`: a wrapper holds the process group, and one left
    to the garbage collector (BatchTopK's SAE and its wrapper refer to each other) would keep the group and gloo's
    worker threads alive past it (see `saekit.distributed.import_dynamo_first` for why that can abort a rank)."""
    for state in states:
        if state.parallel is not None and getattr(state.sae, "batch_group", None) is state.parallel:
            state.sae.batch_group = None
        state.parallel = None
    gc.collect()


def build_ensemble(cfg: Config, plan: EnsemblePlan, d: int, device: torch.device) -> SparseAutoencoder:
    """A fresh stacked SAE whose member k is the plan's k-th run (its seed and sparsity knob's value)."""
    arch = ARCHITECTURES[plan.arch]
    return arch(
        d=d,
        dict_size=plan.dict_size,
        seeds=[s.seed for s in plan.specs],
        **{SPARSITY_KNOBS[plan.arch]: [s.knob_value for s in plan.specs]},
        **arch.config_kwargs(cfg.sae),
    ).to(device)


def start_ensemble(cfg: Config, plan: EnsemblePlan, folder: Path, d: int, device: torch.device, source: Any = None) -> TrainState:
    """The ensemble's TrainState: resumed from its checkpoint folder when one exists, else fresh."""
    if (folder / "cfg.json").is_file():
        saved = read_cfg(folder)
        sae = load_sae(folder, device)
        state = make_state(sae, cfg.train, step=int(saved.get("step", 0)))
        state.resumed_from = state.step
        load_optimizer_state(folder, sae, state.optimizer)
        return state
    sae = build_ensemble(cfg, plan, d, device)
    if cfg.sae.decoder_bias and cfg.sae.decoder_bias_init == "geometric_median" and source is not None:
        with torch.no_grad():
            sae.b_dec.copy_(geometric_median(source.batch(BIAS_INIT_SAMPLES, 0, Stream.BIAS_INIT)).expand_as(sae.b_dec))
    return make_state(sae, cfg.train)


def _start(cfg: Config, sweep: SweepPlan, store: RunStore | None, role: Role) -> list[TrainState]:
    """Rank 0 writes what the source says of itself; every ensemble starts (or resumes) and, with a store, its
    runs are recorded as running."""
    source, out = sweep.source, sweep.out
    if role.env.is_main and hasattr(source, "describe"):
        atomic_write_bytes(out / SOURCE_INFO, json.dumps(source.describe(), indent=2).encode())
    states = []
    for plan in sweep.plans:
        state = start_ensemble(cfg, plan, out / "ensembles" / plan.ensemble_id, source.d, sweep.device, source)
        for spec, rid in zip(plan.specs, plan.run_ids):
            if store is not None:
                store.start_run(
                    rid,
                    arch=spec.arch,
                    dict_size=spec.dict_size,
                    knob=spec.knob,
                    knob_value=spec.sparsity,
                    seed=spec.seed,
                    config=run_config_dict(cfg, spec),
                    checkpoint=str(out / "runs" / rid),
                )
        states.append(state)
    return states


# -- train ------------------------------------------------------------------------------------------------------


class _Recorder:
    """The training loop's callbacks in a process that writes: history rows (with MMCS over training where the
    truth is known), ensemble checkpoints with each run's progress, and diverged members as failed runs. Keeps
    each ensemble's decoder directions at LATE_FRACTION of training in `late`, by id of its state."""

    def __init__(self, cfg: Config, sweep: SweepPlan, states: list[TrainState], store: RunStore, errors: list[str], started: float) -> None:
        self.cfg, self.store, self.errors, self.started = cfg, store, errors, started
        self.truth = sweep.batches.ground_truth
        self.plan_of = {id(state): plan for state, plan in zip(states, sweep.plans)}
        self.late: dict[int, torch.Tensor] = {}

    def on_log(self, state: TrainState, samples: int, row: dict[str, torch.Tensor]) -> None:
        plan = self.plan_of[id(state)]
        if id(state) not in self.late and samples >= LATE_FRACTION * self.cfg.train.samples:
            self.late[id(state)] = state.sae.directions().clone()
        if self.truth is not None:  # MMCS over training, for samples_to_mmcs_0_95 and the curves
            row = {**row, "mmcs": mmcs_members(state.sae.directions(), self.truth)}
        self.store.log_history_many(
            [(rid, samples, {n: v[k].item() for n, v in row.items()}) for k, rid in enumerate(plan.run_ids) if k not in state.failed]
        )

    def on_checkpoint(self, state: TrainState, samples: int) -> None:
        plan = self.plan_of[id(state)]
        save_checkpoint(
            self.store.out_dir / "ensembles" / plan.ensemble_id,
            state.sae,
            samples=samples,
            optimizer=state.optimizer,
            extra={"step": state.step, "run_ids": list(plan.run_ids)},
        )
        for rid in plan.run_ids:
            self.store.record_progress(rid, samples, time.perf_counter() - self.started)

    def on_diverged(self, state: TrainState, members: list[int], message: str) -> None:
        plan = self.plan_of[id(state)]
        for k in members:
            self.store.fail_run(plan.run_ids[k], message)
            self.errors.append(f"{plan.run_ids[k]}: {message}")


def _train(
    cfg: Config, sweep: SweepPlan, states: list[TrainState], store: RunStore | None, errors: list[str], progress: bool, role: Role
) -> tuple[float, dict[int, torch.Tensor]]:
    """Train the ensembles in lockstep (in data-parallel training each through its DDP wrapper, on this rank's
    rows); with a store, log their history, checkpoints and failures into it.
    Returns (seconds, decoder directions at LATE_FRACTION of training by id of the ensemble's state)."""
    if role.data_parallel:
        for state in states:
            state.parallel = DataParallel(state.sae, sweep.batches, sweep.device)
    started = time.perf_counter()
    recorder = None if store is None else _Recorder(cfg, sweep, states, store, errors, started)
    n_saes = sum(len(p.specs) for p in sweep.plans)
    where = f" on {role.rank_name}" if role.trains == "rank_share" else ""
    train_lockstep(
        states,
        sweep.batches,
        cfg.train,
        on_log=None if recorder is None else recorder.on_log,
        on_checkpoint=None if recorder is None else recorder.on_checkpoint,
        on_diverged=None if recorder is None else recorder.on_diverged,
        progress=progress,
        description=f"{n_saes} SAEs in {len(sweep.plans)} ensembles{where}",
    )
    return time.perf_counter() - started, {} if recorder is None else recorder.late


# -- finish -----------------------------------------------------------------------------------------------------


def _evaluate(cfg: Config, sae: SparseAutoencoder, sweep: SweepPlan) -> tuple[list[dict[str, float]], torch.Tensor]:
    """Every member's metrics on the held-out samples (and its downstream loss for a language model's
    activations), and the latents' fire counts (K, m)."""
    source = sweep.source
    n_eval = min(cfg.train.eval_samples, getattr(source, "eval_rows_kept", cfg.train.eval_samples))  # a finite held-out set
    metrics, fire_counts = evaluate_window(sae, source, n_eval, eval_batch_size(cfg.train.batch_size))
    if sweep.downstream is not None:
        for row, extra in zip(metrics, sweep.downstream.evaluate(sae, float(getattr(source, "input_scale", 1.0)))):
            row.update(extra)
    return metrics, fire_counts


def _finish(
    cfg: Config, sweep: SweepPlan, states: list[TrainState], store: RunStore | None, seconds: float, late: dict[int, torch.Tensor]
) -> None:
    """In a process that writes, every ensemble's evaluation, final checkpoints and results (`_finish_ensemble`)."""
    if store is None:
        return
    for state, plan in zip(states, sweep.plans):
        _finish_ensemble(cfg, plan, state, store, sweep, seconds, late.get(id(state)))


def _finish_ensemble(
    cfg: Config, plan: EnsemblePlan, state: TrainState, store: RunStore, sweep: SweepPlan, seconds: float, late: torch.Tensor | None
) -> None:
    """Evaluate the ensemble's healthy members, write each one's final checkpoint, then mark them all done in
    one transaction and only then drop the ensemble's checkpoint: a failure part-way (a full disk) leaves every
    member unfinished and the ensemble resumable, never some members done and the rest to restart from scratch."""
    if len(state.failed) == len(plan.specs):
        return
    source = sweep.source
    t0 = time.perf_counter()
    metrics, fire_counts = _evaluate(cfg, state.sae, sweep)
    eval_seconds = (time.perf_counter() - t0) / len(plan.specs)
    input_scale = float(getattr(source, "input_scale", 1.0))
    threshold = float(getattr(source, "norm_threshold", math.inf))
    norm_threshold = threshold if math.isfinite(threshold) else None  # raw-scale norm of tokens left out of training
    finished = []
    for k, (spec, rid) in enumerate(zip(plan.specs, plan.run_ids)):
        if k in state.failed:
            continue
        save_checkpoint(
            store.out_dir / "runs" / rid,
            state.sae.member(k),
            samples=cfg.train.samples,
            config=run_config_dict(cfg, spec),
            extra={"run_id": rid, "input_scale": input_scale, "norm_threshold": norm_threshold},
            latent_stats={
                "fire_counts": fire_counts[k],
                "eval_samples": torch.tensor(metrics[k]["eval_samples"]),
                **({} if late is None else {"late_directions": late[k]}),
            },
        )
        row = {
            **metrics[k],
            "eval_seconds": eval_seconds,
            "ensemble_id": plan.ensemble_id,
            "ensemble_size": len(plan.specs),
            "resumed_from_samples": state.resumed_from * cfg.train.batch_size,
            "input_scale": input_scale,
        }
        if source.ground_truth is not None:
            row["n_true_features"] = int(source.ground_truth.shape[0])
            row["samples_to_mmcs_0_95"] = first_reaching(store.history(rid), "mmcs", MMCS_TARGET)
        finished.append((rid, cfg.train.samples, seconds, row))
    store.finish_runs(finished)
    shutil.rmtree(store.out_dir / "ensembles" / plan.ensemble_id, ignore_errors=True)


def result_row(run: dict[str, Any]) -> dict[str, Any]:
    """The JSON object `saekit train --json` prints for one SAE (DESIGN.md's contract, plus extras)."""
    row = {key: run[key] for key in ("run_id", "arch", "dict_size", "l1", "seed", "samples", "seconds", "status")}
    if run["knob"] != "l1":
        row[run["knob"]] = run["knob_value"]
    row["sparsity_knob"] = run["knob"]
    metrics = run["metrics"] or {}
    row.update({key: value for key, value in metrics.items() if key not in LATER_KEYS})
    row["checkpoint"] = run["checkpoint"]
    if run.get("error"):
        row["error"] = run["error"]
    row.update({key: metrics[key] for key in LATER_KEYS if key in metrics})  # keys added later come last, in a fixed order
    return row


def _results(
    out: Path, role: Role, run_ids: list[str], errors: list[str], on_result: Callable[[Row], None] | None
) -> tuple[list[Row], list[str]]:
    """(every SAE's result row, every rank's errors) once every rank is done; the rows on rank 0 only, after it
    merged the ranks' files into OUT/runs.sqlite."""
    barrier(role.env)  # every rank's store is closed: rank 0 can merge them
    if role.env.enabled:
        errors = [e for errs in all_gather_objects(errors, role.env) for e in errs]
    if not role.env.is_main:
        return [], errors
    if role.rank_stores:
        merge_rank_stores(out)
    results = []
    with RunStore(out) as main:
        for rid in run_ids:
            row = result_row(main.get(rid))
            results.append(row)
            if on_result is not None:
                on_result(row)
    return results, errors
