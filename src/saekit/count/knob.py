"""The sparsity knob in the feature-count search: the probe grid, the choice of value from L0 and FVU, its
neighbours, and how a value carries over to another dictionary size.

The probes choose by the trade-off FVU + L0/d: the fraction of variance left unexplained plus the fraction of the
data's dimensions a sample uses, among the values whose reconstruction has not collapsed (FVU at most
COLLAPSED_FVU). It is large where codes are dense and where reconstruction fails, and smallest between the two,
where it is flat: the sparsest value within NEAR_BEST of its minimum is taken;
on the report's toy data the value it picks is the one whose dictionaries recover the true features best. The L0
of that choice is then the search's target at every size: the knob is moved so that L0 stays there, since the
number of features a sample holds does not change with the dictionary that reads it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from saekit.archspec import ARCH_SPECS, ArchSpec

DEFAULTS_SIZE = 1024  # the architectures' default knob values were tuned on 1024 latents (configs/toy.yaml)
PROBE_STEPS = range(-4, 4)  # a penalty probe grid: the default x 2^j; k: powers of two
COLLAPSED_FVU = 0.5  # a probe explaining less than half the variance has lost its reconstruction
NEAR_BEST = 0.1  # the trade-off's minimum is flat: of the values within 10% of it, the sparsest is chosen
PENALTY_STEP = 2.0  # neighbouring penalty values differ by this factor
K_STEP = 1.5  # neighbouring k values differ by about this factor


def _round(value: float) -> float:
    """A penalty value to 4 significant figures: the values the search trains, stores and reads back are these."""
    return float(f"{value:.4g}")


def size_power(arch: str, l1_reduction: str = "mean") -> int:
    """How the knob's value that gives the same per-latent penalty grows with size m: the ReLU SAE's L1 averaged over
    latents (the report's convention) penalises each latent by l1/m, so its value goes as m^1; every other knob
    (a sum over latents, k, an L0 coefficient) does not depend on m."""
    return 1 if arch == "relu" and l1_reduction == "mean" else 0


def value_at_size(spec: ArchSpec, value: float, power: int, from_size: int, to_size: int) -> float:
    """A knob value chosen at `from_size` carried to `to_size` (k unchanged, a penalty scaled by (to/from)^power)."""
    if spec.integer_knob or power == 0:
        return value
    return _round(value * (to_size / from_size) ** power)


def default_value(spec: ArchSpec, dict_size: int, power: int, scale: float) -> float:
    """The architecture's default knob value at `dict_size`, for data `scale` times the toy data's scale."""
    value = spec.scaled_defaults(scale).get(spec.knob, spec.defaults[spec.knob])
    return value_at_size(spec, float(value), power, DEFAULTS_SIZE, dict_size)


def probe_grid(spec: ArchSpec, dict_size: int, d: int, centre: float) -> list[float]:
    """The first probes: for k, powers of two from 2 to min(d, dict_size / 2); for a penalty, centre x 2^j over
    PROBE_STEPS (a range of 128x)."""
    if spec.integer_knob:
        top = max(2, min(d, dict_size // 2))
        return [float(2**j) for j in range(1, int(math.log2(top)) + 1)]
    return [_round(centre * PENALTY_STEP**j) for j in PROBE_STEPS]


def extend_grid(spec: ArchSpec, values: Sequence[float], best: float, dict_size: int) -> list[float]:
    """More probes past the edge of the grid where the best value lies (empty when it lies inside, or k can go no
    further): four more penalty values beyond it, or for k the next powers of two up to dict_size / 2."""
    ordered = sorted(values)
    if best not in (ordered[0], ordered[-1]) or len(ordered) < 2:
        return []
    if spec.integer_knob:
        if best == ordered[0]:
            return [1.0] if ordered[0] > 1 else []
        nxt = [ordered[-1] * 2**j for j in range(1, 3)]
        return [float(v) for v in nxt if v <= dict_size // 2]
    sign = -1 if best == ordered[0] else 1
    return [_round(best * PENALTY_STEP ** (sign * j)) for j in range(1, 5)]


def tradeoff(row: dict[str, Any], d: int) -> float:
    """FVU + L0 / d of a finished run's metrics (inf when either is missing or not finite)."""
    fvu, l0 = row.get("fvu"), row.get("l0")
    if fvu is None or l0 is None or not math.isfinite(fvu) or not math.isfinite(l0):
        return math.inf
    return float(fvu) + float(l0) / d


def _by_value(rows: Sequence[dict[str, Any]], knob: str, key: Any) -> dict[float, float]:
    """key(row) averaged over the rows (seeds) of each knob value, for values whose rows are all finite."""
    by_value: dict[float, list[float]] = {}
    for row in rows:
        by_value.setdefault(float(row[knob]), []).append(key(row))
    return {v: sum(x) / len(x) for v, x in by_value.items() if all(math.isfinite(y) for y in x)}


def best_value(rows: Sequence[dict[str, Any]], knob: str, d: int) -> float | None:
    """The sparsest knob value (largest penalty, smallest k) whose trade-off is within NEAR_BEST of the lowest, among
    those whose mean FVU is at most COLLAPSED_FVU (all of them when none is). None when no row has finite metrics."""
    scores = _by_value(rows, knob, lambda r: tradeoff(r, d))
    if not scores:
        return None
    fvu = _by_value(rows, knob, lambda r: float(r["fvu"]))
    healthy = {v: x for v, x in scores.items() if fvu.get(v, math.inf) <= COLLAPSED_FVU} or scores
    lowest = min(healthy.values())
    near = [v for v, x in healthy.items() if x <= lowest * (1 + NEAR_BEST)]
    return min(near) if ARCH_SPECS[rows[0]["arch"]].integer_knob else max(near)


def mean_l0(rows: Sequence[dict[str, Any]], knob: str, value: float) -> float | None:
    """The mean L0 of the rows trained at `value` (None if there are none)."""
    return _by_value([r for r in rows if float(r[knob]) == value], knob, lambda r: float(r["l0"])).get(value)


def _positive_l0(rows: Sequence[dict[str, Any]], knob: str) -> dict[float, float]:
    """Mean L0 by knob value, for positive values with a positive L0 (what log-log fits can use)."""
    return {v: x for v, x in _by_value(rows, knob, lambda r: float(r["l0"])).items() if x > 0 and v > 0}


def l0_slope(rows: Sequence[dict[str, Any]], knob: str) -> float | None:
    """d log L0 / d log value, least squares over the values with L0 > 0 (None with fewer than two)."""
    l0 = _positive_l0(rows, knob)
    if len(l0) < 2:
        return None
    return statistics.linear_regression([math.log(v) for v in l0], [math.log(x) for x in l0.values()]).slope


def value_for_l0(rows: Sequence[dict[str, Any]], knob: str, target: float, integer: bool, slope: float | None = None) -> float | None:
    """The knob value at which L0 would be `target`, from the rows of one size: for k, the target itself; for a
    penalty, interpolated in log-log between the two values whose mean L0 bracket the target, or extrapolated past
    the grid's edge along its end slope (with one value only, along `slope`, e.g. the probes'), at most
    PENALTY_STEP^2 beyond it. None when it cannot be told."""
    if integer:
        return float(max(1, int(round(target))))
    l0 = _positive_l0(rows, knob)
    if not l0 or target <= 0:
        return None
    pts = sorted((math.log(v), math.log(x)) for v, x in l0.items())
    goal = math.log(target)
    if len(pts) == 1:
        if slope is None or slope >= 0:
            return None
        pts = [pts[0], (pts[0][0] + 1.0, pts[0][1] + slope)]
    pairs = list(zip(pts, pts[1:]))
    chosen = next(((a, b) for a, b in pairs if min(a[1], b[1]) <= goal <= max(a[1], b[1]) and a[1] != b[1]), None)
    if chosen is None:  # outside the grid: the end nearer the target in L0, along that end's slope
        chosen = pairs[0] if goal > max(p[1] for p in pts[:2]) else pairs[-1]
    (v0, y0), (v1, y1) = chosen
    fitted = (y1 - y0) / (v1 - v0) if v1 != v0 else 0.0
    if fitted >= 0:  # L0 did not fall with the penalty (noise): stay at the nearer value
        return float(math.exp(v0 if abs(y0 - goal) < abs(y1 - goal) else v1))
    guess = v0 + (goal - y0) / fitted
    edge = math.log(PENALTY_STEP) * 2
    guess = min(max(guess, pts[0][0] - edge), pts[-1][0] + edge)
    return _round(math.exp(guess))


def neighbours(spec: ArchSpec, value: float, dict_size: int) -> tuple[float, float]:
    """The values below and above `value` the search trains beside it (distinct from it where the knob allows)."""
    if spec.integer_knob:
        k = int(round(value))
        lower = max(1, min(k - 1, int(round(k / K_STEP))))
        upper = min(max(k + 1, int(round(k * K_STEP))), max(k + 1, dict_size - 1))
        return float(lower), float(upper)
    return _round(value / PENALTY_STEP), _round(value * PENALTY_STEP)
