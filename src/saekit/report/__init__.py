"""A sweep's report: one self-contained HTML page (`OUT/report.html`) with the figures the report's heuristics need.

`write_report(out_dir, runs, analysis, estimate, source_info)` takes the run rows (`RunStore.runs()`), the
analysis dict (`saekit.analysis`), the feature-count estimate (or None) and what the source said of itself
(OUT/source.json, see `read_source_info`; or None), reads each run's latent statistics (`latents.py`), draws the
figures (`figures.py`), lays out the page (`html.py`) and writes it atomically.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from saekit.archspec import ARCH_SPECS, RELU, ArchSpec, spec_for_knob
from saekit.atomic import atomic_write_bytes
from saekit.report import figures
from saekit.report.html import render_page
from saekit.report.latents import load_latent_rates

__all__ = ["read_source_info", "render_report", "write_report"]

REPORT_NAME = "report.html"
SOURCE_INFO = "source.json"  # written by the training run (saekit.train.run.SOURCE_INFO)


def read_source_info(out_dir: str | Path) -> dict[str, Any] | None:
    """OUT/source.json as a dict, or None when it is missing, unreadable or not a JSON object (a report never fails on it)."""
    try:
        info = json.loads((Path(out_dir) / SOURCE_INFO).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _true_feature_count(runs: list[dict[str, Any]]) -> int | None:
    """G, only when the data has ground truth (some run has an MMCS): the number of ground-truth directions
    the runs were scored against (`n_true_features`; for tms/compute the features the model represents),
    else the data config's n_features."""
    if not any(r.get("mmcs") is not None for r in runs):
        return None
    for r in runs:
        n = r.get("n_true_features", (r.get("metrics") or {}).get("n_true_features"))
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return n
    for r in runs:
        n = ((r.get("config") or {}).get("source") or {}).get("n_features")
        if isinstance(n, (int, float)) and not isinstance(n, bool) and n > 0:
            return int(n)
    return None


def render_report(
    runs: list[dict[str, Any]],
    analysis: dict[str, Any] | None,
    estimate: dict[str, Any] | None,
    source_info: dict[str, Any] | None = None,
    *,
    out_dir: str | Path | None = None,
) -> str:
    """The report page as an HTML string (see `write_report`); `out_dir` lets run folders be found after the sweep moved."""
    runs = list(runs or [])
    analysis = analysis or {}
    truth = _true_feature_count(runs)
    n_est = figures.finite((estimate or {}).get("n_features"))
    rates, skipped = load_latent_rates(runs, Path(out_dir) if out_dir is not None else None)
    knob = ARCH_SPECS.get(runs[0].get("arch"), RELU) if runs else RELU  # the sweep's architecture names its knob
    blocks = _figure_blocks(runs, analysis, rates, skipped, truth, n_est, knob)
    blocks["count"] = _count_blocks(estimate, knob)
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return render_page(runs=runs, estimate=estimate, figures=blocks, generated=generated, source_info=source_info)


def _figure_blocks(
    runs: list, analysis: dict, rates: Any, skipped: Any, truth: int | None, n_est: float | None, knob: ArchSpec
) -> dict[str, list]:
    return {
        "recovery": figures.recovery_heatmaps(runs),
        "sparsity": [figures.sparsity_frontier(runs, knob=knob)],
        "density": [figures.feature_density(rates, skipped, knob=knob)],
        "dead": [figures.dead_latents(analysis, runs, knob=knob, true_features=truth, estimate=n_est)],
        "loss": [figures.loss_terms(analysis, runs, knob=knob)],
        "cross": [figures.cross_size(analysis, knob=knob, true_features=truth, estimate=n_est)],
        "consensus": [figures.consensus(analysis, knob=knob, true_features=truth, estimate=n_est)],
    }


def _count_blocks(estimate: dict[str, Any] | None, knob: ArchSpec) -> list:
    """The count-curve figure of a `saekit count` result (an estimate with a non-empty `curve`); none otherwise."""
    curve = (estimate or {}).get("curve")
    if not isinstance(curve, list) or not curve:
        return []
    try:
        knob = spec_for_knob(estimate["knob"]) if estimate.get("knob") not in (None, knob.knob) else knob
    except KeyError:
        pass
    return [figures.count_curve(curve, fit=estimate.get("fit"), sentence=estimate.get("sentence"), knob=knob)]


def write_report(
    out_dir: Path,
    runs: list[dict[str, Any]],
    analysis: dict[str, Any],
    estimate: dict[str, Any] | None,
    source_info: dict[str, Any] | None = None,
) -> Path:
    """Write `out_dir/report.html` atomically (temp file in the same folder, then `os.replace`) and return its path.

    The page is rendered completely before anything is written, so a failure leaves an existing report untouched
    and no temp file behind.
    """
    out_dir = Path(out_dir)
    page = render_report(runs, analysis, estimate, source_info, out_dir=out_dir)
    target = out_dir / REPORT_NAME
    atomic_write_bytes(target, page.encode("utf-8"))
    return target
