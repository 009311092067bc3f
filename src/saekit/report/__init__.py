"""A sweep's report: one self-contained HTML page (`OUT/report.html`) with the figures the report's heuristics need.

`write_report(out_dir, runs, analysis, estimate)` takes the run rows (`RunStore.runs()`), the analysis dict
(`saekit.analysis`) and the feature-count estimate (or None), draws the figures (`figures.py`), lays out the
page (`html.py`) and writes it atomically.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from saekit.atomic import atomic_write_bytes
from saekit.report import figures
from saekit.report.html import render_page

__all__ = ["render_report", "write_report"]

REPORT_NAME = "report.html"


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


def render_report(runs: list[dict[str, Any]], analysis: dict[str, Any] | None, estimate: dict[str, Any] | None) -> str:
    """The report page as an HTML string (see `write_report`)."""
    runs = list(runs or [])
    analysis = analysis or {}
    truth = _true_feature_count(runs)
    n_est = figures.finite((estimate or {}).get("n_features"))
    blocks = {
        "recovery": figures.recovery_heatmaps(runs),
        "dead": [figures.dead_latents(analysis, runs, true_features=truth, estimate=n_est)],
        "loss": [figures.loss_terms(analysis, runs)],
        "cross": [figures.cross_size(analysis, true_features=truth, estimate=n_est)],
        "consensus": [figures.consensus(analysis, true_features=truth, estimate=n_est)],
    }
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return render_page(runs=runs, estimate=estimate, figures=blocks, generated=generated)


def write_report(out_dir: Path, runs: list[dict[str, Any]], analysis: dict[str, Any], estimate: dict[str, Any] | None) -> Path:
    """Write `out_dir/report.html` atomically (temp file in the same folder, then `os.replace`) and return its path.

    The page is rendered completely before anything is written, so a failure leaves an existing report untouched
    and no temp file behind.
    """
    out_dir = Path(out_dir)
    page = render_report(runs, analysis, estimate)
    target = out_dir / REPORT_NAME
    atomic_write_bytes(target, page.encode("utf-8"))
    return target
