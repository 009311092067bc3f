"""The report's heuristics for choosing dictionary size and L1 without ground truth, computed from a sweep.

Sharkey, Braun & Millidge (2022) proposed: (a) dead latents appear once the dictionary is larger than the
number of true features; (b) the reconstruction and sparsity losses, looked at separately, change regime
at the right L1 and size; (c) a dictionary's MMCS with larger dictionaries trained at the same L1 stays
high up to the true size and falls after it. Nothing here reads ground truth.

Sweeps of other architectures vary their own sparsity knob (k, the L0 coefficient) where the report varied
the L1 coefficient: rows hold it as `knob_value`, and `heuristics` says which knob it is.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import numpy as np

from saekit.analysis.consensus import consensus_count, seed_agreement
from saekit.analysis.sweep import Sweep
from saekit.metrics import max_cosines


def dead_table(sweep: Sweep) -> list[dict[str, Any]]:
    """(a) Per run: dead fraction and number of live latents."""
    return [
        {
            "dict_size": r["dict_size"],
            "knob_value": r["knob_value"],
            "seed": r["seed"],
            "dead_fraction": r["dead_fraction"],
            "live_latents": int(round((1 - r["dead_fraction"]) * r["dict_size"])),
        }
        for r in sweep.runs
    ]


def loss_table(sweep: Sweep) -> list[dict[str, Any]]:
    """(b) Per run: the reconstruction term, the sparsity term (before its coefficient) and coefficient x sparsity."""
    return [
        {
            "dict_size": r["dict_size"],
            "knob_value": r["knob_value"],
            "seed": r["seed"],
            "reconstruction_loss": r["metrics"].get("reconstruction_loss"),
            "sparsity_loss": r["metrics"].get("sparsity_loss"),
            "l1_loss": r["metrics"].get("l1_loss"),
            "fvu": r["fvu"],
        }
        for r in sweep.runs
    ]


def _mean_by(rows: list[dict[str, Any]], key: str, value: str) -> dict[Any, float]:
    groups: dict[Any, list[float]] = {}
    for r in rows:
        if r.get(value) is not None:
            groups.setdefault(r[key], []).append(r[value])
    return {k: statistics.fmean(v) for k, v in sorted(groups.items())}


def collapse_points(sweep: Sweep, fvu_threshold: float = 0.5) -> dict[str, Any]:
    """(b) For each size, the knob value (L1) at which reconstruction collapses: where the FVU (mean over seeds) first
    crosses `fvu_threshold` going up the grid, interpolated linearly in log knob value between grid values; then a
    least-squares fit knob_collapse = prefactor * dict_size**exponent on log-log axes (the report's "clean power law")."""
    points = []
    for size in sweep.dict_sizes:
        fvu_by_value = _mean_by(sweep.select(dict_size=size), "knob_value", "fvu")
        values = list(fvu_by_value)
        for lo, hi in zip(values, values[1:]):
            f_lo, f_hi = fvu_by_value[lo], fvu_by_value[hi]
            if f_lo < fvu_threshold <= f_hi and lo > 0:
                frac = (fvu_threshold - f_lo) / (f_hi - f_lo)
                points.append({"dict_size": size, "knob_collapse": math.exp(math.log(lo) + frac * (math.log(hi) - math.log(lo)))})
                break
    return {"points": points, "power_law": power_law_fit([p["dict_size"] for p in points], [p["knob_collapse"] for p in points])}


def power_law_fit(x: list[float], y: list[float]) -> dict[str, float] | None:
    """y = prefactor * x**exponent by least squares on logs; None with fewer than two points."""
    if len(x) < 2 or len(set(x)) < 2:
        return None
    lx, ly = np.log(np.asarray(x, dtype=float)), np.log(np.asarray(y, dtype=float))
    exponent, intercept = np.polyfit(lx, ly, 1)
    pred = intercept + exponent * lx
    ss_res, ss_tot = float(((ly - pred) ** 2).sum()), float(((ly - ly.mean()) ** 2).sum())
    return {"exponent": float(exponent), "prefactor": float(math.exp(intercept)), "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0}


def cross_size_table(sweep: Sweep, match_threshold: float = 0.9) -> list[dict[str, Any]]:
    """(c) For each knob value (L1) and each pair of sizes m < M: the MMCS of the smaller dictionary's live latents
    with the larger one (mean over its live latents of the best cosine), and the fraction matched at >= 0.9.
    Uses the lowest seed of each (size, knob value)."""
    rows = []
    for value in sweep.knob_values:
        by_size = {r["dict_size"]: r for r in reversed(sweep.select(knob_value=value))}  # lowest seed wins
        sizes = sorted(by_size)
        for i, small in enumerate(sizes):
            a = sweep.live_directions(by_size[small])
            for large in sizes[i + 1 :]:
                b = sweep.live_directions(by_size[large])
                if a.shape[0] == 0 or b.shape[0] == 0:
                    continue
                best = max_cosines(b, a)
                rows.append(
                    {
                        "dict_size": small,
                        "larger_size": large,
                        "knob_value": value,
                        "mmcs": best.mean().item(),
                        "matched_fraction": (best >= match_threshold).double().mean().item(),
                    }
                )
    return rows


def consensus_table(sweep: Sweep, threshold: float = 0.9) -> list[dict[str, Any]]:
    """Seed consensus for every (size, knob value) trained with at least two init seeds (the two lowest are used)."""
    rows = []
    for size in sweep.dict_sizes:
        for value in sweep.knob_values:
            runs = sweep.select(dict_size=size, knob_value=value)
            if len(runs) < 2:
                continue
            a, b = sweep.live_directions(runs[0]), sweep.live_directions(runs[1])
            a_late, b_late = sweep.live_directions(runs[0], late=True), sweep.live_directions(runs[1], late=True)
            rows.append(
                {
                    "dict_size": size,
                    "knob_value": value,
                    "seeds": [runs[0]["seed"], runs[1]["seed"]],
                    "count": consensus_count(a, b, threshold),
                    "count_late": None if a_late is None or b_late is None else consensus_count(a_late, b_late, threshold),
                    "agreement": seed_agreement(a, b),
                    "live": [a.shape[0], b.shape[0]],
                }
            )
    return rows


def heuristics(sweep: Sweep) -> dict[str, Any]:
    """Everything the report page and `estimate` read, in the schema saekit.report expects."""
    return {
        "knob": sweep.knob,
        "dict_sizes": sweep.dict_sizes,
        "knob_values": sweep.knob_values,
        "dead": dead_table(sweep),
        "loss_terms": loss_table(sweep),
        "collapse": collapse_points(sweep),
        "cross_size": cross_size_table(sweep),
        "consensus": consensus_table(sweep),
    }
