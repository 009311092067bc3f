"""The Python API a notebook uses: `saekit.train`, `saekit.estimate`, `saekit.report`.

Each function calls what the matching `saekit` command calls and returns what that command prints with
`--json` (for `report`, the path it prints). Nothing heavy is imported until a function runs, so
`import saekit` stays light.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from saekit.errors import InputError

if TYPE_CHECKING:
    from saekit.config import Config


def train(
    config_or_path: str | os.PathLike | dict | Config | None = None,
    *,
    out: str | os.PathLike = "saekit-out",
    progress: bool = True,
    overrides: dict[str, Any] | None = None,
    max_memory: int | str | None = None,
    **keyword_overrides: Any,
) -> list[dict[str, Any]]:
    """Train every SAE a config describes, as `saekit train CONFIG --out OUT --json` does.

    Args:
        config_or_path: a YAML file (path), a nested dict (`{"sae": {"l1": 0.1}}`), a
            `saekit.config.Config`, or None for the defaults (the report's toy setup).
        out: output folder. It gets `runs.sqlite` and one checkpoint folder per SAE. Running
            again on the same folder skips finished SAEs and resumes unfinished ones.
        progress: show progress bars (on stderr).
        overrides: dotted keys and Python values, e.g. `{"sae.l1": [0.1, 0.3], "train.samples": 10_000}`
            (`"sae__l1"` works too). A list in a grid key makes a grid, as in YAML.
        max_memory: refuse sweeps estimated to need more memory than this (bytes, or text such as
            `"12G"`). None: 80% of the available memory.
        **keyword_overrides: the same overrides as keyword arguments, with `__` for the dot:
            `sae__l1=0.1` is `overrides={"sae.l1": 0.1}`.

    Returns:
        One dict per SAE, the objects `saekit train --json` prints: `run_id`, `arch`, `dict_size`, `l1`,
        `seed`, `samples`, `seconds`, `status`, `mse`, `fvu`, `l0`, `dead_fraction`, ... and, when the
        source knows its true features, `mmcs` and `recovered_0_9`.

    Raises:
        saekit.errors.InputError: an unknown key, a bad value, a missing file, a sweep too large.

    A run whose loss became NaN or Inf is returned with `status` "failed"; its reason is given as a
    `RuntimeWarning`.
    """
    from saekit.distributed import distributed_env
    from saekit.train.run import run_config

    cfg = resolve_config(config_or_path, overrides, keyword_overrides)
    limit = _memory_limit(max_memory)
    rows, errors = run_config(cfg, Path(out), progress=progress, max_memory=limit, dist_env=distributed_env())
    for error in errors:
        warnings.warn(error, RuntimeWarning, stacklevel=2)
    return rows


def estimate(out_dir: str | os.PathLike) -> dict[str, Any]:
    """The feature-count and hyperparameter estimate of a finished sweep, as `saekit estimate OUT --json` prints it.

    It reads the run store and the checkpoints, never ground truth. For a folder of `saekit count` it is the search's
    result (OUT/count.json), whose count comes from the curve over dictionary size.

    Returns:
        A dict with at least `n_features` (the estimate), `low`, `high` (its range), `dict_size` and the
        recommended value of the sparsity knob (`l1`, or `k` for TopK sweeps; `knob` names it), `stable`,
        `signals` (the report's heuristics and whether each agrees) and `summary` (one sentence).

    Raises:
        saekit.errors.InputError: the folder holds no sweep, or the sweep cannot give an estimate
            (for example no size was trained with two init seeds).
    """
    from saekit.analysis import estimate as estimate_features
    from saekit.analysis import load_sweep
    from saekit.count import read_result

    counted = read_result(out_dir)  # a folder of `saekit count`: its curve gives the estimate
    if counted is not None:
        return counted
    return estimate_features(load_sweep(Path(out_dir)))


def report(out_dir: str | os.PathLike) -> Path:
    """Write `OUT/report.html` for a finished sweep, as `saekit report OUT` does, and return its path.

    The page is self-contained (figures embedded) and opens offline. A sweep that cannot give an
    estimate still gets a report, without the estimate.
    """
    from saekit.pipeline import analyse_and_report

    _, path = analyse_and_report(Path(out_dir))
    return Path(path)


def resolve_config(
    config_or_path: str | os.PathLike | dict | Config | None,
    overrides: dict[str, Any] | None = None,
    keyword_overrides: dict[str, Any] | None = None,
) -> Config:
    """A validated Config from what `train` accepts, with the overrides applied (InputError when anything is wrong)."""
    from saekit.config import Config, load_config, parse_config, set_key

    changes = {key.replace("__", ".") if isinstance(key, str) else key: value for key, value in (overrides or {}).items()}
    for name, value in (keyword_overrides or {}).items():
        if "__" not in name:
            raise InputError(f"unknown argument {name!r}: overrides as keyword arguments are section__key, e.g. sae__l1=0.1")
        changes[name.replace("__", ".")] = value
    if isinstance(config_or_path, Config):
        if not changes:
            return config_or_path
        data = config_or_path.model_dump(exclude_unset=True)
    elif isinstance(config_or_path, dict):
        data = copy.deepcopy(config_or_path)
    elif config_or_path is None:
        data = {}
    elif isinstance(config_or_path, (str, os.PathLike)):
        cfg = load_config(config_or_path)
        if not changes:
            return cfg
        data = cfg.model_dump(exclude_unset=True)
    else:
        raise InputError(f"config must be a YAML path, a dict, a saekit.config.Config or None, got {type(config_or_path).__name__}")
    for key, value in changes.items():
        set_key(data, key, copy.deepcopy(value), what="override key")
    return parse_config(data)


def _memory_limit(max_memory: int | str | None) -> int | None:
    if max_memory is None or isinstance(max_memory, int) and not isinstance(max_memory, bool):
        return max_memory
    if isinstance(max_memory, str):
        from saekit.train.sweep import parse_bytes

        try:
            return parse_bytes(max_memory)
        except ValueError as err:
            raise InputError(f"max_memory: {err}") from None
    raise InputError(f"max_memory must be a number of bytes or text such as '12G', got {max_memory!r}")
