"""saekit.report: the self-contained HTML report of a sweep (figures, escaping, robustness, atomic write, a real browser)."""

from __future__ import annotations

import math
import re
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from browser import chromium_page
from saekit.archspec import RELU
from saekit.report import figures, render_report, write_report
from saekit.report.html import esc, estimate_sentence, fmt_number, render_figure, visible_columns

SIZES = [64, 128, 256]
L1S = [0.03, 0.1, 0.3]
SEEDS = [0, 1]
TRUE_FEATURES = 128  # the synthetic data below pretends G = 128 true features
EVIL_ID = 'toy-<script>alert("x")</script>'


# -- synthetic inputs following RunStore.runs() and the analysis / estimate schemas ----------------


def make_runs(*, truth: bool = True) -> list[dict]:
    """Rows shaped like RunStore.runs(): recovery is best at size >= G and α = 0.1; dead latents appear above G."""
    runs = []
    for m in SIZES:
        for a in L1S:
            for seed in SEEDS:
                mmcs = min(1.0, (0.98 if m >= TRUE_FEATURES else 0.72) - 0.12 * abs(math.log10(a / 0.1)) + 0.004 * seed)
                dead = max(0.0, 1.0 - TRUE_FEATURES / m) * (0.6 + a)
                mse = 2e-3 * (a / 0.03) ** 1.5 * (64 / m) ** 0.3
                sparsity = 0.4 / (a / 0.03) ** 0.8
                metrics = {
                    "mse": mse,
                    "fvu": mse * 40,
                    "l0": 12.0 / (a / 0.03) ** 0.5,
                    "dead_fraction": dead,
                    "mmcs": mmcs if truth else None,
                    "recovered_0_9": max(0.0, min(1.0, (mmcs - 0.7) / 0.28)) if truth else None,
                    "reconstruction_loss": mse,
                    "sparsity_loss": sparsity,
                    "l1_loss": a * sparsity,
                    "eval_samples": 8192,
                }
                runs.append(
                    {
                        "run_id": f"toy-m{m}-a{a}-s{seed}",
                        "arch": "relu",
                        "dict_size": m,
                        "knob": "l1",
                        "knob_value": a,
                        "l1": a,
                        "seed": seed,
                        "status": "done",
                        "samples": 200_000,
                        "seconds": 5.0 + m / 20.0,  # 8.2, 11.4, 17.8: one- and two-digit values, to catch text sorting
                        **{k: metrics[k] for k in ("mse", "fvu", "l0", "dead_fraction", "mmcs", "recovered_0_9")},
                        "metrics": metrics,
                        "config": {
                            "source": {
                                "kind": "toy",
                                "d": 32,
                                "n_features": TRUE_FEATURES,
                                "prob_decay": 0.99,
                                "mean_active": 5.0,
                                "seed": 0,
                            },
                            "sae": {"arch": "relu", "dict_size": m, "l1": a},
                            "train": {"batch_size": 256, "lr": 1e-3, "samples": 200_000, "seed": seed},
                        },
                        "checkpoint": f"ckpt/toy-m{m}-a{a}-s{seed}",
                        "error": None,
                    }
                )
    failed = dict(runs[-1], run_id="toy-m256-a0.3-s2", seed=2, status="failed", samples=1024, seconds=0.4, metrics=None, error="boom <&>")
    failed.update({k: None for k in ("mse", "fvu", "l0", "dead_fraction", "mmcs", "recovered_0_9")})
    evil = dict(runs[0], run_id=EVIL_ID, seed=7)
    return [*runs, failed, evil]


def make_analysis(runs: list[dict]) -> dict:
    done = [r for r in runs if r["status"] == "done"]
    exponent, prefactor = 0.5, 0.05 / 64**0.5  # collapse α = 0.05, 0.0707, 0.1 at sizes 64, 128, 256
    return {
        "knob": "l1",
        "dict_sizes": SIZES,
        "knob_values": L1S,
        "dead": [
            {
                **{k: r[k] for k in ("dict_size", "knob_value", "seed", "dead_fraction")},
                "live_latents": r["dict_size"] * (1 - r["dead_fraction"]),
            }
            for r in done
        ],
        "loss_terms": [
            {
                **{k: r[k] for k in ("dict_size", "knob_value", "seed")},
                **{k: r["metrics"][k] for k in ("reconstruction_loss", "sparsity_loss", "l1_loss")},
            }
            for r in done
        ],
        "collapse": {
            "points": [{"dict_size": m, "knob_collapse": prefactor * m**exponent} for m in SIZES],
            "power_law": {"exponent": exponent, "prefactor": prefactor, "r2": 0.99},
        },
        "cross_size": [
            {
                "dict_size": m,
                "larger_size": big,
                "knob_value": a,
                "mmcs": 0.95 if m < TRUE_FEATURES else 0.7,
                "matched_fraction": 0.9 if m < TRUE_FEATURES else 0.5,
            }
            for m in SIZES
            for big in SIZES
            if big > m
            for a in L1S
        ],
        "consensus": [
            {"dict_size": m, "knob_value": a, "count": 120 + 10 * i, "agreement": 0.8 - 0.1 * i} for m in SIZES for i, a in enumerate(L1S)
        ],
    }


ESTIMATE = {
    "n_features": 128,
    "low": 100,
    "high": 160,
    "dict_size": 128,
    "l1": 0.1,
    "signals": [
        {"name": "dead-latent onset", "value": 128, "agrees": True, "note": "dead latents appear above 128"},
        {"name": "cross-size MMCS drop", "value": 0.7, "agrees": False, "note": "drop is <b>shallow</b> & noisy"},
    ],
    "summary": "Two of three signals agree on about 128 features.",
}


class _TagBalance(HTMLParser):
    """Counts unclosed / stray non-void tags: a cheap well-formedness check of the generated page."""

    VOID = {"meta", "img", "br", "hr", "input", "link", "col", "source", "wbr"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"stray </{tag}> (open: {self.stack[-3:]})")
        else:
            self.stack.pop()


def assert_valid_page(text: str) -> None:
    assert text.startswith("<!DOCTYPE html>")
    assert text.rstrip().endswith("</html>")
    parser = _TagBalance()
    parser.feed(text)
    parser.close()
    assert parser.errors == [] and parser.stack == [], (parser.errors, parser.stack)
    # offline: no resource is fetched from anywhere (no src/href to a URL, no <link>, no CSS url()/@import)
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:|//)""", text, re.IGNORECASE)
    assert "<link" not in text.lower() and "@import" not in text and "url(" not in text


# -- the page --------------------------------------------------------------------------------------


def test_write_report_full_sweep(tmp_path: Path) -> None:
    runs = make_runs()
    path = write_report(tmp_path, runs, make_analysis(runs), ESTIMATE)
    assert path == tmp_path / "report.html" and path.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]  # no temp file left
    text = path.read_text(encoding="utf-8")
    assert_valid_page(text)
    # one image per figure drawn: recovery heatmaps, frontier, dead latents, loss terms, cross-size MMCS, consensus;
    # feature density is a note (the fixture's checkpoint folders do not exist)
    assert text.count("<img") == text.count("<figure") == 6
    assert text.count('src="data:image/png;base64,') == 6
    assert f"{len(runs) - 1} of {len(runs) - 1} finished runs skipped" in text
    for r in runs:
        assert esc(r["run_id"]) in text
    # the hostile run_id, error and note appear only escaped; the only <script> element is the page's own
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in text
    assert text.count("<script") == 1
    assert "boom &lt;&amp;&gt;" in text and "<b>shallow</b>" not in text
    # the header: data config, number of runs, the estimate in one sentence plus its summary
    assert "n_features=128" in text and f"{len(runs)} runs" in text
    assert "Estimated number of true features: 128 (range 100–160)" in text
    assert "Recommended dictionary size 128 with L1 coefficient α = 0.1" in text
    assert ESTIMATE["summary"] in text
    # sections in the order of the brief
    order = [text.index(f'id="{sid}"') for sid in ("recovery", "sparsity", "density", "dead", "loss", "cross", "estimate", "runs")]
    assert order == sorted(order)
    assert "✓ agrees" in text and "✗ disagrees" in text


def test_write_report_replaces_existing_report(tmp_path: Path) -> None:
    (tmp_path / "report.html").write_text("old")
    runs = make_runs()[:3]
    write_report(tmp_path, runs, {}, None)
    assert (tmp_path / "report.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]


def _no_truth_runs() -> list[dict]:
    runs = make_runs(truth=False)
    for r in runs:
        r["config"]["source"] = {"kind": "activations", "path": "shards/"}
    return runs


@pytest.mark.parametrize(
    "case",
    ["no_ground_truth", "single_run", "no_runs", "single_size", "single_l1", "analysis_without_collapse"],
)
def test_write_report_degenerate_inputs(tmp_path: Path, case: str) -> None:
    runs, analysis, estimate = make_runs(), None, None
    if case == "no_ground_truth":
        runs = _no_truth_runs()
        analysis = make_analysis(runs)
        estimate = ESTIMATE
    elif case == "single_run":
        runs, analysis = runs[:1], {}
    elif case == "no_runs":
        runs, analysis = [], {}
    elif case == "single_size":
        runs = [r for r in runs if r["dict_size"] == 128]
        analysis = {"dead": [], "cross_size": [], "collapse": {"points": [], "power_law": None}}
    elif case == "single_l1":
        runs = [r for r in runs if r["knob_value"] == 0.1]
        analysis = {"consensus": [{"dict_size": 64, "knob_value": 0.1, "count": 3, "agreement": 1.0}]}
        estimate = {"n_features": None, "signals": [], "summary": ""}
    elif case == "analysis_without_collapse":
        analysis = make_analysis(runs)
        analysis["collapse"] = {}
    path = write_report(tmp_path, runs, analysis, estimate)
    text = path.read_text(encoding="utf-8")
    assert_valid_page(text)
    for r in runs:
        assert esc(r["run_id"]) in text
    assert text.count("<img") == text.count("<figure")
    if case == "no_ground_truth":
        assert "No ground truth" in text and 'data-figure="recovery-' not in text
        assert "n_features=" not in text and "kind=activations" in text
    if case in ("single_run", "no_runs"):
        assert "No feature-count estimate was made" in text
        assert "Needs at least two dictionary sizes" in text
        assert "Needs at least two values of L1 coefficient α" in text
    if case == "single_size":
        assert "Needs at least two dictionary sizes" in text and 'data-figure="loss"' in text
    if case == "single_l1":
        assert "Needs at least two values of L1 coefficient α" in text and 'data-figure="dead"' in text
    if case == "analysis_without_collapse":
        assert "No collapse points" in text


def test_runs_table_shows_synthsaebench_scores_and_absorption_only_where_measured(tmp_path: Path) -> None:
    """MCC, F1, absorption, split and shrinkage are columns of the run table when runs have them (generated data with
    parent features); a sweep without parents has no absorption column, one without truth none of the five."""
    runs = make_runs()
    for i, r in enumerate(runs):
        if r["status"] == "done":
            r.update(mcc=0.81 + i / 1000, f1=0.4, split=i % 3, shrinkage=0.93, absorption=0.125 + i / 1000)
    keys = [k for k, _, _ in visible_columns(runs)]
    assert keys.index("recovered_0_9") < keys.index("mcc") < keys.index("f1") < keys.index("absorption") < keys.index("split")
    text = write_report(tmp_path / "h", runs, None, None).read_text(encoding="utf-8")
    assert_valid_page(text)
    for key in ("mcc", "f1", "absorption", "split", "shrinkage"):
        assert f'data-key="{key}"' in text
    assert ">0.125<" in text  # the first run's absorption, as a cell
    flat = make_runs()
    for r in flat:
        r.update(mcc=0.99, f1=0.9, split=0, shrinkage=0.97)  # no parent features: no absorption value
    assert "absorption" not in [k for k, _, _ in visible_columns(flat)] and "mcc" in [k for k, _, _ in visible_columns(flat)]
    assert not {"mcc", "f1", "absorption", "split", "shrinkage"} & {k for k, _, _ in visible_columns(_no_truth_runs())}


def test_figures_fall_back_to_run_rows_without_analysis() -> None:
    """Dead latents and loss terms come from the run table when the analysis has no rows for them."""
    runs = make_runs()
    dead = figures.dead_latents({}, runs, knob=RELU)
    loss = figures.loss_terms({}, runs, knob=RELU)
    assert dead.png and dead.png.startswith("data:image/png;base64,") and "Derived from the run table" in dead.caption
    assert loss.png and "Derived from the run table" in loss.caption
    assert figures.cross_size({}, knob=RELU).png is None and figures.consensus({}, knob=RELU).png is None


@pytest.mark.parametrize("missing", [None, "file"])
def test_write_report_is_atomic_when_rendering_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, missing: str | None) -> None:
    if missing == "file":
        (tmp_path / "report.html").write_text("old report")

    def broken(*args, **kwargs):
        raise RuntimeError("figure failed")

    monkeypatch.setattr(figures, "cross_size", broken)
    runs = make_runs()
    with pytest.raises(RuntimeError, match="figure failed"):
        write_report(tmp_path, runs, make_analysis(runs), ESTIMATE)
    if missing == "file":
        assert (tmp_path / "report.html").read_text() == "old report"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]
    else:
        assert list(tmp_path.iterdir()) == []


def test_write_report_is_atomic_when_writing_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure after the temp file exists (here: os.replace) removes the temp file and keeps the old report."""
    (tmp_path / "report.html").write_text("old report")

    def broken_replace(src, dst):
        raise OSError("disk full")

    import saekit.atomic

    monkeypatch.setattr(saekit.atomic.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_report(tmp_path, make_runs()[:2], {}, None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]
    assert (tmp_path / "report.html").read_text() == "old report"


# -- small pieces ----------------------------------------------------------------------------------


def test_fmt_number() -> None:
    assert fmt_number(None) == "—"
    assert fmt_number(256) == "256"
    assert fmt_number(0.123456) == "0.1235"
    assert fmt_number(3.0e-5) == "3e-05"
    assert fmt_number(12345.678) == "12346"
    assert fmt_number(float("nan")) == "nan"
    assert fmt_number(0.1) == "0.1"


def test_mean_by_averages_over_seeds_and_skips_missing() -> None:
    rows = [
        {"dict_size": 64, "l1": 0.1, "seed": 0, "mmcs": 0.5},
        {"dict_size": 64, "l1": 0.1, "seed": 1, "mmcs": 0.7},
        {"dict_size": 64, "l1": 0.1, "seed": 2, "mmcs": None},
        {"dict_size": 64, "l1": 0.3, "seed": 0, "mmcs": float("nan")},
    ]
    assert figures.mean_by(rows, ("dict_size", "l1"), "mmcs") == {(64, 0.1): pytest.approx(0.6)}


def test_series_colors_are_okabe_ito_then_cividis() -> None:
    assert figures.series_colors(3) == list(figures.OKABE_ITO[:3])
    many = figures.series_colors(12)
    assert len(set(many)) == 12


def test_estimate_sentence_and_render_figure() -> None:
    assert estimate_sentence(None).startswith("No feature-count estimate")
    assert estimate_sentence({"n_features": 500, "low": 400, "high": 640, "dict_size": 512, "l1": 0.03}) == (
        "Estimated number of true features: 500 (range 400–640). Recommended dictionary size 512 with L1 coefficient α = 0.03."
    )
    skipped = figures.FigureBlock(key="x", title="T <1>", caption="c", note="why & how")
    assert render_figure(skipped) == '<p class="note" data-figure="x">T &lt;1&gt;: why &amp; how</p>'


def test_recovery_heatmaps_one_per_arch() -> None:
    runs = make_runs()
    other = [dict(r, arch="topk", run_id=r["run_id"] + "-topk") for r in runs]
    blocks = figures.recovery_heatmaps(runs + other)
    assert [b.key for b in blocks] == ["recovery-relu", "recovery-topk"]
    assert all(b.png for b in blocks)
    # best cell: size 128 (the first of the tied sizes >= G), α = 0.1, MMCS (0.98 + 0.984) / 2 over seeds 0 and 1
    assert "best MMCS 0.982 at dictionary size 128, α = 0.1" in blocks[0].title


def test_render_report_returns_the_page() -> None:
    text = render_report(make_runs()[:1], None, None)
    assert_valid_page(text)


# -- a real browser --------------------------------------------------------------------------------


@pytest.mark.browser
def test_report_renders_in_chromium(tmp_path: Path) -> None:

    runs = make_runs()
    path = write_report(tmp_path / "out", runs, make_analysis(runs), ESTIMATE)
    started = time.perf_counter()
    with chromium_page(path, viewport=(1360, 900)) as opened:
        page, errors, requests = opened.page, opened.errors, opened.requests

        widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
        assert len(widths) == 6 and all(w > 0 for w in widths), widths
        assert all(u.startswith(("file:", "data:")) for u in requests), requests

        keys = page.eval_on_selector_all("#runs-table thead th", "hs => hs.map(h => h.dataset.key)")
        assert keys == [k for k, _, _ in visible_columns(runs)]

        def column(name: str) -> list[str]:
            i = keys.index(name)
            return page.eval_on_selector_all(
                "#runs-table tbody tr", f"rows => rows.map(r => r.cells[{i}].getAttribute('data-v') ?? r.cells[{i}].textContent)"
            )

        def header(name: str) -> str:
            return f'#runs-table thead th[data-key="{name}"]'

        before = column("seconds")
        page.click(header("seconds"))
        after = column("seconds")
        numbers = [float(v) for v in after if v not in (None, "—")]
        assert after != before
        assert numbers == sorted(numbers) and len(numbers) == len(runs)  # numeric order: 0.4 < 8.2 < 11.4 < 17.8
        page.click(header("seconds"))
        desc = [float(v) for v in column("seconds")]
        assert desc == sorted(desc, reverse=True)
        page.click(header("mmcs"))
        mmcs = column("mmcs")
        present = [float(v) for v in mmcs if v not in (None, "—")]
        assert present == sorted(present) and mmcs[-1] in (None, "—")  # the failed run (no MMCS) sorts last
        assert page.get_attribute(header("mmcs"), "aria-sort") == "ascending"

        shot = tmp_path / "report.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
    assert errors == []
    print(f"browser test: {time.perf_counter() - started:.1f}s in Chromium, screenshot {tmp_path / 'report.png'}")
