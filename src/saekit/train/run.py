"""Run a whole config: build the source, train every SAE of the grid, evaluate, checkpoint, record."""

from __future__ import annotations

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
from saekit.errors import InputError
from saekit.io import load_optimizer_state, load_sae, read_cfg, save_checkpoint
from saekit.metrics import first_reaching, mmcs_members
from saekit.sae import ARCHITECTURES, SparseAutoencoder
from saekit.sae.geometric_median import geometric_median
from saekit.sources import make_source
from saekit.store import RunStore
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
_NOT_IN_RUN_ID = ("device", "log_every", "checkpoint_every")


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
    knob = SPARSITY_KNOBS.get(run["arch"], "l1")  # the store's l1 column holds the value of the arch's knob
    if knob != "l1":
        row["l1"] = None
        row[knob] = int(run["l1"]) if knob == "k" else run["l1"]
    row["sparsity_knob"] = knob
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
) -> tuple[list[dict[str, Any]], list[str]]:
    """Train every SAE the config describes into `out_dir`; returns (result rows, errors of failed runs).

    SAEs of one size form an ensemble (one stacked model, one batched step); all ensembles train in
    lockstep on one data stream. Finished SAEs in `out_dir` are skipped, unfinished ensembles resume
    from their last checkpoint. Everything that can be checked (device, source and its data files,
    memory) is checked before any result is written (a `tms` or `compute` source may first cache its trained
    model in OUT/sources, a complete file written atomically).
    """
    device = resolve_device(cfg.train.device, "train.device")
    out = Path(out_dir)
    source = make_source(cfg.source, device, cache_dir=out / SOURCE_CACHE)
    grid = expand_grid(cfg)
    specs, run_ids = _unique(grid, [run_id_for(cfg, s) for s in grid])
    done: set[str] = set()
    if (out / RunStore.FILENAME).is_file():
        with RunStore(out) as existing:
            done = {r["run_id"] for r in existing.runs("done")}
    plans = plan_ensembles(specs, run_ids, skip=done)
    eval_batch = max(cfg.train.batch_size, 4096)
    need = sweep_memory_bytes(plans, source.d, cfg.train.batch_size, eval_batch)
    need += BYTES_PER_FLOAT * getattr(source, "buffer_rows", 0) * source.d  # a shuffle buffer of activations on disk
    limit = max_memory if max_memory is not None else int(0.8 * available_memory_bytes(device))
    if need > limit:
        raise InputError(
            f"the sweep needs about {format_bytes(need)} of memory, more than --max-memory {format_bytes(limit)}; "
            "train fewer sizes or L1 values at once, or a smaller train.batch_size"
        )
    downstream = downstream_evaluator(cfg, source) if plans else None
    errors: list[str] = []
    with RunStore(out) as store:
        if hasattr(source, "describe"):
            atomic_write_bytes(out / SOURCE_INFO, json.dumps(source.describe(), indent=2).encode())
        states = _start(cfg, plans, store, source.d, device, source)
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
                out / "ensembles" / plan.ensemble_id,
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
        train_lockstep(
            states,
            source,
            cfg.train,
            on_log=on_log,
            on_checkpoint=on_checkpoint,
            on_diverged=on_diverged,
            progress=progress,
            description=f"{n_saes} SAEs in {len(plans)} ensembles",
        )
        seconds = time.perf_counter() - started
        for state, plan in zip(states, plans):
            _finish(cfg, plan, state, store, source, seconds, late.get(id(state)), downstream)
        results = []
        for rid in run_ids:
            row = result_row(store.get(rid))
            results.append(row)
            if on_result is not None:
                on_result(row)
    return results, errors


def _start(cfg: Config, plans: list[EnsemblePlan], store: RunStore, d: int, device: torch.device, source: Any) -> list[TrainState]:
    states = []
    for plan in plans:
        folder = store.out_dir / "ensembles" / plan.ensemble_id
        state = start_ensemble(cfg, plan, folder, d, device, source)
        for spec, rid in zip(plan.specs, plan.run_ids):
            store.start_run(
                rid,
                arch=spec.arch,
                dict_size=spec.dict_size,
                l1=spec.sparsity,
                seed=spec.seed,
                config=run_config_dict(cfg, spec),
                checkpoint=str(store.out_dir / "runs" / rid),
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
    """Evaluate the ensemble's healthy members, write each one's final checkpoint, mark them done."""
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
        store.finish_run(rid, samples=cfg.train.samples, seconds=seconds, metrics=row)
    shutil.rmtree(store.out_dir / "ensembles" / plan.ensemble_id, ignore_errors=True)
