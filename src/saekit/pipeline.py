"""From a finished sweep folder to its analysis, estimate and report page (what `report` and `reproduce` run)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from saekit.analysis import estimate, heuristics, load_sweep
from saekit.errors import InputError
from saekit.report import write_report


def analyse_and_report(out_dir: str | Path) -> tuple[dict[str, Any] | None, Path]:
    """Compute the heuristics and (where the sweep allows it) the estimate, write OUT/report.html.

    Returns (estimate or None, report path). A sweep without two seeds at any size gets a report
    without an estimate rather than an error.
    """
    sweep = load_sweep(out_dir)
    analysis = heuristics(sweep)
    try:
        result = estimate(sweep, analysis)
    except InputError:
        result = None
    return result, write_report(Path(out_dir), sweep.runs, analysis, result)
