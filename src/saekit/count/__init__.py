"""The adaptive feature-count search (`saekit count`): from data or a config to the count curve and its verdict.

The data and the architecture come from the config (or a data path); the training recipe is the search's own
(`COUNT_TRAIN`), with any `--set train.KEY=VALUE` on top. Which knob values and sizes to train the search decides.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from saekit.config import Config, RunSpec, load_config
from saekit.count.search import RESULT_FILE, SearchContext, SearchSettings, read_result, run_search
from saekit.distributed import DistEnv, broadcast_object, distributed_env, process_group
from saekit.errors import InputError

__all__ = [
    "COUNT_TRAIN",
    "RESULT_FILE",
    "count_config",
    "count_features",
    "default_settings",
    "parse_duration",
    "read_result",
]

# The search's training recipe (docs/guides/count.md, "The recipe"): the report's batch, a 3x larger lr with a linear
# decay over the last 20%, and fewer samples than one SAE of `saekit train` (the search trains several per size).
COUNT_TRAIN: dict[str, Any] = {
    "batch_size": 256,
    "lr": 3e-3,
    "lr_decay": "linear",
    "samples": 1_000_000,
    "seeds": None,
    "matmul_precision": "medium",
    "eval_samples": 50_000,
}
PROBE_FRACTION = 0.15  # a probe trains this share of an SAE's samples
MIN_PROBE_SAMPLES = 50_000
MAX_SIZE_PER_D = 64  # the largest size tried: 64 d (counts up to about 32 d features)
# Recipe keys the config's own train section does not set (they are the search's); any other train key it keeps.
RECIPE_KEYS = (
    "batch_size",
    "lr",
    "lr_decay",
    "lr_decay_fraction",
    "lr_warmup",
    "samples",
    "seed",
    "seeds",
    "seeds_min_size",
    "matmul_precision",
    "eval_samples",
)
# The sae keys the search chooses itself (a config's values are ignored).
CHOSEN_SAE_KEYS = ("dict_size",)


def count_config(target: str | Path | None, overrides: list[str] = ()) -> Config:
    """The config a search runs on: `target` is a YAML config, an activations folder (with manifest.json), a folder
    holding a SAELens synthetic model, a tensor file, or None (the data the overrides describe, the toy source by
    default); `overrides` (`section.key=value`) apply on top. The config's train recipe keys give way to COUNT_TRAIN
    unless set in `overrides`."""
    from saekit.presets import overrides_dict

    given = overrides_dict(list(overrides))
    return _merge({} if target is None else _target_data(Path(target)), given)


def _target_data(path: Path) -> dict[str, Any]:
    """The config sections `path` gives the search: a YAML config's source, sae (but dict_size) and train keys outside
    the recipe; or a source reading the folder or file."""
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.suffix in (".yaml", ".yml"):
        data = load_config(path).model_dump(exclude_unset=True)
        data["train"] = {k: v for k, v in data.get("train", {}).items() if k not in RECIPE_KEYS}
        data["sae"] = {k: v for k, v in data.get("sae", {}).items() if k not in CHOSEN_SAE_KEYS}
        return data
    if path.is_dir():
        return {"source": {"kind": "activations" if (path / "manifest.json").is_file() else "synth", "path": str(path)}}
    return {"source": {"kind": "file", "path": str(path)}}


def _merge(data: dict[str, Any], given: dict[str, Any]) -> Config:
    """The config of `data` with the search's recipe, the offset handling of the sweep presets, and `given` on top."""
    from saekit.config import parse_config
    from saekit.presets import NO_OFFSET_KINDS, OFFSET_SAE

    source = {**data.get("source", {}), **given.get("source", {})}
    kind = source.get("kind", "toy")
    sae = {**data.get("sae", {}), **given.get("sae", {})}
    if kind not in NO_OFFSET_KINDS and sae.get("decoder_bias") is not False:
        sae = {**OFFSET_SAE, **sae}
    train = {**COUNT_TRAIN, **data.get("train", {}), **given.get("train", {})}
    merged = {"source": source, "sae": sae, "train": train}
    merged.update({k: v for k, v in given.items() if k not in merged})
    return parse_config(merged)


def default_settings(cfg: Config, d: int, budget_seconds: float | None = None) -> SearchSettings:
    """Sizes from d up to MAX_SIZE_PER_D x d by doubling; each SAE trains cfg.train.samples, each probe PROBE_FRACTION
    of that."""
    start = max(2, d)
    samples = cfg.train.samples
    return SearchSettings(
        probe_samples=max(MIN_PROBE_SAMPLES, int(PROBE_FRACTION * samples)),
        start_size=start,
        max_size=start * 2 ** int(math.log2(MAX_SIZE_PER_D * d / start)),
        budget_seconds=budget_seconds,
    )


def parse_duration(text: str) -> float:
    """'90', '90s', '15m', '1.5h' -> seconds (InputError for anything else, or a duration that is not positive)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(s|sec|m|min|h)?\s*", text or "")
    if not match:
        raise InputError(f"--budget: cannot read a duration from {text!r} (use e.g. 300s, 15m or 1.5h)")
    value = float(match.group(1)) * {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, None: 1}[match.group(2)]
    if value <= 0:
        raise InputError(f"--budget must be positive, got {text!r}")
    return value


def count_features(
    cfg: Config,
    out: str | Path,
    *,
    budget_seconds: float | None = None,
    settings: SearchSettings | None = None,
    progress: bool = True,
    max_memory: int | None = None,
    wait: bool = False,
    log: Any = None,
) -> dict[str, Any]:
    """Run (or resume) the search on `cfg`'s data into `out`; returns the result `saekit count --json` prints.

    Under torchrun (`saekit.distributed.distributed_env()`) rank 0 holds OUT, runs the search, writes count.json and
    logs; each call of `run_config` shares its SAEs among the ranks as `cfg.train.parallel` says, the other ranks
    training what rank 0 sends them (`RankTraining`). Every rank returns the result."""
    from saekit.train.run import hold_on_main, training_device

    out = Path(out)
    env = distributed_env()
    training = RankTraining(env, progress, max_memory)
    with process_group(env, training_device(cfg, env)), hold_on_main(out, env, wait):
        if not env.is_main:
            return training.follow()
        return training.lead(lambda: _search(cfg, out, settings, budget_seconds, max_memory, training, log))


def _search(
    cfg: Config,
    out: Path,
    settings: SearchSettings | None,
    budget_seconds: float | None,
    max_memory: int | None,
    train: RankTraining,
    log: Any,
) -> dict[str, Any]:
    """The search itself (`run_search`), training through `train`."""
    from saekit.archspec import ARCH_SPECS
    from saekit.count.knob import size_power
    from saekit.sources.shape import data_shape

    d = data_shape(cfg.source).d
    settings = settings or default_settings(cfg, d, budget_seconds)
    spec = ARCH_SPECS[cfg.sae.arch]
    power = size_power(spec.name, getattr(cfg.sae, "l1_reduction", "mean"))
    fits = _memory_check(cfg, d, max_memory)
    say = log or (lambda text: None)
    return run_search(SearchContext(cfg, out, d, spec, power, settings, train, say, fits))


class RankTraining:
    """`run_config` for the search on every rank. Rank 0 runs the search: each call sends the config, folder and SAEs
    to the other ranks, which train their share alongside (`follow`) until rank 0 sends the result or its error
    (`lead`). In a single process it is `run_config` alone."""

    def __init__(self, env: DistEnv, progress: bool, max_memory: int | None) -> None:
        self.env, self.progress, self.max_memory = env, progress, max_memory
        self.in_run = False  # an error raised in run_config stops every rank there: nothing to send

    def __call__(self, cfg: Config, folder: Path, specs: list[RunSpec]) -> tuple[list[dict[str, Any]], list[str]]:
        """Rank 0's call: every rank trains `specs` into `folder`; the rows (every SAE's) are rank 0's."""
        broadcast_object(("train", (cfg, folder, specs)), self.env)
        return self._run(cfg, folder, specs)

    def _run(self, cfg: Config, folder: Path, specs: list[RunSpec]) -> tuple[list[dict[str, Any]], list[str]]:
        from saekit.train.run import run_config

        self.in_run = True
        done = run_config(cfg, folder, progress=self.progress, max_memory=self.max_memory, dist_env=self.env, specs=specs)
        self.in_run = False
        return done

    def lead(self, search: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Rank 0: the search's result, sent to the other ranks; an error outside training, sent as one line."""
        try:
            result = search()
        except Exception as err:
            if not self.in_run:
                broadcast_object(("failed", (str(err), isinstance(err, InputError))), self.env)
            raise
        broadcast_object(("done", result), self.env)
        return result

    def follow(self) -> dict[str, Any]:
        """Another rank: train what rank 0 sends until it sends the result (returned) or its error (raised)."""
        while True:
            kind, payload = broadcast_object(None, self.env)
            if kind == "done":
                return payload
            if kind == "failed":
                message, bad_input = payload
                raise (InputError if bad_input else RuntimeError)(message)
            self._run(*payload)


def _memory_check(cfg: Config, d: int, max_memory: int | None) -> Any:
    """fits(n_members, dict_size) -> whether one size's ensemble fits the memory limit (as `saekit train` checks it)."""
    from saekit.device import resolve_device
    from saekit.train.evaluate import eval_batch_size
    from saekit.train.plan import ensemble_memory_bytes, evaluation_memory_bytes, memory_limit

    limit = memory_limit(max_memory, resolve_device(cfg.train.device, "train.device"), DistEnv())
    batch = cfg.train.batch_size

    def fits(n_members: int, dict_size: int) -> bool:
        evaluation = evaluation_memory_bytes(n_members, d, dict_size, eval_batch_size(batch))
        return ensemble_memory_bytes(n_members, d, dict_size, batch) + evaluation <= limit

    return fits
