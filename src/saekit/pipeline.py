"""From a finished sweep folder to its analysis, estimate and report page (what `report` and `reproduce` run)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from saekit.analysis import estimate, heuristics, load_sweep
from saekit.errors import InputError
from saekit.report import read_source_info, write_report

if TYPE_CHECKING:
    from saekit.config import Config


def analyse_and_report(out_dir: str | Path, result: dict[str, Any] | None = None) -> tuple[dict[str, Any] | None, Path]:
    """Compute the heuristics and (where the sweep allows it, unless `result` gives it, as the feature-count search
    does) the estimate, write OUT/report.html.

    Returns (estimate or None, report path). A sweep without two seeds at any size gets a report
    without an estimate rather than an error.
    """
    sweep = load_sweep(out_dir)
    analysis = heuristics(sweep)
    if result is None:
        try:
            result = estimate(sweep, analysis)
        except InputError:
            result = None
    return result, write_report(Path(out_dir), sweep.runs, analysis, result, read_source_info(out_dir))


def reproduce_search(
    out_dir: str | Path, overrides: list[str], *, progress: bool = True, max_memory: int | None = None, log: Any = None
) -> dict[str, Any]:
    """`saekit reproduce --preset quick`: the adaptive feature-count search (`saekit.count`) on the data the overrides
    describe (the report's toy data by default), then OUT/report.html with its curve.
    Returns {"estimate" (the search's result), "report", "runs", "errors"}. Refused under torchrun (the report is
    one process's)."""
    from saekit.count import count_features
    from saekit.presets import search_config
    from saekit.store import RunStore
    from saekit.train.run import refuse_several_processes, result_row

    refuse_several_processes()
    cfg = search_config(overrides)
    result = count_features(cfg, out_dir, progress=progress, max_memory=max_memory, log=log)
    _, report_path = analyse_and_report(out_dir, result)
    with RunStore(out_dir) as store:
        runs = [result_row(r) for r in store.runs()]
    return {"estimate": result, "report": str(report_path), "runs": runs, "errors": result["errors"]}


def _extract_lm(lm: dict[str, Any], out: Path, *, progress: bool, say: Any) -> dict[str, Any]:
    """Extract the activations the `lm.*` settings ask for to OUT/activations (resumable); returns the manifest.
    Without a layer, the model's middle layer."""
    from saekit.lm.extract import extract_activations
    from saekit.lm.models import load_model

    layer = lm["layer"]
    if layer is None:
        layer = load_model(str(lm["model"])).n_layers // 2
    what = f"{lm['model']} layer {layer} {lm['site']}, {lm['tokens']:,} tokens of {lm['text']}"
    say(f"saekit reproduce --preset lm: {what} -> {out / 'activations'}")
    return extract_activations(
        model=str(lm["model"]),
        layer=int(layer),
        site=str(lm["site"]),
        text=str(lm["text"]),
        tokens=int(lm["tokens"]),
        out=out / "activations",
        window=int(lm["window"]),
        dtype=str(lm["dtype"]),
        progress=progress,
    )


def _lm_sweep_config(out: Path, manifest: dict[str, Any], rest: list[str]) -> Config:
    """The lm preset's sweep config on OUT/activations, sized to the rows its source trains on."""
    from saekit.presets import lm_config
    from saekit.sources import make_source

    probe = lm_config(str(out / "activations"), int(manifest["d"]), 1, rest)
    train_rows = make_source(probe.source).train_rows
    return lm_config(str(out / "activations"), int(manifest["d"]), train_rows, rest)


def _recommended_dashboard(
    out: Path, results: list[dict[str, Any]], result: dict[str, Any] | None
) -> tuple[dict[str, Any] | None, Path | None]:
    """The recommended run and the path of the dashboard written for it, or (None, None) when there is none."""
    chosen = recommended_run(results, result)
    if chosen is None:
        return None, None
    from saekit.report.dashboard import write_dashboard

    return chosen, write_dashboard(out, chosen["run_id"])


def reproduce_lm(
    out_dir: str | Path, overrides: list[str], *, progress: bool = True, max_memory: int | None = None, log: Any = None
) -> dict[str, Any]:
    """`saekit reproduce --preset lm`: extract a language model's activations to OUT/activations (resumable), train the
    preset's sweep on them, estimate, write OUT/report.html and a dashboard of the recommended SAE.

    `overrides`: `lm.KEY=VALUE` for the extraction (see presets.LM_DEFAULTS), any other `section.key=value` for the sweep.
    Returns {"manifest", "estimate", "report", "dashboard", "runs", "errors", "seconds"}.
    """
    import time

    from saekit.presets import describe, split_lm_overrides
    from saekit.train.run import run_config

    say = log or (lambda text: None)
    out = Path(out_dir)
    lm, rest = split_lm_overrides(overrides)
    started = time.perf_counter()
    manifest = _extract_lm(lm, out, progress=progress, say=say)
    extract_seconds = time.perf_counter() - started
    cfg = _lm_sweep_config(out, manifest, rest)
    say(describe("lm", cfg))
    results, errors = run_config(cfg, out, progress=progress, max_memory=max_memory)
    result, report_path = analyse_and_report(out)
    chosen, dashboard_path = _recommended_dashboard(out, results, result)
    return {
        "manifest": manifest,
        "estimate": result,
        "report": str(report_path),
        "dashboard": None if dashboard_path is None else str(dashboard_path),
        "dashboard_run": None if chosen is None else chosen["run_id"],
        "runs": results,
        "errors": errors,
        "extract_seconds": extract_seconds,
        "seconds": time.perf_counter() - started,
    }


def recommended_run(results: list[dict[str, Any]], estimate: dict[str, Any] | None) -> dict[str, Any] | None:
    """The finished run the estimate recommends (its size and sparsity knob's value, seed 0 first), else the one with the lowest FVU
    among those with L0 <= 64, else the lowest FVU."""
    done = [r for r in results if r.get("status") == "done" and r.get("fvu") is not None]
    if not done:
        return None
    if estimate is not None:
        knob = estimate.get("knob", "l1")
        match = [r for r in done if r["dict_size"] == estimate.get("dict_size") and r.get(knob) == estimate.get(knob)]
        if match:
            return min(match, key=lambda r: r["seed"])
    sparse = [r for r in done if (r.get("l0") or 0) <= 64] or done
    return min(sparse, key=lambda r: r["fvu"])
