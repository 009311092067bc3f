"""The report's figures: matplotlib (object-oriented API, Agg canvas) drawn to PNG data URIs.

Each public function takes plain rows (run rows, analysis dicts) and returns `FigureBlock`s: a PNG
data URI plus a caption, or no image and a short note saying why the figure was skipped. Nothing here
touches pyplot or matplotlib's global state, so importing this module cannot change other code's plots.
"""

from __future__ import annotations

import base64
import io
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter, NullLocator

from saekit.archspec import ARCH_SPECS, RELU, ArchSpec
from saekit.metrics import DEAD_THRESHOLD
from saekit.store import finite, run_value

# Okabe & Ito (2008), safe for the common colour-vision deficiencies; yellow last (weak on white).
OKABE_ITO = ("#000000", "#E69F00", "#56B4E9", "#009E73", "#0072B2", "#D55E00", "#CC79A7", "#F0E442")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
HEATMAP_CMAP = matplotlib.colormaps["viridis"].with_extremes(bad="#e4e4e4")
DPI = 110


@dataclass(frozen=True)
class FigureBlock:
    """One figure slot of the page: `png` is a `data:image/png;base64,...` URI, or None with `note` saying why."""

    key: str
    title: str
    caption: str
    png: str | None = None
    note: str | None = None


# -- small helpers ---------------------------------------------------------------------------------


def mean_by(rows: Iterable[dict[str, Any]], keys: Sequence[str], value: str) -> dict[tuple, float]:
    """Mean of `rows[value]` grouped by the tuple of `keys` (e.g. averaging over seeds); skips missing values."""
    acc: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        v = finite(r.get(value))
        if v is None or any(r.get(k) is None for k in keys):
            continue
        acc[tuple(r[k] for k in keys)].append(v)
    return {k: float(np.mean(vs)) for k, vs in acc.items()}


def series_colors(n: int) -> list[str]:
    """`n` colour-blind-safe line colours: Okabe–Ito up to 8, else evenly spaced cividis (its pale end left out)."""
    if n <= len(OKABE_ITO):
        return list(OKABE_ITO[:n])
    cmap = matplotlib.colormaps["cividis"]
    return [matplotlib.colors.to_hex(cmap(x)) for x in np.linspace(0.0, 0.85, n)]


def fmt_knob(v: float) -> str:
    return f"{v:.3g}"


def _to_data_uri(fig: Figure) -> str:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _size_axis(ax: Any, sizes: Sequence[int], which: str = "x") -> None:
    """A base-2 log axis with a labelled tick at each dictionary size of the grid."""
    axis = ax.xaxis if which == "x" else ax.yaxis
    (ax.set_xscale if which == "x" else ax.set_yscale)("log", base=2)
    ticks = sorted(set(sizes))
    step = 1 if len(ticks) <= 7 else 2
    (ax.set_xticks if which == "x" else ax.set_yticks)(ticks, labels=[str(t) if i % step == 0 else "" for i, t in enumerate(ticks)])
    axis.set_minor_locator(NullLocator())
    if which == "x" and len(ticks) > 5:
        _rotate_x(ax)


def _rotate_x(ax: Any) -> None:
    """Slant crowded x tick labels, each anchored at its tick."""
    for label in ax.get_xticklabels():
        label.set(rotation=35, ha="right", rotation_mode="anchor")


def _knob_axis(ax: Any, knob_values: Sequence[float]) -> None:
    """A log-10 axis with a labelled tick at each value of the sparsity knob in the grid (every other one when crowded)."""
    ax.set_xscale("log")
    ticks = sorted(set(knob_values))
    step = 1 if len(ticks) <= 7 else 2
    ax.set_xticks(ticks, labels=[fmt_knob(t) if i % step == 0 else "" for i, t in enumerate(ticks)])
    ax.xaxis.set_minor_locator(NullLocator())
    if len(ticks) > 5:
        _rotate_x(ax)


def wants_log(values: Iterable[float], decades: float = 1.5) -> bool:
    """Whether a log axis suits `values`: all positive and spanning more than `decades` decades."""
    vs = [v for v in values if v is not None]
    return bool(vs) and min(vs) > 0 and max(vs) / min(vs) > 10**decades


def _plain_log_labels(axis: Any, values: Iterable[float]) -> None:
    """Label a log axis with plain numbers (0.05, not 5×10⁻²): every tick within a decade, 1-2-5 ticks up to three."""
    vs = [v for v in values if v is not None and v > 0]
    span = math.log10(max(vs) / min(vs)) if vs else 0.0
    keep = {1, 2, 3, 4, 5, 6, 7, 8, 9} if span < 1 else {1, 2, 5} if span < 3 else {1}

    def label(v: float, _pos: Any) -> str:
        if v <= 0:
            return ""
        mantissa = round(v / 10 ** math.floor(math.log10(v) + 1e-9))
        return f"{v:g}" if mantissa in keep else ""

    axis.set_major_formatter(FuncFormatter(label))
    axis.set_minor_formatter(FuncFormatter(label) if len(keep) > 1 else NullFormatter())


def _reference_lines(ax: Any, true_features: int | None, estimate: float | None, axis: str = "x") -> None:
    line = ax.axvline if axis == "x" else ax.axhline
    if true_features:
        line(true_features, color="#777777", ls="--", lw=1.2, label=f"true feature count G = {true_features}")
    if estimate:
        line(estimate, color="#D55E00", ls=":", lw=1.6, label=f"estimated feature count ≈ {estimate:.4g}")


def _skip(key: str, title: str, caption: str, note: str) -> FigureBlock:
    return FigureBlock(key=key, title=title, caption=caption, png=None, note=note)


def _caption(template: str, knob: ArchSpec, **fields: Any) -> str:
    """A caption template with the sweep's knob filled in: {name} ('L1 coefficient α', 'k'), {symbol}, {term}."""
    return template.format(name=knob.knob_name, symbol=knob.knob_symbol, term=knob.sparsity_term, **fields)


def _too_few_values(knob: ArchSpec) -> str:
    return f"at least two values of {knob.knob_name}"


# -- 2. recovery heatmaps --------------------------------------------------------------------------

RECOVERY_CAPTION = (
    "Each cell is one ({name}, dictionary size) pair, averaged over seeds. Left: MMCS, the mean over true "
    "features of the best cosine similarity with any decoder direction. Right: the fraction of true features recovered "
    "with a cosine of at least 0.9. Colour scales are fixed to [0, 1]; grey cells were not trained or have no value. "
    "Sharkey et al. found that a plain L1-penalised autoencoder recovers nearly all true features (MMCS close to 1) "
    "once the dictionary is at least as large as the true feature count and the sparsity pressure ({symbol}) sits in the "
    "right band: too weak leaves directions mixed, too strong kills or shrinks features."
)


def recovery_heatmaps(runs: list[dict[str, Any]]) -> list[FigureBlock]:
    """MMCS and recovered-fraction heatmaps over (the architecture's knob on x, dict size on y), one figure per
    architecture with ground truth."""
    title = "Recovery of the true features"
    archs = sorted({str(r.get("arch")) for r in runs if finite(r.get("mmcs")) is not None})
    if not archs:
        note = "No ground truth in this data (MMCS is empty for every run): heatmaps skipped."
        return [_skip("recovery", title, _caption(RECOVERY_CAPTION, RELU), note)]
    blocks = []
    for arch in archs:
        knob = ARCH_SPECS.get(arch, RELU)
        rows = [r for r in runs if str(r.get("arch")) == arch]
        mmcs = mean_by(rows, ("dict_size", "knob_value"), "mmcs")
        rec = mean_by(rows, ("dict_size", "knob_value"), "recovered_0_9")
        sizes = sorted({k[0] for k in mmcs})
        knob_values = sorted({k[1] for k in mmcs})
        height = max(3.3, 0.42 * len(sizes) + 1.9)
        width = min(13.0, max(9.0, 1.3 * len(knob_values) + 4.0))
        fig = Figure(figsize=(width, height), layout="constrained")
        axes = fig.subplots(1, 2)
        for ax, values, label in ((axes[0], mmcs, "MMCS"), (axes[1], rec, "fraction recovered (cos ≥ 0.9)")):
            grid = np.full((len(sizes), len(knob_values)), np.nan)
            for (s, a), v in values.items():
                if s in sizes and a in knob_values:
                    grid[sizes.index(s), knob_values.index(a)] = v
            im = ax.imshow(grid, cmap=HEATMAP_CMAP, vmin=0.0, vmax=1.0, origin="lower", aspect="auto", interpolation="nearest")
            fontsize = 9 if grid.size <= 30 else 7
            for i in range(len(sizes)):
                for j in range(len(knob_values)):
                    v = grid[i, j]
                    if np.isnan(v):
                        ax.text(j, i, "–", ha="center", va="center", fontsize=fontsize, color="#555555")
                        continue
                    r, g, b, _ = HEATMAP_CMAP(v)
                    dark = 0.2126 * r + 0.7152 * g + 0.0722 * b < 0.5
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=fontsize, color="white" if dark else "black")
            ax.set_xticks(range(len(knob_values)), labels=[fmt_knob(a) for a in knob_values])
            ax.set_yticks(range(len(sizes)), labels=[str(s) for s in sizes])
            if len(knob_values) > 6:
                _rotate_x(ax)
            ax.set_xlabel(f"{knob.knob_name} (log grid)")
            ax.set_ylabel("dictionary size (latents, log₂ grid)")
            ax.set_title(f"{label} ({arch})")
            fig.colorbar(im, ax=ax, label=f"{label} (0–1)", shrink=0.9)
        best = max(mmcs.items(), key=lambda kv: kv[1])
        (bs, ba), bv = best
        block_title = (
            f"Recovery of the true features ({arch}): best MMCS {bv:.3f} at dictionary size {bs}, {knob.knob_symbol} = {fmt_knob(ba)}"
        )
        caption = _caption(RECOVERY_CAPTION, knob)
        blocks.append(FigureBlock(key=f"recovery-{arch}", title=block_title, caption=caption, png=_to_data_uri(fig)))
    return blocks


# -- 3. dead latents -------------------------------------------------------------------------------

DEAD_CAPTION = (
    "Left: the fraction of latents that never fire on the evaluation data, against dictionary size (log₂ axis), one line "
    "per {name}, averaged over seeds. Right: the number of live latents; the grey diagonal is 'every latent "
    "alive'. Heuristic (a) of Sharkey et al.: dead latents appear once the dictionary is larger than the true feature "
    "count, so the dead fraction should stay near zero up to that size and rise beyond it, while the live count levels "
    "off near the number of true features."
)


def dead_latents(
    analysis: dict[str, Any],
    runs: list[dict[str, Any]],
    *,
    knob: ArchSpec,
    true_features: int | None = None,
    estimate: float | None = None,
) -> FigureBlock:
    """Dead fraction and live latents vs dictionary size, one line per value of the knob (from `analysis['dead']`,
    else the run rows)."""
    title = "Dead latents vs dictionary size"
    caption = _caption(DEAD_CAPTION, knob)
    rows = list(analysis.get("dead") or [])
    source_note = ""
    if not rows:
        rows = runs
        source_note = " (Derived from the run table: the analysis had no dead-latent rows.)"
    rows = [_with_live_latents(r) for r in rows]
    dead = mean_by(rows, ("knob_value", "dict_size"), "dead_fraction")
    live = mean_by(rows, ("knob_value", "dict_size"), "live_latents")
    sizes = sorted({k[1] for k in dead})
    if len(sizes) < 2:
        return _skip("dead", title, caption, "Needs at least two dictionary sizes: skipped.")
    knob_values = sorted({k[0] for k in dead})
    fig = Figure(figsize=(11.5, 4.2), layout="constrained")
    ax_dead, ax_live = fig.subplots(1, 2)
    for color, marker, a in zip(series_colors(len(knob_values)), MARKERS * 10, knob_values, strict=False):
        xs = [s for s in sizes if (a, s) in dead]
        ax_dead.plot(xs, [dead[(a, s)] for s in xs], marker=marker, color=color, ms=5, lw=1.6, label=f"{knob.knob_symbol} = {fmt_knob(a)}")
        xl = [s for s in sizes if (a, s) in live]
        ax_live.plot(xl, [live[(a, s)] for s in xl], marker=marker, color=color, ms=5, lw=1.6)
    ax_live.plot(sizes, sizes, color="#aaaaaa", lw=1, ls="-", zorder=0, label="all latents alive")
    for ax in (ax_dead, ax_live):
        _size_axis(ax, sizes)
        _reference_lines(ax, true_features, estimate)
        ax.set_xlabel("dictionary size (latents)")
        ax.grid(alpha=0.3)
    top = max(dead.values())
    ax_dead.set_ylim(-0.02, min(1.02, max(0.1, top * 1.1)))
    ax_dead.set_ylabel("dead fraction (of latents)")
    ax_dead.set_title("Dead latents appear above the true size")
    if live and min(live.values()) > 0:
        _size_axis(ax_live, sizes, "y")
    ax_live.set_ylabel("live latents (count)")
    ax_live.set_title("Live latents level off near the feature count")
    _figure_legend(fig, [ax_dead, ax_live], knob.knob_name)
    block_title = "Dead latents vs dictionary size"
    first = _first_size_with_dead(dead, sizes)
    if first is not None:
        block_title += f": dead latents (≥ 5%) first appear at {first} latents"
    else:
        block_title += ": no dictionary has more than 5% dead latents"
    return FigureBlock(key="dead", title=block_title, caption=caption + source_note, png=_to_data_uri(fig))


def _with_live_latents(row: dict[str, Any]) -> dict[str, Any]:
    """`row` with `live_latents` = dict_size x (1 - dead_fraction) filled in when it is missing."""
    if finite(row.get("live_latents")) is not None:
        return row
    dead, size = finite(row.get("dead_fraction")), finite(row.get("dict_size"))
    return {**row, "live_latents": size * (1.0 - dead)} if dead is not None and size is not None else row


def _first_size_with_dead(dead: dict[tuple, float], sizes: list[int], threshold: float = DEAD_THRESHOLD) -> int | None:
    for s in sizes:
        if any(v >= threshold for (a, size), v in dead.items() if size == s):
            return s
    return None


def _figure_legend(fig: Figure, axes: Sequence[Any], title: str) -> None:
    """One legend for the whole figure, outside on the right, without duplicate labels."""
    seen: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=False):
            seen.setdefault(label, handle)
    if seen:
        fig.legend(
            list(seen.values()), list(seen.keys()), loc="outside right upper", title=title, fontsize=8, title_fontsize=9, frameon=False
        )


# -- 4. loss terms ---------------------------------------------------------------------------------

LOSS_CAPTION = (
    "The two terms of the training loss against {name} (log axis), one line per dictionary size, "
    "averaged over seeds: the reconstruction loss (mean squared error, log axis) and the sparsity loss ({term}). "
    "Diamonds mark each size's collapse point found by the analysis; the small panel plots those points against "
    "dictionary size on log–log axes with a power-law fit. Heuristic (b) of Sharkey et al.: looked at separately "
    "rather than summed, the two terms change regime at the right {symbol} and dictionary size, so the collapse points "
    "should line up along a clear trend."
)


def _loss_rows(analysis: dict[str, Any], runs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """The analysis's loss-term rows, or rows derived from the run table when it has none; plus a caption note
    saying so in that case."""
    rows = list(analysis.get("loss_terms") or [])
    if rows:
        return rows, ""
    rows = [{**r, **(r.get("metrics") or {})} for r in runs if r.get("metrics")]
    return rows, " (Derived from the run table: the analysis had no loss-term rows.)"


def _collapse_points(collapse: dict[str, Any]) -> dict[int, float]:
    """dict size -> its positive, finite knob_collapse from the analysis's collapse points."""
    return {
        int(p["dict_size"]): float(p["knob_collapse"])
        for p in collapse.get("points") or []
        if finite(p.get("knob_collapse")) and finite(p.get("dict_size")) and float(p["knob_collapse"]) > 0
    }


def _plot_loss_panel(
    ax: Any,
    values: dict[tuple, float],
    *,
    log_y: bool,
    sizes: list[Any],
    knob_values: list[Any],
    points: dict[int, float],
    knob: ArchSpec,
) -> None:
    """One loss term vs the knob on `ax`: a line per dict size, its collapse point marked with a diamond."""
    colors = dict(zip(sizes, series_colors(len(sizes)), strict=False))
    markers = dict(zip(sizes, MARKERS * 10, strict=False))
    if log_y:
        ax.set_yscale("log")
        _plain_log_labels(ax.yaxis, values.values())
    for s in sizes:
        xs = [a for a in knob_values if (s, a) in values]
        if not xs:
            continue
        ys = [values[(s, a)] for a in xs]
        ax.plot(xs, ys, marker=markers[s], ms=4, lw=1.5, color=colors[s], label=f"{s} latents")
        if s in points and len(xs) >= 2 and min(xs) <= points[s] <= max(xs):
            yc = _interp_log(points[s], xs, ys, log_y=log_y)
            ax.plot([points[s]], [yc], marker="D", ms=8, color=colors[s], mec="black", mew=1.0, ls="none", zorder=5)
    _knob_axis(ax, knob_values)
    ax.set_xlabel(knob.knob_name)
    ax.grid(alpha=0.3)


def _plot_collapse_scaling(ax: Any, points: dict[int, float], fit: dict[str, Any] | None, knob: ArchSpec) -> None:
    """knob_collapse vs dict size on log–log axes, with the power-law fit when the analysis has one."""
    xs = sorted(points)
    ax.plot(xs, [points[s] for s in xs], "o", color="#0072B2", ms=6, label=f"collapse {knob.knob_symbol}")
    if fit and finite(fit.get("exponent")) is not None and finite(fit.get("prefactor")) is not None:
        grid = np.geomspace(min(xs), max(xs), 50)
        exp, pre = float(fit["exponent"]), float(fit["prefactor"])
        r2 = finite(fit.get("r2"))
        label = f"fit {knob.knob_symbol} ∝ $m^{{{exp:.2f}}}$" + (f", R² = {r2:.2f}" if r2 is not None else "")
        ax.plot(grid, pre * grid**exp, "--", color="#D55E00", lw=1.5, label=label)
    _size_axis(ax, xs)
    ax.set_yscale("log")
    _plain_log_labels(ax.yaxis, points.values())
    ax.set_xlabel("dictionary size m (latents)")
    ax.set_ylabel(f"collapse {knob.knob_symbol}")
    ax.set_title(f"Collapse {knob.knob_symbol} vs size", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7.5, loc="best")


def loss_terms(analysis: dict[str, Any], runs: list[dict[str, Any]], *, knob: ArchSpec) -> FigureBlock:
    """Reconstruction and sparsity loss vs the knob, one line per dict size, with collapse points; plus knob_collapse vs
    size (log–log)."""
    title = f"Loss terms vs {knob.knob_name}"
    caption = _caption(LOSS_CAPTION, knob)
    rows, source_note = _loss_rows(analysis, runs)
    recon = mean_by(rows, ("dict_size", "knob_value"), "reconstruction_loss")
    sparse = mean_by(rows, ("dict_size", "knob_value"), "sparsity_loss")
    knob_values = sorted({k[1] for k in (*recon, *sparse)})
    if len(knob_values) < 2:
        return _skip("loss", title, caption, f"Needs {_too_few_values(knob)} (and recorded loss terms): skipped.")
    sizes = sorted({k[0] for k in (*recon, *sparse)})
    collapse = analysis.get("collapse") or {}
    points = _collapse_points(collapse)
    fit = collapse.get("power_law") or None
    scaling = len(points) >= 2
    fig = Figure(figsize=(13.0 if scaling else 11.5, 4.3), layout="constrained")
    axes = fig.subplots(1, 3 if scaling else 2, width_ratios=[1, 1, 0.75] if scaling else None)
    ax_rec, ax_sp = axes[0], axes[1]
    log_rec = bool(recon) and min(recon.values()) > 0
    for ax, values, log_y in ((ax_rec, recon, log_rec), (ax_sp, sparse, wants_log(sparse.values()))):
        _plot_loss_panel(ax, values, log_y=log_y, sizes=sizes, knob_values=knob_values, points=points, knob=knob)
    ax_rec.set_ylabel("reconstruction loss (MSE per element)")
    ax_rec.set_title(f"Reconstruction loss rises with {knob.knob_symbol}")
    ax_sp.set_ylabel(f"sparsity loss ({knob.sparsity_term})")
    ax_sp.set_title(f"Sparsity loss falls with {knob.knob_symbol}")
    if points:
        ax_rec.plot([], [], marker="D", ms=7, color="white", mec="black", ls="none", label="collapse point")
    _figure_legend(fig, [ax_rec, ax_sp], "dictionary size")
    if scaling:
        _plot_collapse_scaling(axes[2], points, fit, knob)
    block_title = f"Reconstruction and sparsity losses vs {knob.knob_name}, looked at separately"
    if fit and finite(fit.get("exponent")) is not None:
        block_title += f": collapse {knob.knob_symbol} scales as size^{float(fit['exponent']):.2f}"
    note = None if points else "No collapse points in the analysis: none are marked."
    return FigureBlock(key="loss", title=block_title, caption=caption + source_note, png=_to_data_uri(fig), note=note)


def _interp_log(x: float, xs: Sequence[float], ys: Sequence[float], *, log_y: bool) -> float:
    """y at `x` on the polyline (xs, ys), interpolating in log x (and log y when `log_y`)."""
    lx = np.log(np.asarray(xs, dtype=float))
    y = np.log(np.asarray(ys, dtype=float)) if log_y else np.asarray(ys, dtype=float)
    v = float(np.interp(math.log(x), lx, y))
    return math.exp(v) if log_y else v


# -- 5. MMCS with larger dictionaries ---------------------------------------------------------------

CROSS_CAPTION = (
    "For each {name}, the MMCS of each dictionary's decoder directions against the larger dictionaries "
    "trained at the same {symbol} (left), and the fraction of its directions matched in them (right), against the smaller "
    "dictionary's size (log₂ axis); values averaged over the larger sizes and seeds. This needs no ground truth. "
    "Heuristic (c) of Sharkey et al.: the MMCS with larger dictionaries stays high up to the true feature count and "
    "falls beyond it, because only the true features are found again and again."
)


def cross_size(analysis: dict[str, Any], *, knob: ArchSpec, true_features: int | None = None, estimate: float | None = None) -> FigureBlock:
    """MMCS and matched fraction against larger dictionaries vs dict size, one line per value of the knob
    (from `analysis['cross_size']`)."""
    title = "MMCS with larger dictionaries"
    caption = _caption(CROSS_CAPTION, knob)
    rows = list(analysis.get("cross_size") or [])
    mmcs = mean_by(rows, ("knob_value", "dict_size"), "mmcs")
    matched = mean_by(rows, ("knob_value", "dict_size"), "matched_fraction")
    sizes = sorted({k[1] for k in (*mmcs, *matched)})
    if len(sizes) < 2:
        return _skip("cross", title, caption, "Needs cross-size comparisons at two or more dictionary sizes: skipped.")
    knob_values = sorted({k[0] for k in (*mmcs, *matched)})
    fig = Figure(figsize=(11.5, 4.2), layout="constrained")
    ax_m, ax_f = fig.subplots(1, 2)
    for color, marker, a in zip(series_colors(len(knob_values)), MARKERS * 10, knob_values, strict=False):
        for ax, values in ((ax_m, mmcs), (ax_f, matched)):
            xs = [s for s in sizes if (a, s) in values]
            if xs:
                ax.plot(
                    xs, [values[(a, s)] for s in xs], marker=marker, ms=5, lw=1.6, color=color, label=f"{knob.knob_symbol} = {fmt_knob(a)}"
                )
    for ax in (ax_m, ax_f):
        _size_axis(ax, sizes)
        _reference_lines(ax, true_features, estimate)
        ax.set_xlabel("dictionary size (latents)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    ax_m.set_ylabel("MMCS with larger dictionaries")
    ax_m.set_title("High up to the true size, lower beyond")
    ax_f.set_ylabel("matched fraction (of latents)")
    ax_f.set_title("Fraction of directions found again")
    _figure_legend(fig, [ax_m, ax_f], knob.knob_name)
    title = f"MMCS with larger dictionaries at the same {knob.knob_symbol}"
    return FigureBlock(key="cross", title=title, caption=caption, png=_to_data_uri(fig))


# -- 6. consensus ----------------------------------------------------------------------------------

CONSENSUS_CAPTION = (
    "For each {name}, the number of features two dictionaries of the same size trained from different "
    "init seeds both learned (left: connected components of decoder directions linked at cosine > 0.9 that hold "
    "directions of both seeds) and how strongly the seeds agree (right: mean max cosine between their live latents). "
    "The estimate reads the count where the seeds agree best, as the median over that {symbol} and its neighbours. "
    "This extends the report's heuristic (c), features recurring across dictionaries, from sizes to seeds."
)


def consensus(analysis: dict[str, Any], *, knob: ArchSpec, true_features: int | None = None, estimate: float | None = None) -> FigureBlock:
    """Consensus count and agreement vs the knob, one line per dict size (from `analysis['consensus']`)."""
    title = "Consensus across dictionaries"
    caption = _caption(CONSENSUS_CAPTION, knob)
    rows = list(analysis.get("consensus") or [])
    count = mean_by(rows, ("dict_size", "knob_value"), "count")
    agree = mean_by(rows, ("dict_size", "knob_value"), "agreement")
    knob_values = sorted({k[1] for k in (*count, *agree)})
    if len(knob_values) < 2:
        return _skip("consensus", title, caption, f"No consensus counts at {_too_few_values(knob)}: skipped.")
    sizes = sorted({k[0] for k in (*count, *agree)})
    fig = Figure(figsize=(11.5, 4.0), layout="constrained")
    ax_c, ax_a = fig.subplots(1, 2)
    for color, marker, s in zip(series_colors(len(sizes)), MARKERS * 10, sizes, strict=False):
        for ax, values in ((ax_c, count), (ax_a, agree)):
            xs = [a for a in knob_values if (s, a) in values]
            if xs:
                ax.plot(xs, [values[(s, a)] for a in xs], marker=marker, ms=5, lw=1.6, color=color, label=f"{s} latents")
    for ax in (ax_c, ax_a):
        _knob_axis(ax, knob_values)
        ax.set_xlabel(knob.knob_name)
        ax.grid(alpha=0.3)
    _reference_lines(ax_c, true_features, estimate, axis="y")
    if wants_log(count.values()):
        ax_c.set_yscale("log", base=2)
        _plain_log_labels(ax_c.yaxis, count.values())
    else:
        ax_c.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax_c.set_ylabel("consensus features (count)")
    ax_c.set_title("Directions the dictionaries agree on")
    ax_a.set_ylabel("agreement (0–1)")
    ax_a.set_title("Strength of agreement")
    _figure_legend(fig, [ax_c, ax_a], "dictionary size")
    return FigureBlock(key="consensus", title=f"Consensus feature counts vs {knob.knob_name}", caption=caption, png=_to_data_uri(fig))


# -- 7. sparsity and reconstruction ----------------------------------------------------------------

FRONTIER_CAPTION = (
    "Each point is one (dictionary size, {name}) pair, averaged over seeds; each line joins one dictionary "
    "size's points across {symbol}, from the sparsest (left: fewest active latents) to the densest (right); the small "
    "numbers are the {symbol} values of one line's points. x: L0, the mean number of latents active per sample (log axis). "
    "{left}FVU, the fraction of the input's variance the reconstruction leaves unexplained (0 is perfect). Lower and "
    "further left is better: at the same L0, a dictionary that reconstructs better has found more useful directions."
)
CE_CAPTION = (
    " Right: the fraction of the language model's next-token loss recovered when the SAE's reconstruction replaces the "
    "activations, (CE_zero − CE_sae) / (CE_zero − CE_clean): 1 (dashed line) means the splice costs nothing, 0 that it "
    "is as bad as zeroing the site."
)


def _frontier_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per finished run: arch, size, knob value, L0 (> 0, for the log axis), FVU and fraction of loss recovered (or None)."""
    rows = []
    for r in runs:
        l0 = run_value(r, "l0")
        if r.get("status", "done") != "done" or l0 is None or l0 <= 0 or r.get("dict_size") is None or finite(r.get("knob_value")) is None:
            continue
        rows.append(
            {
                "arch": str(r.get("arch")),
                "dict_size": r["dict_size"],
                "knob_value": float(r["knob_value"]),
                "l0": l0,
                "fvu": run_value(r, "fvu"),
                "ce": run_value(r, "ce_loss_recovered"),
            }
        )
    return rows


def _spread(values: Sequence[float]) -> str:
    """One number, or 'low–high' when the values differ."""
    lo, hi = min(values), max(values)
    return f"{lo:.4g}" if math.isclose(lo, hi, rel_tol=1e-6, abs_tol=1e-12) else f"{lo:.4g}–{hi:.4g}"


def ce_sentence(runs: list[dict[str, Any]]) -> str:
    """The clean and zero-ablated next-token losses the fraction recovered is measured between, in one sentence (or '')."""
    clean = [v for r in runs if (v := run_value(r, "ce_clean")) is not None]
    zero = [v for r in runs if (v := run_value(r, "ce_zero")) is not None]
    if not clean or not zero:
        return ""
    tokens = [v for r in runs if (v := run_value(r, "ce_eval_tokens")) is not None]
    lo, hi = (f"{round(t):,}" for t in (min(tokens or [0]), max(tokens or [0])))
    on = f" on {lo if lo == hi else lo + '–' + hi} evaluation tokens" if tokens else ""
    return f" Next-token cross-entropy{on}: clean model {_spread(clean)} nats, site zero-ablated {_spread(zero)} nats."


def _log_span(values: Sequence[float]) -> float:
    return math.log10(max(values) / min(values)) if values else 0.0


def _annotate_knob(ax: Any, points: Sequence[tuple[float, float, float]], symbol: str, *, above: bool, gap: float) -> None:
    """Write each point's knob value a (x, y, a) to its left, above or below the line, leaving out points closer than
    `gap` decades of x to the last one written (so that crowded labels do not overprint)."""
    last = None
    for x, y, a in points:
        if last is not None and math.log10(x / last) < gap:
            continue
        ax.annotate(
            fmt_knob(a) if last is not None else f"{symbol} = {fmt_knob(a)}",
            (x, y),
            xytext=(-5, 5 if above else -6),
            textcoords="offset points",
            ha="right",
            va="bottom" if above else "top",
            fontsize=7,
            color="#333333",
            bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.7},
        )
        last = x


def _series_label(arch: str, size: int, many_archs: bool) -> str:
    """'512 latents', or 'relu · 512 latents' when the sweep has several architectures ('$' escaped from mathtext)."""
    return f"{arch.replace('$', chr(92) + '$')} · {size} latents" if many_archs else f"{size} latents"


def sparsity_frontier(runs: list[dict[str, Any]], *, knob: ArchSpec) -> FigureBlock:
    """FVU vs L0 (log x), one line per dictionary size across the knob's values; with CE metrics also fraction of loss
    recovered vs L0."""
    title = "Sparsity and reconstruction"
    rows = _frontier_rows(runs)
    keys = ("arch", "dict_size", "knob_value")
    l0, fvu, ce = (mean_by(rows, keys, v) for v in ("l0", "fvu", "ce"))
    ce = {k: v for k, v in ce.items() if k in l0}
    if not (set(l0) & set(fvu)):
        return _skip(
            "sparsity",
            title,
            _caption(FRONTIER_CAPTION, knob, left="y: "),
            "No finished run has both an L0 above zero and an FVU: skipped.",
        )
    series = sorted({k[:2] for k in l0 if k in fvu or k in ce}, key=lambda s: (s[1], s[0]))
    many_archs = len({s[0] for s in series}) > 1
    fig = Figure(figsize=(12.0, 4.4) if ce else (8.2, 4.4), layout="constrained")
    axes = list(np.atleast_1d(fig.subplots(1, 2 if ce else 1)))
    panels = [(axes[0], fvu)] + ([(axes[1], ce)] if ce else [])
    labelled = max(series, key=lambda s: (_log_span([v for k, v in l0.items() if k[:2] == s]), s[1]))
    for color, marker, s in zip(series_colors(len(series)), MARKERS * 10, series, strict=False):
        for ax, values in panels:
            pts = sorted((l0[(*s, a)], values[(*s, a)], a) for (ar, m, a) in values if (ar, m) == s)
            if pts:
                ax.plot(
                    [p[0] for p in pts], [p[1] for p in pts], marker=marker, ms=5, lw=1.6, color=color, label=_series_label(*s, many_archs)
                )
                if s == labelled:
                    gap = max(0.08, 0.08 * _log_span(list(l0.values())))  # about 8% of the axis
                    _annotate_knob(ax, pts, knob.knob_symbol, above=values is ce, gap=gap)
                    ax.margins(x=0.1)  # room for the leftmost label
    for ax, values in panels:
        ax.set_xscale("log")
        _plain_log_labels(ax.xaxis, [l0[k] for k in values])
        ax.set_xlabel("L0 (active latents per sample, log axis)")
        ax.grid(alpha=0.3, which="both")
    _fvu_axis(axes[0], list(fvu.values()))
    if ce:
        _ce_axis(axes[1], list(ce.values()))
    _figure_legend(fig, axes, "dictionary size")
    caption = _caption(FRONTIER_CAPTION, knob, left="Left: " if ce else "y: ") + (CE_CAPTION + ce_sentence(runs) if ce else "")
    block_title = (
        "FVU and fraction of next-token loss recovered against L0" if ce else "FVU against L0: the sparsity–reconstruction frontier"
    )
    return FigureBlock(key="sparsity", title=block_title, caption=caption, png=_to_data_uri(fig))


def _fvu_axis(ax: Any, values: list[float]) -> None:
    if wants_log(values):
        ax.set_yscale("log")
        _plain_log_labels(ax.yaxis, values)
    else:
        ax.set_ylim(bottom=min(0.0, min(values)))
    ax.set_ylabel("FVU (fraction of variance unexplained)")
    ax.set_title("Reconstruction error against sparsity")


def _ce_axis(ax: Any, values: list[float]) -> None:
    lo, hi = min(values), max(1.0, max(values))
    pad = max(0.02, 0.06 * (hi - lo))
    ax.axhline(1.0, color="#777777", ls="--", lw=1.2, label="clean model (1)")
    if lo < 0.1:
        ax.axhline(0.0, color="#D55E00", ls=":", lw=1.4, label="site zero-ablated (0)")
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_ylabel("fraction of next-token loss recovered")
    ax.set_title("Downstream loss with the SAE spliced in")


# -- 8. feature density ----------------------------------------------------------------------------

DENSITY_CAPTION = (
    "How often each latent fires on the evaluation samples (the fraction of samples it is active on, log axis): one "
    "panel per dictionary size, one line per {name}, seeds pooled; the height is the fraction of the "
    "dictionary's latents in each bin of {width:g} decade. Dead latents (never fired) have no place on a log axis, so "
    "the legend counts them instead (per SAE, averaged over seeds). The dashed line marks 10% of samples: latents to "
    "its right count as dense (the run table's dense_fraction); the dotted line, where the axis reaches it, is a latent "
    "that fired once in the evaluation window, the rarest firing that can be measured. A healthy dictionary puts most "
    "latents in one hump between the two lines; a pile at the right means dense latents that fire on nearly "
    "everything, a pile at the dotted line latents that are nearly dead."
)


def feature_density(rates: Sequence[Any], skipped: Sequence[str] = (), *, knob: ArchSpec) -> FigureBlock:
    """Histograms of log firing frequency, a panel per dictionary size and a line per value of the knob
    (`rates`: `latents.LatentRates`)."""
    title = "Feature density"
    note = _skipped_note(len(rates), skipped)
    if not rates:
        why = "No readable latents.safetensors in any finished run." + (f" {note}" if note else "")
        return _skip("density", title, _caption(DENSITY_CAPTION, knob, width=0.1), why)
    groups: dict[tuple[str, int], dict[float, list[Any]]] = defaultdict(lambda: defaultdict(list))
    for r in rates:
        groups[(r.arch, r.dict_size)][r.knob_value].append(r)
    panels = sorted(groups, key=lambda k: (k[1], k[0]))
    many_archs = len({p[0] for p in panels}) > 1
    knob_values = sorted({r.knob_value for r in rates})
    colors = dict(zip(knob_values, series_colors(len(knob_values)), strict=False))
    edges, width = _density_bins(rates)
    ncols = min(len(panels), 3)
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(4.3 * ncols + 0.4, 3.4 * nrows + 0.3), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False)).ravel()
    for ax, key in zip(axes, panels, strict=False):
        _density_panel(ax, groups[key], edges, colors, _series_label(*key, many_archs), knob.knob_symbol)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    for ax in axes[(nrows - 1) * ncols :]:
        ax.set_xlabel("firing frequency (fraction of samples)")
    for ax in axes[::ncols]:
        ax.set_ylabel("fraction of latents")
    live = np.concatenate([r.live_log10_freq for r in rates])
    block_title = "Feature density: how often each latent fires"
    if live.size:
        block_title += f" (median live latent: {100 * 10 ** float(np.median(live)):.2g}% of samples)"
    return FigureBlock(
        key="density", title=block_title, caption=_caption(DENSITY_CAPTION, knob, width=width), png=_to_data_uri(fig), note=note
    )


def _skipped_note(found: int, skipped: Sequence[str]) -> str | None:
    if not skipped:
        return None
    total = found + len(skipped)
    return f"{len(skipped)} of {total} finished runs skipped (latents file missing or unreadable), e.g. {skipped[0]}."


def _density_bins(rates: Sequence[Any]) -> tuple[np.ndarray, float]:
    """Bin edges in log10 frequency from a bin below the rarest live latent (else 'fired once') up to 1, and the bin width."""
    width = 0.1 if min(r.counts.size for r in rates) >= 1000 else 0.2
    lowest = [float(r.live_log10_freq.min()) for r in rates if r.live_log10_freq.size]
    lo = min(lowest) if lowest else math.log10(1.0 / max(r.eval_samples for r in rates))
    n = max(2, math.ceil(-lo / width) + 1)
    return np.linspace(-n * width, 0.0, n + 1), width


def _density_panel(ax: Any, by_value: dict[float, list[Any]], edges: np.ndarray, colors: dict[float, str], title: str, symbol: str) -> None:
    """One size's panel: a step histogram per knob value, dead latents counted in the legend."""
    for a in sorted(by_value):
        group = by_value[a]
        m = group[0].counts.size
        logs = np.concatenate([r.live_log10_freq for r in group])
        hist, _ = np.histogram(logs, bins=edges)
        frac = hist / (m * len(group))
        dead = float(np.mean([r.dead for r in group]))
        dead_text = f"{dead:.0f}" if dead.is_integer() else f"{dead:.1f}"
        label = f"{symbol} = {fmt_knob(a)}: {dead_text} dead ({100 * dead / m:.2g}%)"
        ax.stairs(frac, 10.0**edges, color=colors[a], lw=1.6, label=label)
    ax.axvline(0.1, color="#777777", ls="--", lw=1.1)
    once = 1.0 / max(r.eval_samples for group in by_value.values() for r in group)
    if once >= 10.0 ** edges[0]:
        ax.axvline(once, color="#777777", ls=":", lw=1.1)
    ax.annotate(
        "dense",
        (0.1, 1.0),
        xycoords=("data", "axes fraction"),
        xytext=(3, -3),
        textcoords="offset points",
        va="top",
        fontsize=7,
        color="#555555",
    )
    ax.set_xscale("log")
    ax.set_xlim(10.0 ** edges[0], 1.0)
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(
        fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=2, frameon=False, title="dead = never fired", title_fontsize=7
    )


# -- 9. count curve (saekit count) -----------------------------------------------------------------

COUNT_CAPTION = (
    "Each point is the consensus count at one dictionary size (log₂ axis): the number of features two SAEs of that size, "
    "trained from different init seeds at the same {name}, both learned; the bar spans the counts against SAEs at the "
    "neighbouring values of {symbol} (low–high). Crosses are the seed pair's count at 80% of training. The grey line is "
    "count = size/2: a dictionary on or below it has room for twice the features it counts. The count is read where it "
    "stops growing with size while the dictionary still has that room."
)
FIT_CAPTION = " The dashed curve is the least-squares fit count = N·m/(m + h) over the trained sizes m."


def fitted_counts(fit: dict[str, Any], sizes: Iterable[float]) -> list[float]:
    """The saturating model N·m/(m + h) of `fit` ({"n_features": N, "half_size": h}) at each size m."""
    n, h = float(fit["n_features"]), float(fit["half_size"])
    return [n * m / (m + h) for m in sizes]


def _curve_points(curve: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The curve's dict points with a positive size and a finite count, by size; low and high default to the count."""
    points = []
    for p in curve:
        if not isinstance(p, dict):
            continue
        size, count = finite(p.get("dict_size")), finite(p.get("count"))
        if size is None or size <= 0 or count is None:
            continue
        low, high = finite(p.get("low")), finite(p.get("high"))
        points.append(
            {
                "dict_size": int(size),
                "count": count,
                "low": min(count, low if low is not None else count),
                "high": max(count, high if high is not None else count),
                "count_late": finite(p.get("count_late")),
            }
        )
    return sorted(points, key=lambda p: p["dict_size"])


def _usable_fit(fit: Any) -> dict[str, Any] | None:
    """`fit` when it has a finite N and a finite, non-negative h, else None."""
    if not isinstance(fit, dict):
        return None
    n, h = finite(fit.get("n_features")), finite(fit.get("half_size"))
    return fit if n is not None and h is not None and h >= 0 else None


def _plot_count_curve(ax: Any, points: list[dict[str, Any]], fit: dict[str, Any] | None) -> float:
    """Counts with low–high bars, late counts, the size/2 line and the fit on `ax`; returns the highest count drawn."""
    sizes = [p["dict_size"] for p in points]
    grid = np.geomspace(min(sizes), max(sizes), 100) if len(sizes) > 1 else np.asarray(sizes, dtype=float)
    ax.plot(grid, grid / 2, color="#aaaaaa", lw=1.2, zorder=0, label="count = size/2 (on or below it: room for twice the count)")
    counts = [p["count"] for p in points]
    yerr = [[c - p["low"] for c, p in zip(counts, points, strict=True)], [p["high"] - c for c, p in zip(counts, points, strict=True)]]
    ax.errorbar(sizes, counts, yerr=yerr, fmt="o-", color="#0072B2", ms=6, lw=1.6, capsize=4, label="consensus count (bar: low–high)")
    late = [(p["dict_size"], p["count_late"]) for p in points if p["count_late"] is not None]
    if late:
        ax.plot(*zip(*late, strict=True), "x", color="#E69F00", ms=7, mew=1.6, label="count at 80% of training")
    top = max([p["high"] for p in points] + [v for _, v in late])
    if fit is not None and len(sizes) > 1:
        values = fitted_counts(fit, grid)
        rms = finite(fit.get("rms_error"))
        label = f"fit N·m/(m + h): N = {float(fit['n_features']):.4g}, h = {float(fit['half_size']):.4g}"
        ax.plot(grid, values, "--", color="#D55E00", lw=1.5, label=label + (f", rms error {rms:.3g}" if rms is not None else ""))
        top = max(top, max(values))
    return top


def count_curve(
    curve: Sequence[dict[str, Any]], *, fit: dict[str, Any] | None = None, sentence: str | None = None, knob: ArchSpec = RELU
) -> FigureBlock:
    """Consensus count vs dictionary size (log₂ x) with its low–high range, the line count = size/2 and the saturating
    fit when there is one (from the `curve` of `saekit count`'s result)."""
    caption = _caption(COUNT_CAPTION, knob)
    points = _curve_points(curve)
    title = "Feature count against dictionary size" + (f": {sentence}" if sentence else "")
    if not points:
        return _skip("count-curve", title, caption, "No point of the curve has a dictionary size and a count: skipped.")
    fit = _usable_fit(fit)
    fig = Figure(figsize=(8.6, 4.6), layout="constrained")
    ax = fig.subplots()
    top = _plot_count_curve(ax, points, fit)
    sizes = [p["dict_size"] for p in points]
    _size_axis(ax, sizes)
    ax.margins(x=0.08)
    ax.set_ylim(0, max(1.0, 1.15 * top))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("dictionary size m (latents, log₂ axis)")
    ax.set_ylabel("consensus features (count)")
    ax.set_title("Features two seeds agree on, by dictionary size", fontsize=11)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: not labels[i].startswith("consensus count"))
    ax.legend([handles[i] for i in order], [labels[i] for i in order], fontsize=8, loc="best", frameon=False)
    return FigureBlock(
        key="count-curve", title=title, caption=caption + (FIT_CAPTION if fit and len(sizes) > 1 else ""), png=_to_data_uri(fig)
    )
