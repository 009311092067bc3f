"""Run a whole config: build the source, train every SAE of the grid, evaluate, checkpoint, record."""

from __future__ import annotations

import gc
import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from saekit.atomic import atomic_write_bytes
from saekit.config import SPARSITY_KNOBS, TRAIN_KEYS_NEW_IN_V2, Config, RunSpec, TrainConfig, expand_grid
from saekit.device import resolve_device
from saekit.distributed import (
    DistEnv,
    all_gather_objects,
    assign_ranks,
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
from saekit.sae import ARCHITECTURES, SparseAutoencoder
from saekit.sae.geometric_median import geometric_median
from saekit.sources import make_source
from saekit.store import RunStore, done_run_ids, merge_rank_stores, rank_filename
from saekit.train.data_parallel import DataParallel, RankBatches, check_data_parallel
from saekit.train.evaluate import evaluate_window
from saekit.train.loop import TrainState, make_state, train_lockstep
from saekit.train.sweep import BYTES_PER_FLOAT, EnsemblePlan, available_memory_bytes, format_bytes, plan_ensembles, sweep_memory_bytes


def run_config_dict(cfg: Config, spec: RunSpec) -> dict[str, Any]:
    """The config of one SAE of the grid: every grid axis replaced by the spec's value."""
    data = cfg.model_dump()
    data["sae"]["dict_size"] = spec.dict_size
    data["sae"][spec.knob] = spec.knob_value
    data["train"]["seed"] = spec.seed
    data["train"]["seeds"] = None
    return data


# The MMCS at which a run counts as having found the features, for `samples_to_mmcs_0_95` (issue 6's comparison).
MMCS_TARGET = 0.95

# Decoder directions are also kept from this point of training, so the analysis can check that what it
# counts no longer changes ("stable between the last checkpoints").
LATE_FRACTION = 0.8

SOURCE_CACHE = "sources"  # trained models of `tms` and `compute` sources, by config hash
SOURCE_INFO = "source.json"  # what the source says of itself (e.g. how many features its model represents)

# Keys that change how a run is watched or where it runs, not what it computes: left out of its id.
_NOT_IN_RUN_ID = ("device", "log_every", "checkpoint_every", "parallel")


def run_id_for(cfg: Config, spec: RunSpec) -> str:
    """Readable and deterministic: the same config and spec always give the same id."""
    data = run_config_dict(cfg, spec)
    data["source"] = cfg.source.relevant()  # keys of other source kinds do not change the data
    data["sae"] = {**cfg.sae.relevant(), "dict_size": spec.dict_size, spec.knob: spec.knob_value}  # nor keys of other archs
    for key in _NOT_IN_RUN_ID:
        data["train"].pop(key)
    for key in TRAIN_KEYS_NEW_IN_V2:  # so that runs of earlier versions keep their ids
        if data["train"][key] == TrainConfig.model_fields[key].default:
            data["train"].pop(key)
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:8]
    return f"{spec.arch}-m{spec.dict_size}-{spec.knob}_{spec.sparsity:g}-s{spec.seed}-{digest}"


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


BIAS_INIT_SAMPLES, BIAS_INIT_STREAM = 8192, 3  # the decoder bias's geometric median is taken on its own stream


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
            sae.b_dec.copy_(geometric_median(source.batch(BIAS_INIT_SAMPLES, 0, BIAS_INIT_STREAM)).expand_as(sae.b_dec))
    return make_state(sae, cfg.train)


def result_row(run: dict[str, Any]) -> dict[str, Any]:
    """The JSON object `saekit train --json` prints for one SAE (DESIGN.md's contract, plus extras)."""
    row = {key: run[key] for key in ("run_id", "arch", "dict_size", "l1", "seed", "samples", "seconds", "status")}
    if run["knob"] != "l1":
        row[run["knob"]] = run["knob_value"]
    row["sparsity_knob"] = run["knob"]
    row.update(run["metrics"] or {})
    row["checkpoint"] = run["checkpoint"]
    if run.get("error"):
        row["error"] = run["error"]
    return row


def _unique(specs: list[RunSpec], run_ids: list[str]) -> tuple[list[RunSpec], list[str]]:
    seen: dict[str, RunSpec] = {}
    for spec, run_id in zip(specs, run_ids):
        seen.setdefault(run_id, spec)
    return list(seen.values()), list(seen)


def run_config(
    cfg: Config,
    out_dir: str | Path,
    *,
    progress: bool = True,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    max_memory: int | None = None,
    dist_env: DistEnv | None = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Train every SAE the config describes into `out_dir`; returns (result rows, errors of failed runs).

    SAEs of one size form an ensemble (one stacked model, one batched step); all ensembles train in
    lockstep on one data stream. Finished SAEs in `out_dir` are skipped, unfinished ensembles resume
    from their last checkpoint. Everything that can be checked (device, source and its data files,
    memory) is checked before any result is written (a `tms` or `compute` source may first cache its trained
    model in OUT/sources, a complete file written atomically).

    `dist_env` (from `saekit.distributed.distributed_env()` under torchrun) spreads the work over its ranks
    as `cfg.train.parallel` says (see `saekit.distributed`); every rank calls this with the same arguments.
    OUT must then be a folder every rank sees. Rank 0 returns every SAE's row (and `on_result` is called
    there only); the other ranks return no rows. Every rank returns every rank's errors. Without `dist_env`,
    a process that torchrun started among several is refused (N copies of one sweep would write the same
    files); `DistEnv()` runs it alone anyway.
    """
    if dist_env is None and distributed_env().enabled:
        raise InputError("this command runs in one process; under torchrun only `saekit train` shares its work between processes")
    env = dist_env or DistEnv()
    device = resolve_device(cfg.train.device, "train.device")
    if env.enabled:
        device = device_for_rank(device, env)
        if cfg.train.parallel == "data":
            check_data_parallel(cfg.train.batch_size, env)
    with process_group(env, device):
        return _run_config(cfg, Path(out_dir), env, device, progress, on_result, max_memory)


def _release_data_parallel(states: list[TrainState]) -> None:
    """Free every DDP wrapper now, before `destroy_process_group`: a wrapper holds the process group, and one left
    to the garbage collector (BatchTopK's SAE and its wrapper refer to each other) would keep the group and gloo's
    worker threads alive past it (see `saekit.distributed.import_dynamo_first` for why that can abort a rank)."""
    for state in states:
        if state.parallel is not None and getattr(state.sae, "batch_group", None) is state.parallel:
            state.sae.batch_group = None
        state.parallel = None
    gc.collect()


def _run_config(
    cfg: Config,
    out: Path,
    env: DistEnv,
    device: torch.device,
    progress: bool,
    on_result: Callable[[dict[str, Any]], None] | None,
    max_memory: int | None,
) -> tuple[list[dict[str, Any]], list[str]]:
    data_parallel = env.enabled and cfg.train.parallel == "data"
    source = _make_source_on_ranks(cfg, out, device, env, data_parallel)
    grid = expand_grid(cfg)
    specs, run_ids = _unique(grid, [run_id_for(cfg, s) for s in grid])
    done = _done_runs(out, env, keep_rank_files=env.enabled and not data_parallel)
    if env.enabled and not data_parallel:  # this rank's share of the full grid
        rank_of = assign_ranks([p.run_ids for p in plan_ensembles(specs, run_ids)], env.world_size)
        mine = [i for i, rid in enumerate(run_ids) if rank_of[rid] == env.rank]
        plans = plan_ensembles([specs[i] for i in mine], [run_ids[i] for i in mine], skip=done)
    else:
        plans = plan_ensembles(specs, run_ids, skip=done)
    writes = env.is_main or not data_parallel  # data-parallel: rank 0 alone evaluates, checkpoints and records
    eval_batch = max(cfg.train.batch_size, 4096)
    batch_rows = cfg.train.batch_size // env.world_size if data_parallel else cfg.train.batch_size
    need = sweep_memory_bytes(plans, source.d, batch_rows, eval_batch if writes else 0)
    need += BYTES_PER_FLOAT * getattr(source, "buffer_rows", 0) * source.d  # a shuffle buffer of activations on disk
    limit = max_memory if max_memory is not None else int(0.8 * available_memory_bytes(device) / _processes_sharing_memory(env, device))
    too_much = None
    if need > limit:
        too_much = (
            f"the sweep needs about {format_bytes(need)} of memory, more than --max-memory {format_bytes(limit)}; "
            "train fewer sizes or L1 values at once, or a smaller train.batch_size"
        )
        if env.enabled:
            too_much += f" (on rank {env.rank} of {env.world_size})"
    raise_if_any(too_much, env)
    downstream = downstream_evaluator(cfg, source) if plans and writes else None
    store_file = rank_filename(env.rank) if env.enabled and not data_parallel else None
    errors: list[str] = []
    store = RunStore(out, store_file) if writes else None
    states: list[TrainState] = []
    try:
        if env.is_main and hasattr(source, "describe"):
            atomic_write_bytes(out / SOURCE_INFO, json.dumps(source.describe(), indent=2).encode())
        batches = RankBatches(source, env) if data_parallel else source
        states = _start(cfg, plans, store, out, source.d, device, source)
        if data_parallel:
            for state in states:
                state.parallel = DataParallel(state.sae, batches, device)
        seconds, late = _train(cfg, plans, states, store, batches, errors, progress and env.is_main, env)
        if store is not None:
            for state, plan in zip(states, plans):
                _finish(cfg, plan, state, store, source, seconds, late.get(id(state)), downstream)
    finally:
        if store is not None:
            store.close()
        if data_parallel:
            _release_data_parallel(states)
    barrier(env)  # every rank's store is closed: rank 0 can merge them
    if env.enabled:
        errors = [e for errs in all_gather_objects(errors, env) for e in errs]
    if not env.is_main:
        return [], errors
    if store_file is not None:
        merge_rank_stores(out)
    results = []
    with RunStore(out) as main:
        for rid in run_ids:
            row = result_row(main.get(rid))
            results.append(row)
            if on_result is not None:
                on_result(row)
    return results, errors


def _processes_sharing_memory(env: DistEnv, device: torch.device) -> int:
    """How many ranks share the memory `available_memory_bytes` reports: a node's RAM, or one GPU each."""
    return 1 if device.type == "cuda" or not env.enabled else env.local_world_size


def _make_source_on_ranks(cfg: Config, out: Path, device: torch.device, env: DistEnv, data_parallel: bool) -> Any:
    """The source, built by rank 0 first (a `tms` or `compute` source trains its model and caches it in OUT/sources)
    and then by the others (which read the cache). Data-parallel activations: each rank reads its own shard
    files, with rank 0's measured scale. A bad source stops every rank with the first failing rank's one-line reason."""
    shard = (env.rank, env.world_size) if data_parallel and cfg.source.kind == "activations" else None
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


def _done_runs(out: Path, env: DistEnv, keep_rank_files: bool) -> set[str]:
    """Runs already done in OUT (read by rank 0, sent to the others). Rank files left by an interrupted
    distributed sweep are kept for a distributed sweep (each rank continues its own file, with the history of
    the ensembles it resumes) and merged into OUT/runs.sqlite otherwise."""
    done: set[str] = set()
    if env.is_main:
        if not keep_rank_files:
            merge_rank_stores(out)
        done = done_run_ids(out)
    return broadcast_object(done, env)


def _train(
    cfg: Config,
    plans: list[EnsemblePlan],
    states: list[TrainState],
    store: RunStore | None,
    source: Any,
    errors: list[str],
    progress: bool,
    env: DistEnv,
) -> tuple[float, dict[int, torch.Tensor]]:
    """Train the ensembles in lockstep; with a store, log their history, checkpoints and failures into it.
    Returns (seconds, decoder directions at LATE_FRACTION of training by id of the ensemble's state)."""
    started = time.perf_counter()
    by_state = {id(state): plan for state, plan in zip(states, plans)}
    late: dict[int, torch.Tensor] = {}  # decoder directions at LATE_FRACTION of training, per ensemble
    truth = source.ground_truth

    def on_log(state: TrainState, samples: int, row: dict[str, torch.Tensor]) -> None:
        plan = by_state[id(state)]
        if id(state) not in late and samples >= LATE_FRACTION * cfg.train.samples:
            late[id(state)] = state.sae.directions().clone()
        if truth is not None:  # MMCS over training, for samples_to_mmcs_0_95 and the curves
            row = {**row, "mmcs": mmcs_members(state.sae.directions(), truth)}
        store.log_history_many(
            [(rid, samples, {n: v[k].item() for n, v in row.items()}) for k, rid in enumerate(plan.run_ids) if k not in state.failed]
        )

    def on_checkpoint(state: TrainState, samples: int) -> None:
        plan = by_state[id(state)]
        save_checkpoint(
            store.out_dir / "ensembles" / plan.ensemble_id,
            state.sae,
            samples=samples,
            optimizer=state.optimizer,
            extra={"step": state.step, "run_ids": list(plan.run_ids)},
        )
        for rid in plan.run_ids:
            store.record_progress(rid, samples, time.perf_counter() - started)

    def on_diverged(state: TrainState, members: list[int], message: str) -> None:
        plan = by_state[id(state)]
        for k in members:
            store.fail_run(plan.run_ids[k], message)
            errors.append(f"{plan.run_ids[k]}: {message}")

    n_saes = sum(len(p.specs) for p in plans)
    where = f" on rank {env.rank} of {env.world_size}" if env.enabled and cfg.train.parallel == "members" else ""
    train_lockstep(
        states,
        source,
        cfg.train,
        on_log=on_log if store is not None else None,
        on_checkpoint=on_checkpoint if store is not None else None,
        on_diverged=on_diverged if store is not None else None,
        progress=progress,
        description=f"{n_saes} SAEs in {len(plans)} ensembles{where}",
    )
    return time.perf_counter() - started, late


def _start(
    cfg: Config, plans: list[EnsemblePlan], store: RunStore | None, out: Path, d: int, device: torch.device, source: Any
) -> list[TrainState]:
    states = []
    for plan in plans:
        state = start_ensemble(cfg, plan, out / "ensembles" / plan.ensemble_id, d, device, source)
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


def downstream_evaluator(cfg: Config, source: Any) -> Any:
    """For activations of a causal language model: the model loaded and its clean and zero-ablated losses
    measured on held-out windows (raises InputError early, before training, when the model cannot be loaded)."""
    manifest = getattr(source, "manifest", None)
    if manifest is None or not manifest.get("causal") or cfg.train.ce_eval_tokens == 0:
        return None
    from saekit.lm.downstream import DownstreamEvaluator
    from saekit.lm.models import load_model

    lm = load_model(str(manifest["model"]), device=source.device)
    windows = source.eval_token_windows(cfg.train.ce_eval_tokens)
    return DownstreamEvaluator(
        lm,
        windows,
        layer=int(manifest["layer"]),
        site=str(manifest["site"]),
        skip_positions=source.skip_positions,
        norm_threshold=source.norm_threshold,
    )


def _finish(
    cfg: Config,
    plan: EnsemblePlan,
    state: TrainState,
    store: RunStore,
    source: Any,
    seconds: float,
    late: torch.Tensor | None,
    downstream: Any = None,
) -> None:
    """Evaluate the ensemble's healthy members, write each one's final checkpoint, then mark them all done in
    one transaction and only then drop the ensemble's checkpoint: a failure part-way (a full disk) leaves every
    member unfinished and the ensemble resumable, never some members done and the rest to restart from scratch."""
    if len(state.failed) == len(plan.specs):
        return
    t0 = time.perf_counter()
    n_eval = min(cfg.train.eval_samples, getattr(source, "eval_rows_kept", cfg.train.eval_samples))  # a finite held-out set
    metrics, fire_counts = evaluate_window(state.sae, source, n_eval, max(cfg.train.batch_size, 4096))
    input_scale = float(getattr(source, "input_scale", 1.0))
    threshold = float(getattr(source, "norm_threshold", math.inf))
    norm_threshold = threshold if math.isfinite(threshold) else None  # raw-scale norm of tokens left out of training
    if downstream is not None:
        for row, extra in zip(metrics, downstream.evaluate(state.sae, input_scale)):
            row.update(extra)
    eval_seconds = (time.perf_counter() - t0) / len(plan.specs)
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
