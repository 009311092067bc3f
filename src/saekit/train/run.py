"""Run a whole config: build the source, train every SAE of the grid, evaluate, checkpoint, record."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from saekit.config import Config, RunSpec, expand_grid
from saekit.errors import InputError
from saekit.io import save_checkpoint
from saekit.sae import ARCHITECTURES, SparseAutoencoder
from saekit.sources import Source, make_source
from saekit.store import RunStore
from saekit.train.evaluate import evaluate
from saekit.train.loop import TrainingDiverged, TrainState, train


def resolve_device(name: str) -> torch.device:
    """`auto` -> CUDA when present, else CPU; anything else must be a device torch knows."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown train.device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"train.device is {name!r} but CUDA is not available")
    return device


def run_config_dict(cfg: Config, spec: RunSpec) -> dict[str, Any]:
    """The config of one SAE of the grid: every grid axis replaced by the spec's value."""
    data = cfg.model_dump()
    data["sae"]["dict_size"] = spec.dict_size
    data["sae"]["l1"] = spec.l1
    data["train"]["seed"] = spec.seed
    data["train"]["seeds"] = None
    return data


def run_id_for(cfg: Config, spec: RunSpec) -> str:
    """Readable and deterministic: the same config and spec always give the same id."""
    digest = hashlib.sha256(json.dumps(run_config_dict(cfg, spec), sort_keys=True).encode()).hexdigest()[:8]
    return f"{spec.arch}-m{spec.dict_size}-l1_{spec.l1:g}-s{spec.seed}-{digest}"


def build_sae(cfg: Config, spec: RunSpec, d: int, device: torch.device) -> SparseAutoencoder:
    return ARCHITECTURES[spec.arch](
        d=d,
        dict_size=spec.dict_size,
        seeds=[spec.seed],
        l1=[spec.l1],
        l1_reduction=cfg.sae.l1_reduction,
        decoder_bias=cfg.sae.decoder_bias,
    ).to(device)


def train_one(cfg: Config, spec: RunSpec, source: Source, store: RunStore, device: torch.device, progress: bool) -> dict[str, Any]:
    """Train, checkpoint and evaluate one SAE; returns its result row (also written to the store)."""
    run_id = run_id_for(cfg, spec)
    folder = store.out_dir / "runs" / run_id
    config = run_config_dict(cfg, spec)
    done = store.get(run_id)
    if done is not None and done["status"] == "done":
        return result_row(done)
    store.start_run(run_id, arch=spec.arch, dict_size=spec.dict_size, l1=spec.l1, seed=spec.seed, config=config, checkpoint=str(folder))
    sae = build_sae(cfg, spec, source.d, device)
    started = time.perf_counter()

    def on_log(samples: int, row: dict[str, torch.Tensor]) -> None:
        store.log_history(run_id, samples, {name: v[0].item() for name, v in row.items()})

    def on_checkpoint(state: TrainState, samples: int) -> None:
        save_checkpoint(
            folder, sae, samples=samples, config=config, optimizer=state.optimizer, extra={"step": state.step, "run_id": run_id}
        )
        store.record_progress(run_id, samples, time.perf_counter() - started)

    try:
        train(sae, source, cfg.train, on_log=on_log, on_checkpoint=on_checkpoint, progress=progress, description=run_id)
    except TrainingDiverged as err:
        store.fail_run(run_id, str(err))
        raise
    seconds = time.perf_counter() - started
    metrics = evaluate(sae, source, cfg.train.eval_samples, max(cfg.train.batch_size, 4096), cfg.sae.l1_reduction)[0]
    metrics["eval_seconds"] = time.perf_counter() - started - seconds
    store.finish_run(run_id, samples=cfg.train.samples, seconds=seconds, metrics=metrics)
    return result_row(store.get(run_id))


def result_row(run: dict[str, Any]) -> dict[str, Any]:
    """The JSON object `saekit train --json` prints for one SAE (DESIGN.md's contract, plus extras)."""
    row = {key: run[key] for key in ("run_id", "arch", "dict_size", "l1", "seed", "samples", "seconds", "status")}
    row.update(run["metrics"] or {})
    row["checkpoint"] = run["checkpoint"]
    return row


def run_config(
    cfg: Config,
    out_dir: str | Path,
    *,
    progress: bool = True,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Train every SAE the config describes into `out_dir`. Returns (result rows, errors of failed runs).

    Everything that can be checked is checked before the run store is touched: the device and
    the source (including any data file) are built first.
    """
    device = resolve_device(cfg.train.device)
    source = make_source(cfg.source, device)
    specs = expand_grid(cfg)
    results, errors = [], []
    with RunStore(out_dir) as store:
        for spec in specs:
            try:
                row = train_one(cfg, spec, source, store, device, progress)
            except TrainingDiverged as err:
                errors.append(f"{run_id_for(cfg, spec)}: {err}")
                row = result_row(store.get(run_id_for(cfg, spec)))
            results.append(row)
            if on_result is not None:
                on_result(row)
    return results, errors
