"""The feature-count curve: the seed-consensus count against dictionary size, the model fitted to it, and what it
says in one sentence.

A point holds, at one dictionary size m, the count of features two init seeds both learned (the median over the
sparsity knob's value and its neighbours) and its range. A layer with N features gives counts that grow with m while
the dictionary has no room to tell them apart, and level off near N once it has (m >= 2N). So the curve is
*saturated* when the last two sizes with room agree within a tolerance, and otherwise *still growing*, as a power of
size m^beta fitted on its last two points: a lower bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

TOLERANCE = 0.15  # counts within 15% of each other agree (as the estimate's stability checks)


@dataclass(frozen=True)
class CurvePoint:
    """The consensus count at one dictionary size."""

    dict_size: int
    count: int  # median over the knob's value and its neighbours
    low: int
    high: int
    knob_value: float  # the knob's value the count was centred on
    count_late: int | None = None  # the centre pair's count at 80% of training
    seconds: float = 0.0  # what training this size took
    n_saes: int = 2  # SAEs trained at this size: the seed pair, plus one per neighbouring knob value

    @property
    def roomy(self) -> bool:
        """The dictionary has at least twice as many latents as the features it counts."""
        return 0 < 2 * self.count <= self.dict_size


def saturating_fit(sizes: list[int], counts: list[int]) -> dict[str, float] | None:
    """Least-squares fit of count = N · m / (m + h) (zero at m = 0, N as m grows); None with fewer than 2 points.
    h is searched on a log grid from m_min/100 to 100·m_max, N solved in closed form for each h."""
    m, c = np.asarray(sizes, dtype=float), np.asarray(counts, dtype=float)
    if len(m) < 2 or not c.any():
        return None
    best = None
    for h in np.geomspace(m.min() / 100, 100 * m.max(), 400):
        shape = m / (m + h)
        n = float(shape @ c / (shape @ shape))
        residual = float(((n * shape - c) ** 2).sum())
        if best is None or residual < best[0]:
            best = (residual, n, float(h))
    residual, n, h = best
    return {"n_features": n, "half_size": h, "rms_error": math.sqrt(residual / len(m))}


def growth_exponent(smaller: CurvePoint, larger: CurvePoint) -> float | None:
    """beta in count ∝ m^beta between two points (None when either count is 0)."""
    if smaller.count <= 0 or larger.count <= 0 or larger.dict_size == smaller.dict_size:
        return None
    return math.log(larger.count / smaller.count) / math.log(larger.dict_size / smaller.dict_size)


def saturated(points: list[CurvePoint], tolerance: float = TOLERANCE) -> bool:
    """The last two sizes both had room for their counts, and the counts agree within `tolerance`."""
    if len(points) < 2:
        return False
    a, b = points[-2], points[-1]
    return a.roomy and b.roomy and abs(b.count - a.count) <= tolerance * max(b.count, a.count)


def _settled_pair(a: CurvePoint, b: CurvePoint, tolerance: float) -> tuple[bool, list[str]]:
    """Both sizes' counts settled (`point_settled`), and at least one of them checked at neighbouring knob values."""
    reasons = point_settled(a, tolerance)[1] + point_settled(b, tolerance)[1]
    if a.n_saes <= 2 and b.n_saes <= 2:
        reasons.append(f"neither {a.dict_size} nor {b.dict_size} latents was trained at neighbouring knob values")
    return not reasons, reasons


def point_settled(point: CurvePoint, tolerance: float = TOLERANCE) -> tuple[bool, list[str]]:
    """Whether one size's count holds across the knob's neighbouring values and since 80% of training, and why not."""
    reasons = []
    if point.count <= 0:
        reasons.append(f"at {point.dict_size} latents the two seeds share no feature")
    elif point.high - point.low > 2 * tolerance * point.count:
        reasons.append(f"at {point.dict_size} latents neighbouring knob values give {point.low}-{point.high}")
    if point.count_late is not None and abs(point.count_late - point.count) > tolerance * max(point.count, 1):
        reasons.append(f"at {point.dict_size} latents the count moved from {point.count_late} to {point.count} in the last 20% of training")
    return not reasons, reasons


def describe_curve(points: list[CurvePoint], tolerance: float = TOLERANCE) -> dict[str, Any]:
    """{state, n_features, low, high, dict_size, fit, beta, next_size, next_seconds, sentence} for the curve so far.

    state is "saturated" (the last two sizes with room agree, and their counts are settled), "growing" (a lower
    bound), "falling" (the last size counted fewer: the most counted is a lower bound) or "empty" (no size yet)."""
    if not points:
        return {
            "state": "empty",
            "n_features": None,
            "low": None,
            "high": None,
            "dict_size": None,
            "fit": None,
            "beta": None,
            "next_size": None,
            "next_seconds": None,
            "sentence": "no dictionary trained yet",
        }
    last = points[-1]
    fit = saturating_fit([p.dict_size for p in points], [p.count for p in points])
    settled, reasons = _settled_pair(points[-2], last, tolerance) if len(points) >= 2 else point_settled(last, tolerance)
    if saturated(points, tolerance) and settled:
        a, b = points[-2], points[-1]
        low, high = min(a.low, b.low), max(a.high, b.high)
        return {
            "state": "saturated",
            "n_features": b.count,
            "low": low,
            "high": high,
            "dict_size": b.dict_size,
            "fit": fit,
            "beta": growth_exponent(a, b),
            "next_size": None,
            "next_seconds": None,
            "reasons": [],
            "sentence": f"saturated at {b.count} features ({low}-{high}): the counts at {a.dict_size} and {b.dict_size} latents agree",
        }
    beta = growth_exponent(points[-2], last) if len(points) >= 2 else None
    if beta is not None and last.count < (1 - tolerance) * points[-2].count:
        return _falling(points, fit, beta, reasons)
    next_size, next_seconds = 2 * last.dict_size, 2 * last.seconds
    if beta is None:
        shape = "not yet a curve (one size)" if len(points) < 2 else "no count yet"
    else:
        shape = f"still growing as m^{beta:.2f}" if beta > 0 else f"level (m^{beta:.2f}) but not settled"
    if not last.roomy:
        reasons.insert(0, f"{last.dict_size} latents had no room for twice the {last.count} features counted")
    elif len(points) >= 2 and not saturated(points, tolerance):
        reasons.insert(0, f"the count moved from {points[-2].count} at {points[-2].dict_size} latents to {last.count}")
    return {
        "state": "growing",
        "n_features": last.count,
        "low": last.low,
        "high": last.high,
        "dict_size": last.dict_size,
        "fit": fit,
        "beta": beta,
        "next_size": next_size,
        "next_seconds": next_seconds,
        "reasons": reasons,
        "sentence": f"{shape} at m = {last.dict_size}: {last.count} features is a lower bound; "
        f"train {next_size} latents next, about {format_seconds(next_seconds)} on this machine",
    }


def _falling(points: list[CurvePoint], fit: dict[str, float] | None, beta: float, reasons: list[str]) -> dict[str, Any]:
    """The verdict when the count fell at the last size: the seeds of the larger dictionary share fewer features
    (they are further from converged, or split features differently), so the most ever counted is the lower bound."""
    top = max(points, key=lambda p: p.count)
    last = points[-1]
    reasons.insert(0, f"the count fell from {points[-2].count} at {points[-2].dict_size} latents to {last.count} at {last.dict_size}")
    return {
        "state": "falling",
        "n_features": top.count,
        "low": top.low,
        "high": top.high,
        "dict_size": top.dict_size,
        "fit": fit,
        "beta": beta,
        "next_size": None,
        "next_seconds": None,
        "reasons": reasons,
        "sentence": f"not settled: the count falls with size (m^{beta:.2f} at m = {last.dict_size}); the most counted, "
        f"{top.count} features at {top.dict_size} latents, is a lower bound; train longer (train.samples) before going larger",
    }


def format_seconds(seconds: float) -> str:
    """'45 s', '12 min', '3.5 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
