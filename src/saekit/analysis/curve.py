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
from dataclasses import dataclass, field
from typing import Any

import numpy as np

TOLERANCE = 0.15  # counts within 15% of each other agree (as the estimate's stability checks)
# A pair's count may move at most this much in its last 20% of training for the size to count as trained to the end.
# On features of different scales (d = 80, G = 200, magnitudes 0.995^i) the 1280-latent pair moved 172 -> 180 (4.4%)
# on 1M samples and counted all 200 on 2M; SmolLM2's 1M-sample pairs moved 8-16%, and rose a further 23% on 2M.
LEARNING_TOLERANCE = 0.03


@dataclass(frozen=True)
class PointMetric:
    """A held-out metric kept at each size: its run-store key, its column heading, and how the search's log shows it
    (None: not logged)."""

    key: str
    label: str
    log: str | None = None


# Held-out metrics of each size's centre pair, averaged over the pair (those its rows have): reconstruction, sparsity,
# dead latents and, on a causal language model's activations, the downstream loss.
POINT_METRICS: tuple[PointMetric, ...] = (
    PointMetric("fvu", "FVU", "FVU {:.3f}"),
    PointMetric("l0", "L0", "L0 {:.1f}"),
    PointMetric("dead_fraction", "dead fraction", "{:.1%} dead"),
    PointMetric("mmcs", "MMCS"),
    PointMetric("ce_loss_recovered", "CE loss recovered", "CE recovered {:.3f}"),
    PointMetric("kl_div", "KL (nats)", "KL {:.3f}"),
)


@dataclass(frozen=True)
class CurvePoint:
    """The consensus count at one dictionary size."""

    dict_size: int
    count: int  # median over the knob's value and its neighbours
    low: int
    high: int
    knob_value: float  # the knob's value the count was centred on
    count_late: int | None = None  # the centre pair's count at 80% of training (LATE_FRACTION)
    seconds: float = 0.0  # what training this size took
    n_saes: int = 2  # SAEs trained at this size: the seed pair, plus one per neighbouring knob value
    most_value: float | None = None  # the knob value whose pair shared the most features (the centre on ties)
    centre: int | None = None  # the centre pair's count (count_late is its count at 80% of training)
    samples: int = 0  # training samples of each SAE at this size
    metrics: dict[str, float] = field(default_factory=dict)  # the centre pair's mean of each POINT_METRICS key it has

    @property
    def roomy(self) -> bool:
        """The dictionary has at least twice as many latents as the features it counts."""
        return 0 < 2 * self.count <= self.dict_size

    @property
    def final(self) -> int:
        """The centre pair's count at the end of training (the count where the centre is not kept)."""
        return self.count if self.centre is None else self.centre

    @property
    def still_learning(self) -> bool:
        """The centre pair's count moved more than LEARNING_TOLERANCE in the last 20% of training."""
        return self.count_late is not None and abs(self.final - self.count_late) > LEARNING_TOLERANCE * max(self.final, 1)


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
    if point.count_late is not None and abs(point.count_late - point.final) > tolerance * max(point.final, 1):
        reasons.append(f"at {point.dict_size} latents the count moved from {point.count_late} to {point.final} in the last 20% of training")
    return not reasons, reasons


def verdict(
    state: str,
    sentence: str,
    point: CurvePoint | None = None,
    low: int | None = None,
    high: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A verdict dict: the count, range and size of `point` (range overridden by low/high), its state and sentence;
    fit, beta, next_size, next_seconds and reasons from `extra` (None or empty when not given)."""
    return {
        "state": state,
        "n_features": None if point is None else point.count,
        "low": low if low is not None else None if point is None else point.low,
        "high": high if high is not None else None if point is None else point.high,
        "dict_size": None if point is None else point.dict_size,
        "fit": extra.get("fit"),
        "beta": extra.get("beta"),
        "next_size": extra.get("next_size"),
        "next_seconds": extra.get("next_seconds"),
        "reasons": extra.get("reasons", []),
        "sentence": sentence,
    }


def next_size_seconds(last: CurvePoint, next_saes: int | None = None) -> float:
    """The guess for training the size after `last`: its time for twice the latents, scaled from its n_saes SAEs to
    `next_saes` (the same number when not given)."""
    return 2 * last.seconds * (next_saes or last.n_saes) / max(last.n_saes, 1)


def describe_curve(points: list[CurvePoint], tolerance: float = TOLERANCE, next_saes: int | None = None) -> dict[str, Any]:
    """{state, n_features, low, high, dict_size, fit, beta, next_size, next_seconds, reasons, sentence} for the curve so far.

    next_seconds is next_size_seconds of the last point, for `next_saes` SAEs.

    state is "saturated" (the last two sizes with room agree, their counts are settled, the last one's also in
    training, and no smaller size counted more), "learning" (saturated but for the last size's count still moving in
    its last 20% of training: a lower bound until that size is trained longer), "growing" (a lower bound), "falling"
    (the last size counted fewer than a smaller one: the most counted is a lower bound) or "empty" (no size yet)."""
    if not points:
        return verdict("empty", "no dictionary trained yet")
    last = points[-1]
    fit = saturating_fit([p.dict_size for p in points], [p.count for p in points])
    settled, reasons = _settled_pair(points[-2], last, tolerance) if len(points) >= 2 else point_settled(last, tolerance)
    beta = growth_exponent(points[-2], last) if len(points) >= 2 else None
    top = max(points, key=lambda p: p.count)
    fell = last.count < (1 - tolerance) * top.count
    if saturated(points, tolerance) and not fell and (settled or last.still_learning):
        a = points[-2]
        low, high = min(a.low, last.low), max(a.high, last.high)
        if last.still_learning:  # the last size is trained longer before anything else is judged
            return _learning(last, low, high, fit=fit, beta=beta)
        sentence = f"saturated at {last.count} features ({low}-{high}): the counts at {a.dict_size} and {last.dict_size} latents agree"
        return verdict("saturated", sentence, last, low, high, fit=fit, beta=beta)
    if fell:
        reasons.insert(0, f"the count fell from {top.count} at {top.dict_size} latents to {last.count} at {last.dict_size}")
        sentence = (
            f"not settled: the count falls with size ({last.count} at m = {last.dict_size}); the most counted, "
            f"{top.count} features at {top.dict_size} latents, is a lower bound; train longer (train.samples) before going larger"
        )
        return verdict("falling", sentence, top, fit=fit, beta=beta, reasons=reasons)
    if beta is None:
        shape = "not yet a curve (one size)" if len(points) < 2 else "no count yet"
    else:
        shape = f"still growing as m^{beta:.2f}" if beta > 0 else f"level (m^{beta:.2f}) but not settled"
    if not last.roomy:
        reasons.insert(0, f"{last.dict_size} latents had no room for twice the {last.count} features counted")
    elif len(points) >= 2 and not saturated(points, tolerance):
        reasons.insert(0, f"the count moved from {points[-2].count} at {points[-2].dict_size} latents to {last.count}")
    next_size, next_seconds = 2 * last.dict_size, next_size_seconds(last, next_saes)
    sentence = (
        f"{shape} at m = {last.dict_size}: {last.count} features is a lower bound; "
        f"train {next_size} latents next, about {format_seconds(next_seconds)} on this machine"
    )
    return verdict("growing", sentence, last, fit=fit, beta=beta, next_size=next_size, next_seconds=next_seconds, reasons=reasons)


def _learning(last: CurvePoint, low: int, high: int, **extra: Any) -> dict[str, Any]:
    """The verdict on a curve that levels off while its last size was still learning at the end of training."""
    moved = f"at {last.dict_size} latents the count moved from {last.count_late} to {last.final} in the last 20% of training"
    sentence = (
        f"levelling off, but still learning: {moved}; {last.count} features is a lower bound; "
        f"train {last.dict_size} latents on twice the samples (train.samples) next, "
        f"about {format_seconds(2 * last.seconds)} on this machine"
    )
    return verdict("learning", sentence, last, low, high, next_size=last.dict_size, next_seconds=2 * last.seconds, reasons=[moved], **extra)


def format_seconds(seconds: float) -> str:
    """'45 s', '12 min', '3.5 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
