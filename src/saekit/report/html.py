"""The report page: one self-contained HTML document (inline CSS, a few lines of inline JS, figures as data URIs).

Every piece of text that comes from the data is passed through `html.escape`; nothing on the page refers to
an outside resource, so the file opens offline and can be mailed or archived as it is.
"""

from __future__ import annotations

import html
import json
import math
from collections import Counter
from typing import Any

from saekit.analysis.curve import POINT_METRICS
from saekit.archspec import spec_for_knob
from saekit.report.figures import FigureBlock, finite, run_value

RUN_COLUMNS: tuple[tuple[str, str, bool], ...] = (
    # (key, header, numeric)
    ("run_id", "run_id", False),
    ("arch", "arch", False),
    ("dict_size", "dict_size", True),
    ("knob_value", "knob value", True),  # headed by the runs' knob (l1, k, l0_coef) when they share one
    ("seed", "seed", True),
    ("status", "status", False),
    ("samples", "samples", True),
    ("seconds", "seconds (s)", True),
    ("mse", "mse", True),
    ("fvu", "fvu", True),
    ("l0", "l0", True),
    ("dead_fraction", "dead_fraction", True),
    ("dense_fraction", "dense_fraction", True),
    ("mmcs", "mmcs", True),
    ("recovered_0_9", "recovered_0_9", True),
    ("mcc", "mcc", True),
    ("f1", "f1", True),
    ("absorption", "absorption", True),
    ("split", "split", True),
    ("shrinkage", "shrinkage", True),
    ("ce_loss_recovered", "ce_loss_recovered", True),
    ("kl_div", "kl_div", True),
)
# Shown only when some run has a value (ground truth metrics for generated data, absorption only where the data has
# parent features, downstream loss for a language model).
OPTIONAL_COLUMNS = frozenset(
    {"dense_fraction", "mmcs", "recovered_0_9", "mcc", "f1", "absorption", "split", "shrinkage", "ce_loss_recovered", "kl_div"}
)

SECTIONS: tuple[tuple[str, str, str], ...] = (
    # (key of the figure blocks, section id, heading)
    ("recovery", "recovery", "Recovery of the true features"),
    ("sparsity", "sparsity", "Sparsity and reconstruction"),
    ("density", "density", "Feature density"),
    ("dead", "dead", "Dead latents"),
    ("loss", "loss", "Loss terms"),
    ("cross", "cross", "MMCS with larger dictionaries"),
)

_CSS = """
:root { color-scheme: light; --ink: #1b1b1b; --muted: #5b5b5b; --line: #d9d9d9; --accent: #0072B2; --bad: #D55E00; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--ink); background: #fbfbfa;
       font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1440px; margin: 0 auto; padding: 24px 28px 64px; }
h1 { font-size: 1.7rem; margin: 0 0 4px; }
h2 { font-size: 1.3rem; margin: 40px 0 8px; padding-bottom: 4px; border-bottom: 2px solid var(--line); }
h3 { font-size: 1.02rem; margin: 0 0 8px; }
.meta { color: var(--muted); margin: 0 0 12px; }
nav { margin: 8px 0 0; font-size: 0.9rem; }
nav a { color: var(--accent); margin-right: 14px; text-decoration: none; }
nav a:hover { text-decoration: underline; }
.config { display: flex; flex-wrap: wrap; gap: 6px; margin: 8px 0; padding: 0; list-style: none; }
.config li { background: #eef3f7; border: 1px solid #d6e2ec; border-radius: 4px; padding: 1px 7px; font-size: 0.85rem; }
.config code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.source { margin: 4px 0 8px; max-width: 110ch; }
.estimate { background: #fff; border-left: 4px solid var(--accent); padding: 10px 14px; margin: 14px 0 0; }
.estimate p { margin: 4px 0; }
figure { background: #fff; border: 1px solid var(--line); border-radius: 6px; margin: 16px 0; padding: 14px 16px; }
figure img { display: block; max-width: 100%; height: auto; margin: 0 auto; }
figcaption { color: #333; font-size: 0.92rem; margin-top: 10px; max-width: 110ch; }
.note { color: var(--muted); font-style: italic; margin: 8px 0; }
table { border-collapse: collapse; font-size: 0.85rem; background: #fff; }
th, td { padding: 4px 8px; border-bottom: 1px solid #ececec; text-align: left; white-space: nowrap; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
thead th { background: #f0f0ee; border-bottom: 2px solid var(--line); }
.table-wrap thead th { position: sticky; top: 0; z-index: 1; }
table.sortable thead th { cursor: pointer; user-select: none; }
table.sortable thead th:hover { background: #e4ecf2; }
table.sortable thead th::after { content: " \\2195"; color: #aaa; font-size: 0.8em; }
table.sortable thead th[aria-sort="ascending"]::after { content: " \\25B2"; color: var(--accent); }
table.sortable thead th[aria-sort="descending"]::after { content: " \\25BC"; color: var(--accent); }
tbody tr:nth-child(even) { background: #fafafa; }
tr.failed td { color: var(--bad); }
.table-wrap { overflow: auto; max-height: 80vh; border: 1px solid var(--line); border-radius: 6px; }
.table-wrap table { width: 100%; }
table.signals { margin: 8px 0 16px; border: 1px solid var(--line); }
.yes { color: #009E73; font-weight: 600; }
.no { color: var(--bad); font-weight: 600; }
td.wrap { white-space: normal; min-width: 24ch; }
"""

_JS = """
(function () {
  function cellKey(row, col, numeric) {
    var cell = row.cells[col];
    var v = cell.hasAttribute("data-v") ? cell.getAttribute("data-v") : cell.textContent.trim();
    if (v === "") return null;
    if (numeric) { var n = parseFloat(v); return isNaN(n) ? null : n; }
    return v.toLowerCase();
  }
  document.querySelectorAll("table.sortable").forEach(function (table) {
    var headers = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(headers, function (th, col) {
      function sort() {
        var asc = th.getAttribute("aria-sort") !== "ascending";
        Array.prototype.forEach.call(headers, function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", asc ? "ascending" : "descending");
        var numeric = th.getAttribute("data-type") === "num";
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = cellKey(a, col, numeric), y = cellKey(b, col, numeric);
          if (x === null && y === null) return 0;
          if (x === null) return 1;   /* missing values last, either direction */
          if (y === null) return -1;
          var c = numeric ? x - y : x.localeCompare(y, undefined, { numeric: true });
          return asc ? c : -c;
        });
        rows.forEach(function (r) { body.appendChild(r); });
      }
      th.addEventListener("click", sort);
      th.addEventListener("keydown", function (e) { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sort(); } });
    });
  });
})();
"""


def esc(value: Any) -> str:
    """Text for HTML: `html.escape` of `str(value)` (quotes included, so it is safe in attributes too)."""
    return html.escape("" if value is None else str(value), quote=True)


def fmt_number(value: Any) -> str:
    """A number for reading: ints as they are, floats to 4 significant digits, large floats rounded; None as a dash."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    try:
        f = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(f):
        return "nan"
    if math.isinf(f):
        return "∞" if f > 0 else "−∞"
    if 1e4 <= abs(f) < 1e15:
        return f"{round(f):d}"
    return f"{f:.4g}"


def _sort_value(value: Any) -> str | None:
    f = finite(value)
    return None if f is None else repr(f)


def render_figure(block: FigureBlock) -> str:
    """One `<figure>` (image, title, caption), or a short note when the figure was skipped."""
    if block.png is None:
        return f'<p class="note" data-figure="{esc(block.key)}">{esc(block.title)}: {esc(block.note or "skipped")}</p>'
    note = f'<p class="note">{esc(block.note)}</p>' if block.note else ""
    return (
        f'<figure data-figure="{esc(block.key)}"><h3>{esc(block.title)}</h3>'
        f'<img src="{block.png}" alt="{esc(block.title)}">'
        f"<figcaption>{esc(block.caption)}</figcaption>{note}</figure>"
    )


def estimate_sentence(estimate: dict[str, Any] | None) -> str:
    """The estimate in one sentence (plain text), or a sentence saying there is none."""
    if not estimate:
        return "No feature-count estimate was made for this sweep."
    n, low, high = estimate.get("n_features"), estimate.get("low"), estimate.get("high")
    parts = []
    if n is not None:
        rng = f" (range {fmt_number(low)}–{fmt_number(high)})" if low is not None and high is not None else ""
        parts.append(f"Estimated number of true features: {fmt_number(n)}{rng}.")
    knob = estimate.get("knob", "l1")
    if estimate.get("dict_size") is not None or estimate.get(knob) is not None:
        setting = f"{spec_for_knob(knob).knob_name} = {fmt_number(estimate.get(knob))}"
        parts.append(f"Recommended dictionary size {fmt_number(estimate.get('dict_size'))} with {setting}.")
    return " ".join(parts) or "The estimate has no values."


def _plain(value: Any) -> str:
    """A source.json value as text: numbers with thousands separators, other scalars as they are, the rest as JSON."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return fmt_number(value)
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _join(sep: str, *parts: str) -> str:
    return sep.join(p for p in parts if p)


def source_sentence(info: dict[str, Any] | None) -> str | None:
    """What a language-model activations source (OUT/source.json) holds, in one plain-text sentence; None for other sources."""
    if not isinstance(info, dict) or info.get("kind") != "activations":
        return None
    v = {k: _plain(x) for k, x in info.items() if x is not None and x != ""}

    def part(key: str, template: str) -> str:
        return template.format(v[key]) if key in v else ""

    model = v.get("model", "a language model") + part("model_class", " ({})")
    place = _join(", ", part("layer", "layer {}"), part("site", "site {}"))
    head = "Activations of " + model + (" at " + place if place else "") + part("d", " (d = {})")
    skip = info.get("skip_positions")
    rest = _join(
        "; ",
        _join(" ", part("tokens", "{} tokens"), part("text", "of “{}” text"), part("window", "in windows of {}")),
        part("skip_positions", "the first {} position" + ("" if skip == 1 else "s") + " of each window left out") if skip != 0 else "",
        part("input_scale", "inputs scaled by {} (input_scale)"),
    )
    no_truth = "No ground truth: the SAEs are judged by sparsity, reconstruction and downstream loss."
    return f"{head}{': ' + rest if rest else ''}. {no_truth}"


def _relevant_source_keys(source: Any) -> Any:
    """The data config with only the keys that apply to its kind (a dump holds every kind's keys at their defaults);
    the dict as it is when it does not validate (an older or foreign config)."""
    from pydantic import ValidationError

    from saekit.config import SourceConfig

    if not isinstance(source, dict):
        return source
    try:
        return SourceConfig.model_validate(source).relevant()
    except (ValidationError, ValueError, TypeError):
        return source


def _source_block(runs: list[dict[str, Any]], source_info: dict[str, Any] | None) -> str:
    """The header's data description: the sentence for a language model's activations, then the run's data config."""
    sentence = source_sentence(source_info)
    lead = f'<p class="source" id="source-info">{esc(sentence)}</p>' if sentence else ""
    source = _relevant_source_keys((runs[0].get("config") or {}).get("source") if runs else None)
    if isinstance(source, dict) and source:
        items = "".join(
            f"<li><code>{esc(k)}={esc(v if isinstance(v, (str, int, float)) else json.dumps(v, sort_keys=True))}</code></li>"
            for k, v in source.items()
        )
        config = f'<ul class="config" aria-label="data config">{items}</ul>'
    else:
        config = '<p class="note">No data config recorded.</p>'
    return lead + config


def _header(runs: list[dict[str, Any]], estimate: dict[str, Any] | None, generated: str, source_info: dict[str, Any] | None) -> str:
    status = Counter(str(r.get("status")) for r in runs)
    status_text = ", ".join(f"{n} {esc(s)}" for s, n in sorted(status.items()))
    summary = f"<p>{esc(estimate.get('summary'))}</p>" if estimate and estimate.get("summary") else ""
    count_link = '<a href="#count">Count curve</a>' if count_curve_points(estimate) else ""
    nav = (
        count_link
        + "".join(f'<a href="#{sid}">{esc(h)}</a>' for _, sid, h in SECTIONS)
        + '<a href="#estimate">Estimate</a><a href="#runs">All runs</a>'
    )
    return (
        "<header><h1>saekit sweep report</h1>"
        f'<p class="meta">Generated {esc(generated)} · {len(runs)} run{"s" if len(runs) != 1 else ""}'
        f"{' (' + status_text + ')' if status_text else ''}</p>"
        f"<h3>Data</h3>{_source_block(runs, source_info)}"
        f'<div class="estimate"><p><strong>{esc(estimate_sentence(estimate))}</strong></p>{summary}</div>'
        f"<nav>{nav}</nav></header>"
    )


def _signals_table(estimate: dict[str, Any] | None) -> str:
    signals = (estimate or {}).get("signals") or []
    if not signals:
        return '<p class="note">No evidence signals recorded.</p>'
    rows = []
    for s in signals:
        agrees = s.get("agrees")
        mark = '<span class="yes">✓ agrees</span>' if agrees else '<span class="no">✗ disagrees</span>' if agrees is not None else "—"
        value = s.get("value")
        value_text = fmt_number(value) if isinstance(value, (int, float)) or value is None else str(value)
        rows.append(
            f'<tr><td>{esc(s.get("name"))}</td><td class="num">{esc(value_text)}</td><td>{mark}</td>'
            f'<td class="wrap">{esc(s.get("note"))}</td></tr>'
        )
    head = '<tr><th>signal</th><th class="num">value</th><th>agrees</th><th>note</th></tr>'
    return f'<table class="signals"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'


def count_curve_points(estimate: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The points of a `saekit count` result's curve (the dict entries of `estimate['curve']`); [] for other estimates."""
    curve = (estimate or {}).get("curve")
    return [p for p in curve if isinstance(p, dict)] if isinstance(curve, list) else []


def _knob_label(knob: Any) -> str:
    """The knob's name for a column header ('L1 coefficient α', 'k'), or the key as it is when no architecture has it."""
    try:
        return spec_for_knob(str(knob)).knob_name
    except KeyError:
        return str(knob or "knob value")


COUNT_COLUMNS: tuple[tuple[str, str], ...] = (
    # (key of a curve point, header)
    ("dict_size", "dictionary size"),
    ("count", "count"),
    ("range", "range (low–high)"),
    ("knob_value", "knob value"),
    ("count_late", "count at 80% of training"),
    ("n_saes", "SAEs trained"),
    ("samples", "samples per SAE"),
    ("seconds", "seconds (s)"),
)
# The centre pair's held-out metrics (a curve point's `metrics`), shown where any size has them.
COUNT_METRIC_COLUMNS: tuple[tuple[str, str], ...] = tuple((m.key, m.label) for m in POINT_METRICS)


def _count_cell(point: dict[str, Any], key: str) -> str:
    if key in dict(COUNT_METRIC_COLUMNS):
        return f'<td class="num">{esc(fmt_number((point.get("metrics") or {}).get(key)))}</td>'
    if key == "range":
        low, high = point.get("low"), point.get("high")
        text = "—" if low is None and high is None else f"{fmt_number(low)}–{fmt_number(high)}"
        return f'<td class="num">{esc(text)}</td>'
    return f'<td class="num">{esc(fmt_number(point.get(key)))}</td>'


def _count_table(points: list[dict[str, Any]], knob: Any) -> str:
    """One row per size of the curve: size, count, its range, the knob's value, the late count, SAEs trained, samples,
    seconds, and the centre pair's held-out metrics that any size has."""
    labels = {"knob_value": _knob_label(knob)}
    present = {key for p in points for key in (p.get("metrics") or {})}
    columns = COUNT_COLUMNS + tuple(c for c in COUNT_METRIC_COLUMNS if c[0] in present)
    head = "".join(f'<th scope="col" class="num">{esc(labels.get(key, label))}</th>' for key, label in columns)
    rows = "".join(f"<tr>{''.join(_count_cell(p, key) for key, _ in columns)}</tr>" for p in points)
    return f'<table class="signals count-curve" id="count-table"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'


def _count_verdict(estimate: dict[str, Any]) -> str:
    """The search's verdict sentence, the reasons it is not settled (if any), and the calibrated L0 and growth exponent."""
    state = f" ({esc(estimate['state'])})" if estimate.get("state") else ""
    sentence = f'<p class="verdict"><strong>Verdict{state}:</strong> {esc(estimate.get("sentence") or "none recorded")}</p>'
    reasons = [r for r in estimate.get("reasons") or [] if r]
    items = "".join(f"<li>{esc(r)}</li>" for r in reasons)
    listed = f'<p>Reasons:</p><ul class="reasons">{items}</ul>' if reasons else ""
    facts = []
    if finite(estimate.get("target_l0")) is not None:
        facts.append(f"SAEs calibrated to about {fmt_number(estimate['target_l0'])} active latents per sample (target L0)")
    if finite(estimate.get("beta")) is not None:
        facts.append(f"growth exponent between the last two sizes β = {float(estimate['beta']):.2f} (count ∝ m^β)")
    meta = f'<p class="meta">{esc("; ".join(facts))}.</p>' if facts else ""
    return sentence + listed + meta


def _count_section(estimate: dict[str, Any], blocks: list[FigureBlock]) -> str:
    """The count curve of `saekit count`: its verdict, figure and table, right after the header."""
    points = count_curve_points(estimate)
    figure = "".join(render_figure(b) for b in blocks)
    return (
        '<section id="count"><h2>Feature count against dictionary size</h2>'
        f"{_count_verdict(estimate)}{figure}{_count_table(points, estimate.get('knob'))}</section>"
    )


def visible_columns(runs: list[dict[str, Any]]) -> list[tuple[str, str, bool]]:
    """RUN_COLUMNS without the optional ones no run has a value for."""
    return [c for c in RUN_COLUMNS if c[0] not in OPTIONAL_COLUMNS or any(_cell_value(r, c[0]) is not None for r in runs)]


def _cell_value(run: dict[str, Any], key: str) -> Any:
    """The run's value for a column: its own field, else (for metrics the store keeps only in JSON) its metrics dict."""
    v = run.get(key)
    if v is None and key in OPTIONAL_COLUMNS:
        return run_value(run, key)
    return v


def _runs_table(runs: list[dict[str, Any]]) -> str:
    if not runs:
        return '<p class="note">No runs in the store.</p>'
    columns = visible_columns(runs)
    knobs = {r.get("knob") for r in runs}
    labels = {"knob_value": next(iter(knobs))} if len(knobs) == 1 and None not in knobs else {}
    head = "".join(
        f'<th scope="col" tabindex="0" data-key="{esc(key)}" data-type="{"num" if numeric else "text"}"{" class=num" if numeric else ""}>'
        f"{esc(labels.get(key, label))}</th>"
        for key, label, numeric in columns
    )
    body = []
    for r in runs:
        cells = []
        for key, _, numeric in columns:
            v = _cell_value(r, key)
            if numeric:
                sv = _sort_value(v)
                attr = f' data-v="{esc(sv)}"' if sv is not None else ""
                cells.append(f'<td class="num"{attr}>{esc(fmt_number(v))}</td>')
            else:
                cells.append(f"<td>{esc(v)}</td>")
        failed = r.get("status") == "failed"
        title = f' title="{esc(r.get("error"))}"' if failed and r.get("error") else ""
        body.append(f"<tr{' class=failed' if failed else ''}{title}>{''.join(cells)}</tr>")
    return (
        '<p class="meta">Click a column header to sort (again to reverse). Failed runs are shown in orange; hover for the error.</p>'
        f'<div class="table-wrap"><table class="sortable runs" id="runs-table"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def render_page(
    *,
    runs: list[dict[str, Any]],
    estimate: dict[str, Any] | None,
    figures: dict[str, list[FigureBlock]],
    generated: str,
    source_info: dict[str, Any] | None = None,
) -> str:
    """The whole page as a string; `figures` maps a section key (recovery, sparsity, density, dead, loss, cross, consensus,
    count) to its blocks; the count curve's section appears only when `estimate` has a non-empty `curve`; `source_info` is
    OUT/source.json (described in the header for a language model's activations)."""
    parts = [_header(runs, estimate, generated, source_info)]
    if count_curve_points(estimate):
        parts.append(_count_section(estimate or {}, figures.get("count") or []))
    for key, sid, heading in SECTIONS:
        blocks = figures.get(key) or []
        inner = "".join(render_figure(b) for b in blocks) or '<p class="note">Nothing to show.</p>'
        parts.append(f'<section id="{sid}"><h2>{esc(heading)}</h2>{inner}</section>')
    consensus = "".join(render_figure(b) for b in figures.get("consensus") or [])
    parts.append(
        '<section id="estimate"><h2>The estimate and its evidence</h2>'
        f"<p>{esc(estimate_sentence(estimate))}</p>{_signals_table(estimate)}{consensus}</section>"
    )
    parts.append(f'<section id="runs"><h2>All runs</h2>{_runs_table(runs)}</section>')
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>saekit report</title><style>{_CSS}</style></head>\n"
        f"<body><main>{''.join(parts)}</main><script>{_JS}</script></body></html>\n"
    )
