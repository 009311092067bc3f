"""Per-latent firing statistics of finished runs, read for the report's feature-density figure.

Each finished run's folder holds `latents.safetensors` with `fire_counts` (m,) and `eval_samples` (a scalar),
checked against the SHA-256 in its cfg.json by `saekit.io.load_latent_stats`. A report must never fail on one
bad run folder, so every run whose statistics cannot be read is skipped with a short reason instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["LatentRates", "load_latent_rates", "run_folder"]


@dataclass(frozen=True)
class LatentRates:
    """One run's firing frequencies: `counts` (m,) fires over `eval_samples` evaluation samples."""

    run_id: str
    arch: str
    dict_size: int
    knob_value: float
    counts: np.ndarray
    eval_samples: float

    @property
    def dead(self) -> int:
        """Latents that never fired on the evaluation samples."""
        return int((self.counts == 0).sum())

    @property
    def live_log10_freq(self) -> np.ndarray:
        """log10(fires / samples) of the latents that fired at least once."""
        live = self.counts[self.counts > 0]
        return np.log10(live / self.eval_samples)


def run_folder(run: dict[str, Any], out_dir: Path | None) -> Path | None:
    """The run's checkpoint folder: the stored path when it exists, else OUT/runs/RUN_ID (a sweep folder moved since)."""
    stored = run.get("checkpoint")
    if stored and Path(stored).is_dir():
        return Path(stored)
    if out_dir is not None and run.get("run_id"):
        moved = Path(out_dir) / "runs" / str(run["run_id"])
        if moved.is_dir():
            return moved
    return Path(stored) if stored else None


def _rates(run: dict[str, Any], folder: Path) -> LatentRates:
    """Read and check one run's statistics; ValueError (one line) when they are missing or do not make sense."""
    from saekit.io import load_latent_stats  # torch is imported only when a report reads latents

    stats = load_latent_stats(folder)
    if stats is None or "fire_counts" not in stats or "eval_samples" not in stats:
        raise ValueError("no fire_counts/eval_samples recorded")
    counts = stats["fire_counts"].detach().cpu().double().numpy()
    samples = float(stats["eval_samples"].detach().cpu().double().reshape(-1)[0])
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError(f"fire_counts has shape {tuple(counts.shape)}, expected (m,)")
    if not (np.isfinite(samples) and samples > 0):
        raise ValueError(f"eval_samples is {samples}")
    if not np.all(np.isfinite(counts)) or counts.min() < 0 or counts.max() > samples:
        raise ValueError("fire_counts outside [0, eval_samples]")
    return LatentRates(
        run_id=str(run.get("run_id")),
        arch=str(run.get("arch")),
        dict_size=int(run.get("dict_size") or counts.size),
        knob_value=float(run.get("knob_value") or 0.0),
        counts=counts,
        eval_samples=samples,
    )


def load_latent_rates(runs: list[dict[str, Any]], out_dir: Path | None = None) -> tuple[list[LatentRates], list[str]]:
    """(rates of every finished run that has readable statistics, one 'run_id: reason' per finished run skipped).

    Runs that did not finish (status other than done) have no statistics and are neither read nor counted.
    """
    found: list[LatentRates] = []
    skipped: list[str] = []
    for run in runs:
        if run.get("status", "done") != "done":
            continue
        folder = run_folder(run, out_dir)
        if folder is None:
            skipped.append(f"{run.get('run_id')}: no checkpoint folder recorded")
            continue
        try:
            found.append(_rates(run, folder))
        except Exception as err:  # noqa: BLE001 - any unreadable file is a skipped run, never a failed report
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            skipped.append(f"{run.get('run_id')}: {reason}")
    return found, skipped
