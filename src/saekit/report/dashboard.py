"""A feature dashboard: one self-contained HTML page (`OUT/dashboards/RUN_ID.html`) for one SAE on LM activations.

`render_dashboard(data)` lays out the data dict of `saekit.report.dashboard_data.collect_dashboard`:

    meta            run_id, model, layer, site, arch, d, dict_size, l1, input_scale, n_tokens (rows scanned),
                    window, causal, context_before, context_after, scan {l0, fvu, dead_fraction},
                    train {fvu, l0, dead_fraction, ...} or None (runs.sqlite), notes [str]
    tokens          [str]: the token-string table every *_tokens array indexes
    count (m,)      rows each latent fires on;  mean (m,) mean activation when firing;  max (m,)
    hist (m, bins)  counts of its nonzero activations in equal bins on [0, max]
    ctx_rows (m, k), ctx_values (m, k)      top contexts, best first: global row of the top token and its
                                            activation; row -1 = no context
    ctx_tokens (m, k, L), ctx_acts (m, k, L)  table index (-1 = padding) and the latent's activation per token;
                                            slot context_before is the top token
    promote_tokens, promote_values, suppress_tokens, suppress_values (m, T)   optional: logit weights

The page embeds the data as one JSON blob (`<script type="application/json">`, `<` `>` `&` escaped) in compact
form: big arrays as base64 little-endian typed arrays, context activations quantised to 0..255 relative to the
latent's max, token strings once in a shared table. Vanilla JS draws the index (paginated, 200 rows at a time),
the search, the sorting and the detail panel, always through `textContent`, never `innerHTML` with data.
`write_dashboard(out_dir, run_id, ...)` collects, renders and writes the page atomically.
"""

from __future__ import annotations

import base64
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from saekit.archspec import ARCH_SPECS, RELU
from saekit.atomic import atomic_write_bytes
from saekit.errors import InputError
from saekit.report.html import esc, fmt_number

__all__ = ["density_svg", "encode_payload", "render_dashboard", "write_dashboard"]

PAGE_ROWS = 200
SUMMARY_TOKENS = 3


def _b64(a: np.ndarray, dtype: str) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype=dtype).tobytes()).decode("ascii")


def _round(values: np.ndarray, digits: int = 4) -> list[float | None]:
    """Floats to `digits` significant digits for JSON; non-finite values as None."""
    return [float(f"{v:.{digits}g}") if math.isfinite(v) else None for v in np.asarray(values, dtype=np.float64).tolist()]


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.generic,)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _token_table(tokens: list[str]) -> list[str]:
    return [str(t).encode("utf-8", "replace").decode("utf-8") for t in tokens]


def encode_payload(data: dict[str, Any]) -> dict[str, Any]:
    """The compact JSON document the page's script reads (see the module docstring for `data`)."""
    count = np.asarray(data["count"], dtype=np.int64).reshape(-1)
    m = count.shape[0]
    vmax = np.asarray(data["max"], dtype=np.float64).reshape(m)
    hist = np.asarray(data["hist"], dtype=np.int64).reshape(m, -1)
    rows = np.asarray(data["ctx_rows"], dtype=np.int64).reshape(m, -1)
    k = rows.shape[1]
    values = np.asarray(data["ctx_values"], dtype=np.float64).reshape(m, k)
    toks = np.asarray(data["ctx_tokens"], dtype=np.int64).reshape(m, k, -1)
    acts = np.asarray(data["ctx_acts"], dtype=np.float64).reshape(m, k, toks.shape[2])
    meta = dict(data.get("meta") or {})
    before = int(meta.get("context_before", toks.shape[2] // 2))
    table = _token_table(list(data.get("tokens") or []))
    wide = len(table) >= 0xFFFF
    tok_dtype, pad = ("<u4", 0xFFFFFFFF) if wide else ("<u2", 0xFFFF)

    valid = (rows >= 0) & (values > 0) & (vmax[:, None] > 0)
    nctx = valid.sum(axis=1)
    owner = np.repeat(np.arange(m), nctx)
    vt, va = toks[valid], acts[valid]  # (N, L) in latent-major, best-first order
    q = np.rint(np.clip(va / vmax[owner][:, None], 0.0, 1.0) * 255).astype(np.uint8) if len(owner) else va.astype(np.uint8)
    vt = np.where(vt < 0, pad, vt)

    tops = vt[:, before] if len(vt) else np.zeros(0, dtype=np.int64)

    payload: dict[str, Any] = {
        "meta": _json_safe(meta),
        "tokens": table,
        "m": m,
        "L": int(toks.shape[2]),
        "before": before,
        "pad": pad,
        "tokType": "u4" if wide else "u2",
        "count": count.tolist(),
        "mean": _round(np.asarray(data["mean"], dtype=np.float64).reshape(m)),
        "max": _round(vmax),
        "bins": int(hist.shape[1]),
        "histType": "u2" if hist.max(initial=0) < 0xFFFF else "u4",
        "hist": _b64(hist, "<u2" if hist.max(initial=0) < 0xFFFF else "<u4"),
        "nctx": nctx.tolist(),
        "ctxValue": _round(values[valid]),
        "ctxRow": rows[valid].tolist(),
        "ctxTok": _b64(vt, tok_dtype),
        "ctxAct": _b64(q, "<u1"),
        "summary": _top_token_summary(tops, nctx, pad),
    }
    if data.get("promote_tokens") is not None:
        payload.update(_logit_payload(data, m, pad, tok_dtype))
    return payload


def _top_token_summary(tops: np.ndarray, nctx: np.ndarray, pad: int) -> list[list[int]]:
    """Per latent, its most common top tokens flattened as [token, count, token, count, ...]; `tops` holds the top
    token of every kept context, latent-major, `nctx` how many contexts each latent kept."""
    summary: list[list[int]] = []
    start = 0
    for n in nctx.tolist():
        most = Counter(t for t in tops[start : start + n].tolist() if t != pad).most_common(SUMMARY_TOKENS)
        summary.append([x for pair in most for x in pair])
        start += n
    return summary


def _logit_payload(data: dict[str, Any], m: int, pad: int, tok_dtype: str) -> dict[str, Any]:
    """The "promote" and "suppress" entries: per latent the token ids and logit weights, base64-packed."""
    payload: dict[str, Any] = {}
    for key in ("promote", "suppress"):
        t = np.asarray(data[f"{key}_tokens"], dtype=np.int64).reshape(m, -1)
        payload[key] = {
            "T": int(t.shape[1]),
            "tok": _b64(np.where(t < 0, pad, t), tok_dtype),
            "val": _b64(np.asarray(data[f"{key}_values"], dtype=np.float64).reshape(m, -1), "<f4"),
        }
    return payload


def _script_json(payload: dict[str, Any]) -> str:
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return (
        text.replace("&", "\\u0026")
        .replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


# -- the static parts: header and the density histogram -----------------------------------------------------------


def density_svg(count: np.ndarray, n_tokens: int, *, width: int = 520, height: int = 170) -> str:
    """Inline SVG: how many latents fire at each log10 frequency (10 bins per decade), dead latents as a grey bar."""
    count = np.asarray(count, dtype=np.int64)
    live = count[count > 0]
    dead = int((count == 0).sum())
    freq = np.log10(live / max(n_tokens, 1)) if len(live) else np.zeros(0)
    lo = math.floor(float(freq.min())) if len(freq) else -1
    lo = min(lo, -1)
    per_decade = 10
    nb = -lo * per_decade
    counts = np.bincount(np.clip(((freq - lo) * per_decade).astype(np.int64), 0, nb - 1), minlength=nb) if len(freq) else np.zeros(nb, int)
    ml, mr, mt, mb = 44, 10, 12, 34
    dead_w, gap = 26, 16
    pw = width - ml - mr - dead_w - gap
    ph = height - mt - mb
    top = max(int(counts.max()) if len(counts) else 0, dead, 1)
    bw = pw / nb
    parts = [
        f'<svg class="density" role="img" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'aria-label="Feature density: number of latents per log10 firing frequency; {dead} dead">'
    ]
    y0 = mt + ph
    parts.append(f'<line x1="{ml}" y1="{y0}" x2="{width - mr}" y2="{y0}" class="axis"/>')
    parts.append(f'<line x1="{ml}" y1="{mt}" x2="{ml}" y2="{y0}" class="axis"/>')
    parts.append(f'<text x="{ml - 6}" y="{mt + 4}" class="tick" text-anchor="end">{top}</text>')
    parts.append(f'<text x="{ml - 6}" y="{y0}" class="tick" text-anchor="end">0</text>')
    h = ph * dead / top
    parts.append(
        f'<rect class="dead-bar" x="{ml + 4}" y="{y0 - h:.1f}" width="{dead_w - 8}" height="{h:.1f}">'
        f"<title>dead (never fired in the scan): {dead} latents</title></rect>"
    )
    parts.append(f'<text x="{ml + dead_w / 2}" y="{y0 + 14}" class="tick" text-anchor="middle">dead</text>')
    x0 = ml + dead_w + gap
    for i, c in enumerate(counts.tolist()):
        if c == 0:
            continue
        h = ph * c / top
        a, b = lo + i / per_decade, lo + (i + 1) / per_decade
        parts.append(
            f'<rect class="bar" x="{x0 + i * bw:.1f}" y="{y0 - h:.1f}" width="{max(bw - 1, 1):.1f}" height="{h:.1f}">'
            f"<title>frequency 10^{a:.1f} to 10^{b:.1f}: {c} latents</title></rect>"
        )
    for dec in range(lo, 1):
        x = x0 + (dec - lo) * per_decade * bw
        parts.append(f'<line x1="{x:.1f}" y1="{y0}" x2="{x:.1f}" y2="{y0 + 4}" class="axis"/>')
        parts.append(
            f'<text x="{x:.1f}" y="{y0 + 15}" class="tick" text-anchor="middle">10<tspan dy="-5" font-size="8">{dec}</tspan></text>'
        )
    parts.append(
        f'<text x="{x0 + pw / 2:.1f}" y="{height - 3}" class="label" text-anchor="middle">'
        "firing frequency (fraction of tokens, log scale)</text>"
    )
    parts.append("</svg>")
    return "".join(parts)


def _stat(label: str, value: Any, title: str = "") -> str:
    t = f' title="{esc(title)}"' if title else ""
    return f'<div class="stat"{t}><span class="k">{esc(label)}</span><span class="v">{esc(value)}</span></div>'


def _pct(v: Any) -> str:
    return "—" if v is None or not isinstance(v, (int, float)) or not math.isfinite(v) else f"{100 * v:.3g}%"


def _tokens_note(meta: dict[str, Any]) -> str:
    skip = meta.get("skip_positions") or 0
    note = f"activation rows (tokens) scanned: the first {meta.get('rows_scanned', meta.get('n_tokens'))}"
    return note + (f", less the first {skip} position(s) of every window, which the SAE was not trained on" if skip else "")


def _header(meta: dict[str, Any], count: np.ndarray) -> str:
    scan = meta.get("scan") or {}
    train = meta.get("train") or {}
    where = " · ".join(
        esc(x)
        for x in (meta.get("model"), f"layer {meta['layer']}" if meta.get("layer") is not None else None, meta.get("site"))
        if x is not None
    )
    stats = "".join(
        [
            _stat("dict size", fmt_number(meta.get("dict_size"))),
            _stat("d", fmt_number(meta.get("d"))),
            _stat(ARCH_SPECS.get(meta.get("arch"), RELU).knob_name, fmt_number(meta.get("knob_value"))),
            _stat("L0", fmt_number(scan.get("l0")), "mean number of latents firing per token, on the scanned tokens"),
            _stat("FVU", fmt_number(scan.get("fvu")), f"fraction of variance unexplained, on the first {scan.get('fvu_rows')} tokens"),
            _stat("dead", _pct(scan.get("dead_fraction")), "latents that never fired on the scanned tokens"),
            _stat("tokens", f"{int(meta.get('n_tokens') or 0):,}", _tokens_note(meta)),
            _stat("input scale", fmt_number(meta.get("input_scale")), "the SAE was trained on activations × this"),
        ]
    )
    train_keys = [k for k in ("fvu", "l0", "dead_fraction", "mse") if isinstance(train.get(k), (int, float))]
    train_line = (
        '<p class="meta">At the end of training (runs.sqlite): '
        + " · ".join(f"{esc(k)} {esc(_pct(train[k]) if k == 'dead_fraction' else fmt_number(train[k]))}" for k in train_keys)
        + "</p>"
        if train_keys
        else ""
    )
    notes = "".join(f'<p class="note">{esc(n)}</p>' for n in meta.get("notes") or [])
    return (
        '<header class="top"><div class="title">'
        f'<h1>Latent dashboard <span class="run">{esc(meta.get("run_id", ""))}</span></h1>'
        f'<p class="meta">{where or "model unknown"} · {esc(meta.get("arch", "sae"))} SAE</p>'
        f'<div class="stats">{stats}</div>{train_line}{notes}</div>'
        f'<figure class="density-fig"><figcaption>Feature density ({len(count):,} latents)</figcaption>'
        f"{density_svg(count, int(meta.get('n_tokens') or 1))}</figure></header>"
    )


_CSS = """
:root { --mono: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
:root { color-scheme: light; --ink: #1b1b1b; --muted: #5b5b5b; --line: #d9d9d9; --accent: #08519c; --hl: #D55E00; --bg: #fbfbfa; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--ink); background: var(--bg);
       font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1600px; margin: 0 auto; padding: 16px 24px 40px; }
h1 { font-size: 1.45rem; margin: 0 0 2px; }
h1 .run { font-family: var(--mono); font-size: 1.05rem; color: var(--muted); font-weight: 500; }
h2 { font-size: 1.15rem; margin: 0 0 6px; }
h3 { font-size: 0.95rem; margin: 16px 0 6px; }
.meta { color: var(--muted); margin: 0 0 8px; }
.note { color: var(--muted); font-style: italic; margin: 4px 0; }
header.top { display: flex; flex-wrap: wrap; gap: 16px 32px; align-items: flex-start; justify-content: space-between;
             padding-bottom: 12px; border-bottom: 2px solid var(--line); margin-bottom: 14px; }
.title { flex: 1 1 520px; }
.stats { display: grid; grid-template-columns: repeat(auto-fill, minmax(118px, 1fr)); gap: 8px; margin: 10px 0 8px; }
.stat { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 5px 10px; }
.stat .k { display: block; font-size: 0.74rem; color: var(--muted); text-transform: uppercase; letter-spacing: 0.03em; }
.stat .v { font-size: 1.08rem; font-weight: 600; font-variant-numeric: tabular-nums; }
figure { margin: 0; }
.density-fig { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 8px 10px 4px; }
.density-fig figcaption { font-size: 0.85rem; font-weight: 600; }
svg .axis { stroke: #777; stroke-width: 1; }
svg .tick { font-size: 10px; fill: #444; }
svg .label { font-size: 10.5px; fill: #444; }
svg .bar { fill: #3b7dbb; }
svg .bar:hover, svg .dead-bar:hover { fill: var(--hl); }
svg .dead-bar { fill: #a3a3a3; }
.split { display: grid; grid-template-columns: minmax(430px, 5fr) minmax(0, 7fr); gap: 20px; align-items: start; }
@media (max-width: 1000px) { .split { grid-template-columns: 1fr; } }
.controls { display: flex; flex-wrap: wrap; gap: 8px 14px; align-items: center; margin-bottom: 8px; }
.controls input[type=search] { flex: 1 1 220px; font: inherit; padding: 5px 9px; border: 1px solid #b9b9b9; border-radius: 5px; }
.controls input[type=search]:focus, button:focus-visible, tr:focus-visible { outline: 2px solid var(--accent); outline-offset: 1px; }
.controls label { color: var(--muted); white-space: nowrap; }
.index-wrap { overflow: auto; max-height: calc(100vh - 130px); min-height: 300px; background: #fff;
              border: 1px solid var(--line); border-radius: 6px; }
table { border-collapse: collapse; width: 100%; font-size: 0.86rem; }
th, td { padding: 3px 8px; border-bottom: 1px solid #efefef; text-align: left; white-space: nowrap; }
th.num, td.num { text-align: right; font-variant-numeric: tabular-nums; }
thead th { position: sticky; top: 0; z-index: 1; background: #f0f0ee; border-bottom: 2px solid var(--line);
           cursor: pointer; user-select: none; }
thead th:hover { background: #e2eaf2; }
thead th::after { content: " \\2195"; color: #aaa; font-size: 0.8em; }
thead th[aria-sort="ascending"]::after { content: " \\25B2"; color: var(--accent); }
thead th[aria-sort="descending"]::after { content: " \\25BC"; color: var(--accent); }
tbody tr { cursor: pointer; }
tbody tr:hover { background: #eef4fa; }
tbody tr.selected { background: #d7e6f5; }
tbody tr.dead td { color: #9b9b9b; }
td.toks { max-width: 26ch; overflow: hidden; text-overflow: ellipsis; font-family: var(--mono); font-size: 0.8rem; }
.more { display: flex; gap: 10px; align-items: center; padding: 8px; color: var(--muted); }
button { font: inherit; padding: 3px 10px; border: 1px solid #b9b9b9; border-radius: 5px; background: #fff; cursor: pointer; }
button:hover { background: #eef4fa; }
#detail { position: sticky; top: 10px; max-height: calc(100vh - 20px); overflow: auto; background: #fff; border: 1px solid var(--line);
          border-radius: 6px; padding: 12px 16px 16px; }
#detail .empty { color: var(--muted); }
.chips { display: flex; flex-wrap: wrap; gap: 6px; margin: 4px 0 6px; }
.chip { background: #eef3f7; border: 1px solid #d6e2ec; border-radius: 4px; padding: 1px 8px; font-size: 0.85rem;
        font-variant-numeric: tabular-nums; }
.hist svg { display: block; max-width: 100%; height: auto; }
.ctx-list { display: flex; flex-direction: column; gap: 3px; }
.ctx { display: flex; gap: 10px; align-items: baseline; padding: 2px 0; border-bottom: 1px dashed #eee; }
.ctx .val { flex: 0 0 4.5em; text-align: right; font-variant-numeric: tabular-nums; color: var(--muted); font-size: 0.82rem; }
.ctx .text { font-family: var(--mono); font-size: 0.84rem; white-space: pre-wrap; word-break: break-word;
             line-height: 1.75; }
.tok { border-radius: 2px; padding: 1px 0; }
.tok.on { box-shadow: inset -1px 0 0 rgba(255,255,255,0.7); }
.tok.top { outline: 2px solid var(--hl); outline-offset: 0; }
.tok.ws { color: #8a8a8a; }
.logits { display: grid; grid-template-columns: 1fr 1fr; gap: 16px; }
.logits table td.tk { font-family: var(--mono); font-size: 0.82rem; max-width: 22ch; overflow: hidden;
                      text-overflow: ellipsis; }
.logits .barcell { width: 40%; }
.logits .b { height: 9px; border-radius: 2px; }
.logits .pos .b { background: #3b7dbb; }
.logits .neg .b { background: #D55E00; }
.legend { display: flex; align-items: center; gap: 6px; font-size: 0.8rem; color: var(--muted); margin: 2px 0 6px; }
.legend .ramp { width: 120px; height: 10px; border: 1px solid #ccc; background: linear-gradient(to right, #fff, #08519c); }
.visually-hidden { position: absolute; width: 1px; height: 1px; overflow: hidden; clip: rect(0 0 0 0); }
"""

_JS = r"""
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("dashboard-data").textContent);
  function bytes(s) { var b = atob(s), u = new Uint8Array(b.length); for (var i = 0; i < b.length; i++) u[i] = b.charCodeAt(i); return u; }
  function typed(s, T) { var u = bytes(s); return new T(u.buffer, 0, u.byteLength / T.BYTES_PER_ELEMENT); }
  var TokArr = D.tokType === "u4" ? Uint32Array : Uint16Array;
  var m = D.m, L = D.L, bins = D.bins, n = Math.max(D.meta.n_tokens || 1, 1), T = D.tokens;
  var hist = typed(D.hist, D.histType === "u2" ? Uint16Array : Uint32Array), ctxTok = typed(D.ctxTok, TokArr), ctxAct = bytes(D.ctxAct);
  var start = new Int32Array(m + 1);
  for (var j = 0; j < m; j++) start[j + 1] = start[j] + D.nctx[j];
  var logit = {};
  ["promote", "suppress"].forEach(function (k) {
    if (D[k]) logit[k] = { T: D[k].T, tok: typed(D[k].tok, TokArr), val: typed(D[k].val, Float32Array) };
  });

  function ctrl(ch) { var c = ch.charCodeAt(0); return c < 32 || c === 127 ? String.fromCharCode(c === 127 ? 0x2421 : 0x2400 + c) : ch; }
  /* A token for display: newline as ↵, tab as →, other control characters as their symbols; spaces as · when alone. */
  function show(s, inText) {
    var out = s.replace(/\r\n/g, "\u21b5").replace(/\n/g, "\u21b5").replace(/\r/g, "\u240d").replace(/\t/g, "\u2192")
      .replace(/[\u0000-\u001f\u007f]/g, ctrl);
    if (!inText || /^ +$/.test(out)) out = out.replace(/ /g, "\u00b7");
    return out === "" ? "\u2205" : out;
  }
  function tokText(i) { return i === D.pad || i >= T.length ? "" : T[i]; }
  function fmt(v) { if (v === null || v === undefined || !isFinite(v)) return "\u2014"; var a = Math.abs(v);
    return a !== 0 && (a < 1e-3 || a >= 1e5) ? v.toExponential(2) : String(+v.toPrecision(3)); }
  function fmtFreq(c) { return c ? (+(100 * c / n).toPrecision(3)) + "%" : "0"; }
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }
  var SVG = "http://www.w3.org/2000/svg";
  function sv(tag, attrs, text) { var e = document.createElementNS(SVG, tag); for (var k in attrs) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text; return e; }

  /* per-latent summary text and search keys */
  var summaryText = [], searchKey = [];
  for (j = 0; j < m; j++) {
    var s = D.summary[j], parts = [], keys = [];
    for (var i = 0; i < s.length; i += 2) { var t = tokText(s[i]); parts.push(show(t, false) + (s[i + 1] > 1 ? " \u00d7" + s[i + 1] : ""));
      keys.push(t.toLowerCase(), show(t, false).toLowerCase()); }
    summaryText.push(parts.join("  "));
    searchKey.push(keys.join("\u0001"));
  }

  /* ---- the index ---- */
  var COLS = [
    { key: "id", label: "latent", num: true, v: function (j) { return j; } },
    { key: "freq", label: "frequency", num: true, v: function (j) { return D.count[j]; } },
    { key: "mean", label: "mean act", num: true, v: function (j) { return D.mean[j]; } },
    { key: "max", label: "max act", num: true, v: function (j) { return D.max[j]; } },
    { key: "top", label: "top tokens", num: false, v: function (j) { return summaryText[j].toLowerCase(); } }
  ];
  var table = document.getElementById("index"), tbody = table.tBodies[0];
  var search = document.getElementById("search"), hideDead = document.getElementById("hide-dead");
  var countEl = document.getElementById("shown-count"), moreBtn = document.getElementById("more");
  var order = [], shown = 0, sortCol = 0, sortAsc = true, selected = -1;
  var headRow = table.tHead.rows[0];
  COLS.forEach(function (c, ci) {
    var th = el("th", c.num ? "num" : "", c.label);
    th.scope = "col"; th.tabIndex = 0; th.setAttribute("data-key", c.key);
    function go() { if (sortCol === ci) sortAsc = !sortAsc; else { sortCol = ci; sortAsc = c.key === "id" || c.key === "top"; } refresh(); }
    th.addEventListener("click", go);
    th.addEventListener("keydown", function (e) { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); go(); } });
    headRow.appendChild(th);
  });

  function matches(j, q) {
    if (!q) return true;
    var id = String(j), qid = q.charAt(0) === "#" ? q.slice(1) : q;
    if (/^\d+$/.test(qid) && id.indexOf(qid) === 0) return true;
    return q.charAt(0) !== "#" && searchKey[j].indexOf(q) >= 0;
  }
  function refresh() {
    var q = search.value.trim().toLowerCase(), hd = hideDead.checked, col = COLS[sortCol];
    order = [];
    for (var j = 0; j < m; j++) if ((!hd || D.count[j] > 0) && matches(j, q)) order.push(j);
    var keys = order.map(col.v);
    var idx = order.map(function (_, i) { return i; });
    idx.sort(function (a, b) {
      var x = keys[a], y = keys[b], c;
      if (x === null && y === null) c = 0; else if (x === null) return 1; else if (y === null) return -1;
      else c = col.num ? x - y : (x < y ? -1 : x > y ? 1 : 0);
      if (c === 0) c = order[a] - order[b];
      return sortAsc ? c : -c;
    });
    order = idx.map(function (i) { return order[i]; });
    Array.prototype.forEach.call(headRow.cells, function (th, ci) {
      if (ci === sortCol) th.setAttribute("aria-sort", sortAsc ? "ascending" : "descending"); else th.removeAttribute("aria-sort"); });
    tbody.textContent = ""; shown = 0; more();
  }
  function more() {
    var stop = Math.min(order.length, shown + PAGE), frag = document.createDocumentFragment();
    for (var r = shown; r < stop; r++) {
      var j = order[r], tr = el("tr", D.count[j] ? "" : "dead");
      tr.setAttribute("data-latent", j); tr.tabIndex = 0;
      if (j === selected) tr.classList.add("selected");
      tr.appendChild(el("td", "num", String(j)));
      var f = el("td", "num", fmtFreq(D.count[j])); f.title = D.count[j] + " of " + n + " tokens"; tr.appendChild(f);
      tr.appendChild(el("td", "num", D.count[j] ? fmt(D.mean[j]) : "\u2014"));
      tr.appendChild(el("td", "num", D.count[j] ? fmt(D.max[j]) : "\u2014"));
      var tk = el("td", "toks", D.count[j] ? summaryText[j] : "dead"); tk.title = tk.textContent; tr.appendChild(tk);
      frag.appendChild(tr);
    }
    tbody.appendChild(frag); shown = stop;
    countEl.textContent = "showing " + shown.toLocaleString() + " of " + order.length.toLocaleString() + " latents";
    moreBtn.hidden = shown >= order.length;
  }
  var PAGE = +document.getElementById("index").getAttribute("data-page") || 200;
  var timer = null;
  search.addEventListener("input", function () { clearTimeout(timer); timer = setTimeout(refresh, 120); });
  hideDead.addEventListener("change", refresh);
  moreBtn.addEventListener("click", more);
  var wrap = document.getElementById("index-wrap");
  wrap.addEventListener("scroll", function () {
    if (shown < order.length && wrap.scrollTop + wrap.clientHeight > wrap.scrollHeight - 300) more();
  });
  function rowLatent(e) { var tr = e.target.closest("tr[data-latent]"); return tr ? +tr.getAttribute("data-latent") : -1; }
  tbody.addEventListener("click", function (e) { var j = rowLatent(e); if (j >= 0) open(j, true); });
  tbody.addEventListener("keydown", function (e) { if (e.key === "Enter") { var j = rowLatent(e); if (j >= 0) open(j, true); } });

  /* ---- the detail panel ---- */
  var detail = document.getElementById("detail");
  function colour(t) { /* white -> #08519c, one hue */
    return [Math.round(255 - t * 247), Math.round(255 - t * 174), Math.round(255 - t * 99)];
  }
  function lum(c) { var f = c.map(function (v) { v /= 255; return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); });
    return 0.2126 * f[0] + 0.7152 * f[1] + 0.0722 * f[2]; }
  function histogram(j) {
    var W = 520, H = 150, ml = 44, mr = 10, mt = 10, mb = 30, pw = W - ml - mr, ph = H - mt - mb, top = 1, i;
    for (i = 0; i < bins; i++) top = Math.max(top, hist[j * bins + i]);
    var svg = sv("svg", { viewBox: "0 0 " + W + " " + H, width: W, height: H, role: "img", "class": "act-hist",
      "aria-label": "Histogram of latent " + j + "'s nonzero activations" });
    var y0 = mt + ph, bw = pw / bins, mx = D.max[j] || 0;
    for (i = 0; i < bins; i++) {
      var c = hist[j * bins + i]; if (!c) continue;
      var h = Math.max(ph * c / top, 1);
      var r = sv("rect", { x: (ml + i * bw).toFixed(1), y: (y0 - h).toFixed(1), width: Math.max(bw - 1, 1).toFixed(1),
        height: h.toFixed(1), "class": "bar" });
      r.appendChild(sv("title", {}, fmt(mx * i / bins) + " to " + fmt(mx * (i + 1) / bins) + ": " + c + " tokens"));
      svg.appendChild(r);
    }
    svg.appendChild(sv("line", { x1: ml, y1: y0, x2: W - mr, y2: y0, "class": "axis" }));
    svg.appendChild(sv("line", { x1: ml, y1: mt, x2: ml, y2: y0, "class": "axis" }));
    svg.appendChild(sv("text", { x: ml - 6, y: mt + 4, "class": "tick", "text-anchor": "end" }, String(top)));
    svg.appendChild(sv("text", { x: ml - 6, y: y0, "class": "tick", "text-anchor": "end" }, "0"));
    [0, 0.5, 1].forEach(function (f) { svg.appendChild(sv("text", { x: ml + f * pw, y: y0 + 13, "class": "tick",
      "text-anchor": f === 0 ? "start" : f === 1 ? "end" : "middle" }, fmt(f * mx))); });
    svg.appendChild(sv("text", { x: ml + pw / 2, y: H - 3, "class": "label", "text-anchor": "middle" },
      "activation (nonzero only; counts of tokens)"));
    return svg;
  }
  function contexts(j) {
    var list = el("div", "ctx-list"), mx = D.max[j] || 0, W = D.meta.window || 0;
    for (var c = start[j]; c < start[j + 1]; c++) {
      var row = el("div", "ctx"), g = D.ctxRow[c];
      var v = el("span", "val", fmt(D.ctxValue[c]));
      v.title = "max " + fmt(D.ctxValue[c]) + (W ? " at window " + Math.floor(g / W) + ", position " + (g % W) : " at row " + g);
      row.appendChild(v);
      var text = el("span", "text");
      for (var p = 0; p < L; p++) {
        var ti = ctxTok[c * L + p]; if (ti === D.pad) continue;
        var raw = tokText(ti), q = ctxAct[c * L + p], a = q / 255 * mx;
        var span = el("span", "tok", show(raw, true));
        if (/^\s*$/.test(raw)) span.classList.add("ws");
        if (q > 0) {
          var rgb = colour(0.08 + 0.92 * q / 255);
          span.style.background = "rgb(" + rgb.join(",") + ")"; span.classList.add("on");
          if (lum(rgb) < 0.19) { span.style.color = "#fff"; span.classList.remove("ws"); }
        }
        if (p === D.before) { span.classList.add("top"); a = D.ctxValue[c]; }
        span.title = JSON.stringify(raw) + "  activation " + (q === 0 && p !== D.before ? "0" : fmt(a));
        text.appendChild(span);
      }
      row.appendChild(text);
      list.appendChild(row);
    }
    return list;
  }
  function logitTable(k, j, cls, heading) {
    var box = el("div", cls), d = logit[k];
    box.appendChild(el("h3", "", heading));
    var tbl = el("table"), body = el("tbody"), big = 1e-12, i;
    for (i = 0; i < d.T; i++) big = Math.max(big, Math.abs(d.val[j * d.T + i]));
    for (i = 0; i < d.T; i++) {
      var tr = el("tr"), raw = tokText(d.tok[j * d.T + i]), val = d.val[j * d.T + i];
      var tk = el("td", "tk", show(raw, false)); tk.title = JSON.stringify(raw); tr.appendChild(tk);
      tr.appendChild(el("td", "num", (val > 0 ? "+" : "") + fmt(val)));
      var bc = el("td", "barcell"), b = el("div", "b");
      b.style.width = (100 * Math.abs(val) / big).toFixed(1) + "%";
      bc.appendChild(b); tr.appendChild(bc);
      body.appendChild(tr);
    }
    tbl.appendChild(body); box.appendChild(tbl);
    return box;
  }
  function open(j, fromUser) {
    selected = j;
    Array.prototype.forEach.call(tbody.querySelectorAll("tr.selected"), function (tr) { tr.classList.remove("selected"); });
    var tr = tbody.querySelector('tr[data-latent="' + j + '"]'); if (tr) tr.classList.add("selected");
    detail.textContent = "";
    detail.setAttribute("data-latent", j);
    detail.appendChild(el("h2", "", "Latent " + j));
    var chips = el("div", "chips");
    [["fires on", D.count[j] + " tokens (" + fmtFreq(D.count[j]) + ")"], ["mean when firing", fmt(D.count[j] ? D.mean[j] : null)],
     ["max", fmt(D.count[j] ? D.max[j] : null)]].forEach(function (p) { chips.appendChild(el("span", "chip", p[0] + " " + p[1])); });
    detail.appendChild(chips);
    if (!D.count[j]) {
      detail.appendChild(el("p", "empty", "Dead: this latent never fired on the " + n.toLocaleString() + " scanned tokens."));
    } else {
      detail.appendChild(el("h3", "", "Activation histogram"));
      var hb = el("div", "hist"); hb.appendChild(histogram(j)); detail.appendChild(hb);
      detail.appendChild(el("h3", "", "Top activating contexts"));
      var lg = el("div", "legend");
      lg.appendChild(el("span", "", "0")); lg.appendChild(el("span", "ramp")); lg.appendChild(el("span", "", fmt(D.max[j])));
      lg.appendChild(el("span", "", "\u2003outlined: the token of the context's top activation; hover a token for its value"));
      detail.appendChild(lg);
      detail.appendChild(contexts(j));
    }
    if (logit.promote) {
      detail.appendChild(el("h3", "", "Logit weights (decoder direction through the unembedding)"));
      var lw = el("div", "logits");
      lw.appendChild(logitTable("promote", j, "pos", "Promotes"));
      lw.appendChild(logitTable("suppress", j, "neg", "Suppresses"));
      detail.appendChild(lw);
    }
    if (fromUser && history.replaceState) history.replaceState(null, "", "#latent-" + j);
  }

  refresh();
  var h = /^#latent-(\d+)$/.exec(location.hash), first = -1;
  if (h && +h[1] < m) first = +h[1];
  else for (var r = 0; r < order.length; r++) if (D.count[order[r]]) { first = order[r]; break; }
  if (first >= 0) open(first, false);
})();
"""


def render_dashboard(data: dict[str, Any]) -> str:
    """The whole dashboard page as a string (see the module docstring for `data`)."""
    payload = encode_payload(data)
    meta = payload["meta"]
    count = np.asarray(payload["count"], dtype=np.int64)
    title = f"saekit dashboard · {meta.get('run_id', '')}"
    body = (
        _header(meta, count) + '<div class="split"><section aria-label="latent index"><div class="controls">'
        '<label class="visually-hidden" for="search">Search latents</label>'
        '<input id="search" type="search" placeholder="Search: latent id (e.g. 42 or #42) or token text" autocomplete="off">'
        '<label><input id="hide-dead" type="checkbox"> hide dead latents</label></div>'
        f'<div class="index-wrap" id="index-wrap"><table id="index" data-page="{PAGE_ROWS}"><thead><tr></tr></thead><tbody></tbody></table>'
        '<div class="more"><span id="shown-count"></span><button id="more" type="button">show more</button></div></div></section>'
        '<section id="detail" aria-live="polite"><p class="empty">Click a latent in the table to see its contexts.</p></section></div>'
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{_CSS}</style></head>\n"
        f"<body><main>{body}</main>\n"
        f'<script type="application/json" id="dashboard-data">{_script_json(payload)}</script>\n'
        f"<script>{_JS}</script></body></html>\n"
    )


def write_dashboard(
    out_dir: Path,
    run_id: str,
    *,
    n_tokens: int = 200_000,
    contexts: int = 10,
    output: Path | None = None,
    batch: int = 4096,
    lm: Any = None,
    device: str = "auto",
) -> Path:
    """Collect the dashboard of run `run_id` (folder OUT/runs/RUN_ID) and write it atomically to `output`
    (default OUT/dashboards/RUN_ID.html); returns the path. Training metrics come from OUT/runs.sqlite when present."""
    from saekit.report.dashboard_data import collect_dashboard

    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise InputError(f"no such output folder: {out_dir}")
    if not run_id or "/" in run_id or "\\" in run_id or run_id.startswith("."):
        raise InputError(f"not a run id: {run_id!r}")
    folder = out_dir / "runs" / run_id
    if not folder.is_dir():
        raise InputError(f"no run {run_id!r} in {out_dir} ({folder} does not exist)")
    train = None
    if (out_dir / "runs.sqlite").is_file():
        from saekit.store import RunStore

        row = RunStore(out_dir).get(run_id)
        if row is not None:
            train = {**{k: row.get(k) for k in ("mse", "fvu", "l0", "dead_fraction")}, **(row.get("metrics") or {})}
    data = collect_dashboard(folder, n_tokens=n_tokens, contexts=contexts, batch=batch, lm=lm, train_metrics=train, device=device)
    data["meta"]["run_id"] = run_id
    page = render_dashboard(data)
    target = Path(output) if output is not None else out_dir / "dashboards" / f"{run_id}.html"
    atomic_write_bytes(target, page.encode("utf-8"))
    return target
