"""The feature-count and hyperparameter estimate, from a finished sweep and without ground truth.

The count comes from seed consensus (features two SAEs with different init seeds both learned), read at
the (size, knob value) where the two seeds agree best among the dictionaries with at least twice as many latents
as the features they share. Where two seeds were trained at neighbouring sizes, a count that still grows with
size is reported as a lower bound. The report's own
heuristics are computed alongside and reported as signals that agree or not with that count.
"""

from __future__ import annotations

import statistics
from typing import Any

from saekit.analysis.consensus import consensus_directions
from saekit.analysis.heuristics import heuristics
from saekit.analysis.sweep import Sweep
from saekit.errors import InputError
from saekit.metrics import DEAD_THRESHOLD, mmcs

MATCH_THRESHOLD = 0.9  # cross-size: a dictionary "is contained" in a larger one when 90% of its live latents match
L1_CONVENTION = (
    "; with the L1 averaged over latents (the report's convention) the per-latent penalty is L1/size, so the collapse "
    "point grows with size whatever the feature count: the report's 'clean power law' is this convention, not a count"
)


def _neighbours(values: list[float], value: float) -> list[float]:
    i = values.index(value)
    return values[max(0, i - 1) : i + 2]


def estimate(sweep: Sweep, analysis: dict[str, Any] | None = None, tolerance: float = 0.15) -> dict[str, Any]:
    """{n_features, low, high, dict_size, l1, signals, summary} (DESIGN.md's contract for `saekit estimate`)."""
    h = analysis if analysis is not None else heuristics(sweep)
    consensus = h["consensus"]
    if not consensus:
        raise InputError(
            "estimate needs SAEs trained with two init seeds at the largest sizes (e.g. --set train.seeds=[0,1]); this sweep has none"
        )
    best, near = _counting_point(consensus)
    top, n_features, late = best["dict_size"], int(round(statistics.median(near))), best.get("count_late")
    settled = late is None or abs(late - best["count"]) <= tolerance * max(best["count"], 1)
    roomy_enough = 2 * best["count"] <= best["dict_size"]  # else the largest dictionaries had no room: a lower bound
    growth = _growth(consensus, best, tolerance)
    growing = growth is not None and 2 * growth[0]["count"] <= growth[0]["dict_size"]  # room, yet fewer: a lower bound
    consistent = all(abs(c - n_features) <= tolerance * n_features for c in near)
    stable = settled and roomy_enough and growth is None and consistent and n_features > 0
    low, high = min(near), max(near)
    caveats = _caveats(best, settled, roomy_enough, consistent, sweep.spec.knob_name, tolerance) + _growth_caveat(growth, growing)

    dict_size, value = recommend(sweep, n_features, top)
    knob = sweep.spec.knob_name  # "L1 coefficient α" for relu and gated sweeps, "k" for topk, ...
    signals = [
        {
            "name": "seed consensus",
            "value": n_features,
            "agrees": stable,
            "note": f"at {top} latents and {knob} = {best['knob_value']:g} (seed agreement {best['agreement']:.3f}); "
            f"neighbouring {knob} values give {', '.join(str(c) for c in near)}"
            + ("" if late is None else f"; at 80% of training it was {late}"),
        }
    ]
    signals += _report_signals(sweep, h, n_features, best["knob_value"], tolerance)
    agreeing = [s["name"] for s in signals[1:] if s["agrees"]]
    disagreeing = [s["name"] for s in signals[1:] if s["agrees"] is False]
    trust = (
        f"stable across neighbouring {knob} values and since 80% of training"
        if stable
        else "NOT stable: " + "; ".join(caveats)
    )
    summary = (
        f"About {n_features} features (range {low}-{high}), counted as the features two init seeds both learned "
        f"at {top} latents; {trust}. "
        f"Agreeing: {', '.join(agreeing) or 'none'}. Not agreeing: {', '.join(disagreeing) or 'none'}. "
        f"Recommended SAE: {dict_size} latents at {knob} = {value:g}."
    )
    return {
        "n_features": n_features,
        "low": low,
        "high": high,
        "dict_size": dict_size,
        "l1": value if sweep.knob == "l1" else None,  # DESIGN.md's contract; other knobs under their own key
        sweep.knob: sweep.spec.knob_number(value),
        "knob": sweep.knob,
        "stable": stable,
        "lower_bound": not roomy_enough or growing,
        "seed_agreement": best["agreement"],
        "caveats": caveats,
        "signals": signals,
        "summary": summary,
    }


def _counting_point(consensus: list[dict[str, Any]]) -> tuple[dict[str, Any], list[int]]:
    """The consensus row the count is read at, and the counts at its knob value and its neighbours in the grid.

    Trust only dictionaries with room for every feature they count (at least twice as many latents): smaller ones
    merge features and under-count. Among those, at the largest size that has any, take the knob value whose seeds
    agree best. The count is the median over that knob value and its neighbours, so one odd value cannot move it."""
    roomy = [r for r in consensus if 2 * r["count"] <= r["dict_size"] and r["count"] > 0]
    if roomy:  # the largest size with room: smaller ones agree better but count fewer (no room to tell features apart)
        roomy = [r for r in roomy if r["dict_size"] == max(r["dict_size"] for r in roomy)]
    best = max(roomy or consensus, key=lambda r: (r["agreement"], r["dict_size"]))
    at_top = sorted((r for r in consensus if r["dict_size"] == best["dict_size"]), key=lambda r: r["knob_value"])
    grid = [r["knob_value"] for r in at_top]
    return best, [r["count"] for r in at_top if r["knob_value"] in _neighbours(grid, best["knob_value"])]


def _growth(consensus: list[dict[str, Any]], best: dict[str, Any], tolerance: float) -> tuple[dict, dict] | None:
    """(smaller, larger) consensus rows at the counting knob value whose counts differ by more than `tolerance`: the
    count has not settled with size, or None. The next smaller and the next larger size trained with two seeds are
    compared. Where the smaller had room for its count (at least twice the latents), the features were not there to
    find at that size, so the count is a lower bound; where it had none, the growth may be features squeezed out
    there or splits counted at the larger size, so the count is only unconfirmed."""
    rows = sorted((r for r in consensus if r["knob_value"] == best["knob_value"]), key=lambda r: r["dict_size"])
    i = next(j for j, r in enumerate(rows) if r is best)
    if i > 0 and best["count"] > (1 + tolerance) * rows[i - 1]["count"]:
        return rows[i - 1], best
    if i + 1 < len(rows) and rows[i + 1]["count"] > (1 + tolerance) * best["count"]:
        return best, rows[i + 1]
    return None


def _growth_caveat(growth: tuple[dict, dict] | None, lower_bound: bool) -> list[str]:
    """The clause saying the count still grew with size (a lower bound, or only unconfirmed), or none."""
    if growth is None:
        return []
    smaller, larger = growth
    said = f"it grew from {smaller['count']} at {smaller['dict_size']} latents to {larger['count']} at {larger['dict_size']}"
    if lower_bound:
        return [f"count is a lower bound: {said}, so it has not settled with size; train larger dictionaries"]
    return [f"count not settled with size: {said}; train larger dictionaries to see where it levels off"]


def _caveats(
    best: dict[str, Any], settled: bool, roomy_enough: bool, consistent: bool, knob: str, tolerance: float
) -> list[str]:
    """Why the count is not trusted, one clause each (empty when nothing speaks against it)."""
    caveats = []
    if best["count"] == 0:
        caveats.append("the two seeds share no feature: train longer, or the data has none the SAEs can find")
    if not consistent:
        caveats.append(f"neighbouring {knob} values give counts more than {tolerance:.0%} apart")
    if not roomy_enough:
        caveats.append(
            f"count is a lower bound: even the largest dictionary ({best['dict_size']} latents) had less than twice "
            "the features it counts; train larger ones"
        )
    if not settled:
        caveats.append(f"the count moved more than {tolerance:.0%} since 80% of training")
    return caveats


def recommend(sweep: Sweep, n_features: int, top: int) -> tuple[int, float]:
    """The smallest trained size of at least twice the estimated count (overcomplete dictionaries recover
    features best: the report's MMCS was near 1 from about twice the true count), and at that size the knob
    value whose dictionaries best recover the consensus features found at the counting size `top` (the features
    both seeds learned there, per knob value: our stand-in for the unknown truth): the highest MMCS against them,
    averaged over seeds and over the knob values whose features are compared (never a dictionary against
    features it helped find)."""
    sizes = sweep.dict_sizes
    dict_size = next((s for s in sizes if s >= 2 * n_features), sizes[-1])
    features = {}
    for value in sweep.knob_values:
        seeds = sweep.select(dict_size=top, knob_value=value)
        if len(seeds) >= 2:
            features[value] = consensus_directions(sweep.live_directions(seeds[0]), sweep.live_directions(seeds[1]))
    score = {}
    for value in sweep.knob_values:
        mmcs_values = [
            mmcs(sweep.live_directions(run), found)
            for run in sweep.select(dict_size=dict_size, knob_value=value)
            for other, found in features.items()
            if found.shape[0] > 0 and sweep.live_directions(run).shape[0] > 0 and not (dict_size == top and other == value)
        ]
        if mmcs_values:
            score[value] = statistics.fmean(mmcs_values)
    if not score:
        return dict_size, sweep.select(dict_size=dict_size)[0]["knob_value"]
    return dict_size, max(score, key=lambda a: (score[a], -a))


def _dead_signals(h: dict[str, Any], n: int, value: float, tolerance: float, knob: str) -> list[dict[str, Any]]:
    """Report heuristic (a), the first size with more than 5% dead latents, and the live latents at the largest size."""
    dead = {}
    for r in h["dead"]:
        if r["knob_value"] == value:
            dead.setdefault(r["dict_size"], []).append(r["dead_fraction"])
    dead_mean = {s: statistics.fmean(v) for s, v in sorted(dead.items())}
    first_dead = next((s for s, f in dead_mean.items() if f > DEAD_THRESHOLD), None)
    signals = [
        {
            "name": "dead latents (report heuristic a)",
            "value": first_dead,
            "agrees": None if first_dead is None else n <= first_dead,
            "note": f"no size had more than 5% dead latents at this {knob}"
            if first_dead is None
            else f"dead latents (>5%) first appear at {first_dead} latents; the report expects this once the size exceeds the count",
        }
    ]
    live_top = [r["live_latents"] for r in h["dead"] if r["knob_value"] == value and r["dict_size"] == max(dead_mean, default=0)]
    if live_top:
        live = int(statistics.fmean(live_top))
        signals.append(
            {
                "name": "live latents at the largest size",
                "value": live,
                "agrees": abs(live - n) <= tolerance * n,
                "note": "counts every latent that fires, copies and splits included: an upper bound without resampling",
            }
        )
    return signals


def _containment_signal(h: dict[str, Any], n: int, knob: str) -> dict[str, Any] | None:
    """Report heuristic (c): at each knob value, the largest size whose live latents are >= 90% found in every
    larger dictionary; the largest over knob values. None without cross-size rows."""
    contained: dict[float, dict[int, list[float]]] = {}
    for r in h["cross_size"]:
        contained.setdefault(r["knob_value"], {}).setdefault(r["dict_size"], []).append(r["matched_fraction"])
    if not contained:
        return None
    per_value = {a: max((s for s, v in sizes.items() if min(v) >= MATCH_THRESHOLD), default=None) for a, sizes in contained.items()}
    found = {a: s for a, s in per_value.items() if s is not None}
    at_value, largest = max(found.items(), key=lambda kv: (kv[1], -kv[0])) if found else (None, None)
    return {
        "name": "MMCS with larger dictionaries (report heuristic c)",
        "value": largest,
        "agrees": None if largest is None else largest <= 2 * n,
        "note": f"no size's live latents were >=90% found in every larger dictionary at any {knob}"
        if largest is None
        else f"at {knob} = {at_value:g}, dictionaries up to {largest} latents are >=90% contained in every larger one "
        "(the report expects this up to about the true count, and lower beyond)",
    }


def _collapse_signal(sweep: Sweep, h: dict[str, Any], knob: str) -> dict[str, Any]:
    """Report heuristic (b): how the knob at which reconstruction collapses scales with size (no verdict on `n`)."""
    law = h["collapse"]["power_law"]
    return {
        "name": "reconstruction collapse (report heuristic b)",
        "value": None if law is None else round(law["exponent"], 3),
        "agrees": None,
        "note": f"no collapse inside the {knob} grid"
        if law is None
        else f"the {knob} at which reconstruction collapses scales as size^{law['exponent']:.2f} (r2 {law['r2']:.2f})"
        + (L1_CONVENTION if sweep.knob == "l1" else ""),
    }


def _report_signals(sweep: Sweep, h: dict[str, Any], n: int, value: float, tolerance: float) -> list[dict[str, Any]]:
    """The report's heuristics, each turned into a statement about the count `n`, read at the knob's `value`."""
    knob = sweep.spec.knob_name
    signals = _dead_signals(h, n, value, tolerance, knob)
    containment = _containment_signal(h, n, knob)
    if containment is not None:
        signals.append(containment)
    signals.append(_collapse_signal(sweep, h, knob))
    return signals
