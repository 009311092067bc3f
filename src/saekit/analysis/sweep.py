"""A finished sweep as the analysis sees it: the store's rows plus each run's learned directions."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from saekit.archspec import ARCH_SPECS, ArchSpec
from saekit.errors import InputError
from saekit.io import load_latent_stats, load_sae
from saekit.store import RunStore


@dataclass
class Sweep:
    """Finished runs of one output folder; directions are read from checkpoints on first use."""

    out_dir: Path
    runs: list[dict[str, Any]]
    _directions: dict[tuple[str, bool], torch.Tensor | None] = field(default_factory=dict, repr=False)

    @property
    def dict_sizes(self) -> list[int]:
        return sorted({r["dict_size"] for r in self.runs})

    @property
    def spec(self) -> ArchSpec:
        """The sweep's architecture (one per sweep: `load_sweep` refuses mixes)."""
        return ARCH_SPECS[self.runs[0].get("arch", "relu") if self.runs else "relu"]

    @property
    def knob(self) -> str:
        """The config key of the sweep's sparsity knob (l1, k or l0_coef); the runs' `knob_value` holds its values."""
        return self.spec.knob

    @property
    def knob_values(self) -> list[float]:
        return sorted({r["knob_value"] for r in self.runs})

    def select(self, dict_size: int | None = None, knob_value: float | None = None) -> list[dict[str, Any]]:
        """Runs of one size and/or one value of the knob, ordered by seed."""
        return sorted(
            (
                r
                for r in self.runs
                if (dict_size is None or r["dict_size"] == dict_size) and (knob_value is None or r["knob_value"] == knob_value)
            ),
            key=lambda r: r["seed"],
        )

    def live_directions(self, run: dict[str, Any], late: bool = False) -> torch.Tensor | None:
        """Unit decoder directions (n_live, d) of the latents that fired during the run's final evaluation;
        with `late=True` the same latents' directions at 80% of training (None if not saved)."""
        key = (run["run_id"], late)
        if key not in self._directions:
            stats = load_latent_stats(run["checkpoint"]) if run.get("checkpoint") else None
            if late:
                directions = None if stats is None else stats.get("late_directions")
            else:
                directions = load_sae(run["checkpoint"]).directions()[0]
            if directions is not None and stats is not None:
                directions = directions[stats["fire_counts"] > 0]
            self._directions[key] = directions
        return self._directions[key]


def load_sweep(out_dir: str | Path) -> Sweep:
    """The finished runs in `out_dir/runs.sqlite`; InputError if there is no store or no finished run."""
    out = Path(out_dir)
    if not (out / RunStore.FILENAME).is_file():
        raise InputError(f"no saekit run store in {out} (expected {out / RunStore.FILENAME})")
    with RunStore(out) as store:
        runs = [r for r in store.runs("done") if r["metrics"]]
    if not runs:
        raise InputError(f"{out} has no finished runs")
    archs = sorted({r["arch"] for r in runs})
    if len(archs) > 1:
        raise InputError(f"{out} mixes architectures ({', '.join(archs)}); analyse a sweep of one architecture")
    return Sweep(out, runs)
