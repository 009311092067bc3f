"""saekit.report: the count curve of `saekit count` on the report page (figure, table, verdict) and its absence elsewhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from saekit.archspec import TOPK
from saekit.report import figures, render_report, write_report
from saekit.report.html import count_curve_points, esc
from test_report import assert_valid_page

SIZES = [128, 256, 512, 1024]
SENTENCE = "saturated at 480 features (450-510): the counts at 512 and 1024 latents agree"
REASONS = ["at 256 latents neighbouring knob values give 300-<b>420</b>"]


def make_runs() -> list[dict]:
    """Rows shaped like RunStore.runs() of a count folder: a seed pair of TopK SAEs per size."""
    return [
        {
            "run_id": f"count-m{m}-k16-s{seed}",
            "arch": "topk",
            "dict_size": m,
            "knob": "k",
            "knob_value": 16.0,
            "k": 16,
            "seed": seed,
            "status": "done",
            "samples": 100_000,
            "seconds": 2.0 + m / 100,
            "mse": 1e-3,
            "fvu": 0.05,
            "l0": 16.0,
            "dead_fraction": 0.0,
            "metrics": {"mse": 1e-3, "fvu": 0.05, "l0": 16.0, "dead_fraction": 0.0},
            "config": {"source": {"kind": "toy", "d": 32, "n_features": 500}},
            "error": None,
        }
        for m in SIZES
        for seed in (0, 1)
    ]


def curve_point(m: int, count: int, low: int, high: int, late: int | None, metrics: dict | None = None) -> dict:
    return {
        "samples": 1_000_000,
        "metrics": metrics or {},
        "dict_size": m,
        "count": count,
        "low": low,
        "high": high,
        "knob_value": 16.0,
        "count_late": late,
        "seconds": 1.5 * m / 128,
        "n_saes": 4,
    }


def make_estimate() -> dict:
    """A `saekit count` result with a four-point curve that saturates near 480 features."""
    return {
        "n_features": 480,
        "low": 450,
        "high": 510,
        "dict_size": 1024,
        "knob": "k",
        "k": 16,
        "state": "saturated",
        "sentence": SENTENCE,
        "summary": SENTENCE + ". Recommended SAE: 1024 latents at k = 16.",
        "reasons": REASONS,
        "fit": {"n_features": 500.0, "half_size": 200.0, "rms_error": 12.5},
        "beta": 0.03,
        "target_l0": 16.0,
        "signals": [],
        "curve": [
            curve_point(128, 60, 55, 64, 58),
            curve_point(256, 330, 300, 420, None),
            curve_point(512, 470, 450, 490, 465, {"fvu": 0.2, "l0": 16.0, "dead_fraction": 0.01, "kl_div": 0.05}),
            curve_point(1024, 480, 460, 510, 478, {"fvu": 0.15, "l0": 16.0, "dead_fraction": 0.02, "kl_div": 0.04}),
        ],
    }


def section(text: str) -> str:
    match = re.search(r'<section id="count">.*?</section>', text, re.DOTALL)
    assert match, "no count section"
    return match.group(0)


# -- the pure helper -----------------------------------------------------------------------------------


def test_fitted_counts_follow_the_saturating_model() -> None:
    fit = {"n_features": 500, "half_size": 200, "rms_error": 0.0}
    # 500*200/400 = 250; 500*600/800 = 375; 500*0/200 = 0
    assert figures.fitted_counts(fit, [200, 600, 0]) == pytest.approx([250.0, 375.0, 0.0])
    assert figures.fitted_counts({"n_features": 480, "half_size": 0}, [64]) == pytest.approx([480.0])


def test_count_curve_points_only_for_a_curve() -> None:
    assert count_curve_points(None) == []
    assert count_curve_points({"n_features": 3}) == []
    assert count_curve_points({"curve": []}) == []
    assert [p["dict_size"] for p in count_curve_points(make_estimate())] == SIZES


# -- the page ------------------------------------------------------------------------------------------


def test_report_shows_the_count_curve(tmp_path: Path) -> None:
    runs = make_runs()
    text = write_report(tmp_path, runs, {}, make_estimate()).read_text(encoding="utf-8")
    assert_valid_page(text)
    block = section(text)
    # near the top: right after the header, before the first figure section, and linked from the nav
    assert text.index("</header>") < text.index('<section id="count">') < text.index('<section id="recovery">')
    assert '<a href="#count">Count curve</a>' in text
    # the figure: an embedded PNG whose title carries the verdict
    figure = re.search(r'<figure data-figure="count-curve">.*?</figure>', block, re.DOTALL)
    assert figure and '<img src="data:image/png;base64,' in figure.group(0)
    assert f"Feature count against dictionary size: {esc(SENTENCE)}" in figure.group(0)
    assert "N·m/(m + h)" in figure.group(0) and "size/2" in figure.group(0)
    # the table: one row per size with count, range, knob value, late count, SAEs trained and seconds
    table = re.search(r'<table[^>]*id="count-table".*?</table>', block, re.DOTALL).group(0)
    rows = re.findall(r"<tr>(.*?)</tr>", table.split("<tbody>")[1])
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", r) for r in rows]
    # then samples per SAE, seconds, and the centre pair's metrics that some size has (no MMCS or CE here: no column)
    assert cells == [
        ["128", "60", "55–64", "16", "58", "4", "1000000", "1.5", "—", "—", "—", "—"],
        ["256", "330", "300–420", "16", "—", "4", "1000000", "3", "—", "—", "—", "—"],
        ["512", "470", "450–490", "16", "465", "4", "1000000", "6", "0.2", "16", "0.01", "0.05"],
        ["1024", "480", "460–510", "16", "478", "4", "1000000", "12", "0.15", "16", "0.02", "0.04"],
    ]
    assert "KL (nats)" in table and "MMCS" not in table and "CE loss recovered" not in table
    assert '<th scope="col" class="num">k</th>' in table and "count at 80% of training" in table
    # the verdict and its reasons as text, escaped
    assert f"<strong>Verdict (saturated):</strong> {esc(SENTENCE)}" in block
    assert f"<li>{esc(REASONS[0])}</li>" in block and "<b>420</b>" not in text
    assert "target L0" in block and "β = 0.03" in block


def test_count_curve_without_a_fit_or_runs() -> None:
    estimate = make_estimate()
    estimate.update(fit=None, reasons=[], curve=estimate["curve"][:1])
    text = render_report([], None, estimate)
    assert_valid_page(text)
    block = section(text)
    assert '<figure data-figure="count-curve">' in block and "N·m/(m + h)" not in block
    assert "Reasons:" not in block and block.count("<tr>") == 2  # header row and one point
    assert '<th scope="col" class="num">k</th>' in block


def test_count_curve_without_usable_points_is_a_note() -> None:
    estimate = make_estimate()
    estimate["curve"] = [{"dict_size": None, "count": None}, "not a point"]
    block = section(render_report(make_runs(), None, estimate))
    assert '<p class="note" data-figure="count-curve">' in block and "skipped" in block


@pytest.mark.parametrize("estimate", [None, {"n_features": 128, "low": 100, "high": 160, "signals": []}, {"curve": []}])
def test_ordinary_sweeps_have_no_count_section(estimate: dict | None) -> None:
    text = render_report(make_runs(), None, estimate)
    assert '<section id="count">' not in text and 'href="#count"' not in text
    assert "count-curve" not in text and "count-table" not in text


def test_count_blocks_only_for_a_curve() -> None:
    from saekit.report import _count_blocks

    assert _count_blocks(None, TOPK) == [] and _count_blocks({"n_features": 3}, TOPK) == []
    [block] = _count_blocks(make_estimate(), TOPK)
    assert block.key == "count-curve" and block.png is not None
