"""Run identity: the config of one SAE of a grid, and its id (deterministic, so a rerun finds its finished runs)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from saekit.config import TRAIN_KEYS_NEW_IN_V2, Config, RunSpec, TrainConfig, expand_grid

# Keys that change how a run is watched or where it runs, not what it computes: left out of its id.
_NOT_IN_RUN_ID = ("device", "log_every", "checkpoint_every", "parallel")


def run_config_dict(cfg: Config, spec: RunSpec) -> dict[str, Any]:
    """The config of one SAE of the grid: every grid axis replaced by the spec's value."""
    data = cfg.model_dump()
    data["sae"]["dict_size"] = spec.dict_size
    data["sae"][spec.knob] = spec.knob_value
    data["train"]["seed"] = spec.seed
    data["train"]["seeds"] = None
    return data


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


def grid_runs(cfg: Config, specs: list[RunSpec] | None = None) -> tuple[list[RunSpec], list[str]]:
    """Every SAE the config describes (or `specs`, each with the config's other settings), once each: (specs, run ids)
    in order (a repeated value, which gives a run id already seen, adds no run)."""
    first: dict[str, RunSpec] = {}
    for spec in expand_grid(cfg) if specs is None else specs:
        first.setdefault(run_id_for(cfg, spec), spec)
    return list(first.values()), list(first)
