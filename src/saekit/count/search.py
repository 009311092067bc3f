"""`saekit count`: the adaptive feature-count search.

It calibrates the sparsity knob with short probes (OUT/probes), then trains, at doubling dictionary sizes, one
ensemble per size: two init seeds at the chosen knob value and one more seed at each neighbouring value. After each
size it computes the seed-consensus count (`saekit.analysis.curve`) and stops when the curve has saturated (the last
two sizes had room for their counts and agree, across the knob's neighbours and since 80% of training; a size whose
count falls, or at which the curve levels off while the count still moves in training, is first trained longer), or when
the next size would pass the time budget, the memory limit or the largest size. Every SAE lives in OUT's run store,
so a killed search resumes: sizes already trained are read back, and the choices made from them come out the same.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from saekit.analysis.curve import POINT_METRICS, TOLERANCE, CurvePoint, describe_curve, next_size_seconds
from saekit.archspec import ArchSpec
from saekit.atomic import atomic_write_bytes
from saekit.config import Config, RunSpec
from saekit.count.knob import best_value, default_value, extend_grid, l0_slope, mean_l0, neighbours, probe_grid, value_at_size, value_for_l0
from saekit.errors import InputError
from saekit.store import run_value

RESULT_FILE = "count.json"
PROBE_DIR = "probes"
PROBE_SIZE_PER_D = 1  # probes train d latents
PROBE_ROUNDS = 3  # the probe grid is extended past its edge at most this many times
NEIGHBOURS_FROM_FILL = 0.8
MAX_SAMPLE_FACTOR = 8  # a size whose count falls is trained again on 2x, 4x, ... at most 8x cfg.train.samples
MAX_KNOB_MOVE = 2**0.5  # per size, a penalty falls at most this factor below its scaling with size (and never rises above it)
SEEDS = (0, 1)  # the pair at the chosen value; each neighbour trains one more seed, paired with one of these
NEIGHBOUR_SEED = 2


@dataclass(frozen=True)
class SearchSettings:
    """How far and how long the search may go."""

    probe_samples: int  # training samples of each probe (each SAE of a size trains cfg.train.samples)
    start_size: int
    max_size: int
    budget_seconds: float | None = None
    tolerance: float = TOLERANCE


@dataclass
class SearchContext:
    """What every step of the search reads: the config, where it writes, and how to train and report."""

    cfg: Config
    out: Path
    d: int
    spec: ArchSpec
    power: int  # how the knob scales with size (saekit.count.knob.size_power)
    settings: SearchSettings
    train: Callable[[Config, Path, list[RunSpec]], tuple[list[dict[str, Any]], list[str]]]  # run_config on these SAEs
    say: Callable[[str], None]
    fits: Callable[[int, int], bool] = lambda n_members, dict_size: True  # whether an ensemble fits in memory


def run_search(ctx: SearchContext) -> dict[str, Any]:
    """Calibrate, then train size after size until the curve saturates or a limit is reached; returns the result
    (also written to OUT/count.json after every size)."""
    started = time.perf_counter()
    s = ctx.settings
    cal = calibrate(ctx)
    value = value_at_size(ctx.spec, cal.value, ctx.power, cal.size, s.start_size)
    points: list[CurvePoint] = []
    verdict, size, errors, factor = describe_curve(points, s.tolerance), s.start_size, [], 1
    while True:
        specs = size_specs(ctx.spec, size, value, with_neighbours=wants_neighbours(points))
        stop = _limit(ctx, size, specs, points, time.perf_counter() - started)
        if stop is not None:
            break
        point, rows, factor = _train_size(ctx, points, size, value, specs, factor, errors, started)
        points.append(point)
        next_saes = len(size_specs(ctx.spec, 2 * size, value, with_neighbours=wants_neighbours(points)))
        verdict = describe_curve(points, s.tolerance, next_saes)
        ctx.say(f"{size} latents: {point.count} features ({point.low}-{point.high}){_metrics_text(point)}; {verdict['sentence']}")
        _write(ctx, _result(ctx, points, cal, verdict, "running", time.perf_counter() - started, errors))
        if verdict["state"] in ("saturated", "learning"):  # learning: not trained longer for the budget or MAX_SAMPLE_FACTOR
            stop = verdict["state"]
            break
        hit, cal = _next_value(ctx, cal, point, value, [r for r in rows if r.get("status") == "done"])
        value, size = value_at_size(ctx.spec, hit, ctx.power, size, 2 * size), 2 * size
    result = _result(ctx, points, cal, verdict, stop, time.perf_counter() - started, errors)
    _write(ctx, result)
    return result


def _train_size(
    ctx: SearchContext,
    points: list[CurvePoint],
    size: int,
    value: float,
    specs: list[RunSpec],
    factor: int,
    errors: list[str],
    started: float,
) -> tuple[CurvePoint, list[dict[str, Any]], int]:
    """One size's SAEs trained on `factor` x cfg.train.samples each, and trained again on twice as many while its
    count falls below a smaller size's (a larger dictionary needs longer to settle: its spare latents die late) or
    the curve levels off at it with its count still moving at the end of training (a plateau of training length,
    not of features), up to MAX_SAMPLE_FACTOR and within the budget. Returns its point, its rows and the factor it
    ended with (the next sizes start from it)."""
    while True:
        samples = factor * ctx.cfg.train.samples
        cfg = ctx.cfg.model_copy(update={"train": ctx.cfg.train.model_copy(update={"samples": samples})})
        ctx.say(f"training {size} latents: {len(specs)} SAEs around {ctx.spec.knob} = {value:g}, {samples:,} samples each")
        rows, errs = ctx.train(cfg, ctx.out, specs)
        errors += errs
        point = replace(curve_point(ctx, size, value, rows), samples=samples)
        why = _why_train_longer(points, point, ctx.settings.tolerance)
        if why is None or factor >= MAX_SAMPLE_FACTOR:
            return point, rows, factor
        budget = ctx.settings.budget_seconds
        if budget is not None and time.perf_counter() - started + 2 * point.seconds > budget:
            return point, rows, factor
        ctx.say(f"{why}: training them on twice the samples")
        factor *= 2


def _why_train_longer(points: list[CurvePoint], point: CurvePoint, tolerance: float) -> str | None:
    """Why a new size is trained again on twice the samples, or None: its count fell more than `tolerance` below a
    smaller size's, or the curve levels off at it while its count still moved at the end of training."""
    state = describe_curve([*points, point], tolerance)["state"]
    if state == "falling":
        best = max(points, key=lambda p: p.count)
        return f"{point.dict_size} latents counted {point.count}, fewer than {best.count} at {best.dict_size}"
    if state == "learning":
        return f"{point.dict_size} latents counted {point.count_late} at 80% of training and {point.final} at the end"
    return None


def _next_value(
    ctx: SearchContext, cal: Calibration, point: CurvePoint, value: float, done: list[dict[str, Any]]
) -> tuple[float, Calibration]:
    """The knob value for the next size, before its size scaling, and the calibration to go on with: the neighbouring
    value whose pair shared the most features (its L0 becomes the target), else the value that gives the target L0."""
    knob = ctx.spec.knob
    if point.most_value not in (None, value):
        cal = replace(cal, target_l0=mean_l0(done, knob, point.most_value) or cal.target_l0)
        ctx.say(f"{knob} = {point.most_value:g} shared the most features: L0 {cal.target_l0:.1f} is the target now")
        return point.most_value, cal
    hit = value_for_l0(done, knob, cal.target_l0, ctx.spec.integer_knob, cal.slope)
    return _bounded(hit, value, ctx.spec.integer_knob), cal


def _bounded(hit: float | None, value: float, integer: bool) -> float:
    """The value that gives the target L0, moved from the value trained at most a factor MAX_KNOB_MOVE towards less
    sparsity and not at all towards more (the size's own scaling comes on top): larger dictionaries fire more latents
    early in training, and a penalty raised to hold their L0 down kills the features of the next size. k follows
    its target exactly."""
    if hit is None or integer:
        return value if hit is None else hit
    return min(max(hit, value / MAX_KNOB_MOVE), value)


def _limit(ctx: SearchContext, size: int, specs: list[RunSpec], points: list[CurvePoint], elapsed: float) -> str | None:
    """Why the search cannot train `specs` at `size` (max_size, memory, budget), or None. The next size's time is
    guessed from the last one's: twice the latents, times the change in SAEs."""
    if size > ctx.settings.max_size:
        return "max_size"
    if not ctx.fits(len(specs), size):
        return "memory"
    budget = ctx.settings.budget_seconds
    if budget is not None and points and elapsed + next_size_seconds(points[-1], len(specs)) > budget:
        return "budget"
    return None


@dataclass(frozen=True)
class Calibration:
    """What the probes decided: the knob's value at `size`, its L0 (the target at every size), how L0 falls with the
    value (d log L0 / d log value), and the probes' table."""

    size: int
    value: float
    target_l0: float
    slope: float | None
    probes: list[dict[str, Any]]


def calibrate(ctx: SearchContext) -> Calibration:
    """Probes of one seed at PROBE_SIZE_PER_D x d latents (within the search's sizes) over the knob's probe grid,
    extended past the grid's edge while the best value lies there."""
    spec, s = ctx.spec, ctx.settings
    size = min(max(s.start_size, PROBE_SIZE_PER_D * ctx.d), s.max_size)
    values, rows = probe_grid(spec, size, ctx.d, default_value(spec, size, ctx.power, _scale(ctx.cfg))), []
    probe_cfg = ctx.cfg.model_copy(update={"train": ctx.cfg.train.model_copy(update={"samples": s.probe_samples})})
    for _ in range(PROBE_ROUNDS):
        specs = [RunSpec(arch=spec.name, dict_size=size, sparsity=v, seed=SEEDS[0]) for v in values]
        new_rows, _errors = ctx.train(probe_cfg, ctx.out / PROBE_DIR, specs)
        rows += [r for r in new_rows if r.get("status") == "done"]
        best = best_value(rows, spec.knob, ctx.d)
        if best is None:
            raise InputError("every probe of the sparsity knob failed (NaN or Inf losses): check the data, or set train.lr lower")
        values = [v for v in extend_grid(spec, sorted({float(r[spec.knob]) for r in rows}), best, size) if v not in values]
        if not values:
            break
    target = mean_l0(rows, spec.knob, best)
    ctx.say(f"probes at {size} latents chose {spec.knob} = {best:g}, L0 {target:.1f}: the target at every size")
    table = [
        {"value": float(r[spec.knob]), "l0": r.get("l0"), "fvu": r.get("fvu"), "dead_fraction": r.get("dead_fraction")}
        for r in sorted(rows, key=lambda r: float(r[spec.knob]))
    ]
    return Calibration(size, best, target, l0_slope(rows, spec.knob), table)


def wants_neighbours(points: list[CurvePoint]) -> bool:
    """Neighbouring knob values are trained where the count may settle (after a size whose dictionary was at most
    NEIGHBOURS_FROM_FILL full: counted features per latent), at every other size: the curve saturates on two sizes,
    and one of them checked at neighbouring values is enough."""
    if not points:
        return False
    last = points[-1]
    return last.count <= NEIGHBOURS_FROM_FILL * last.dict_size and last.n_saes <= len(SEEDS)


def size_specs(spec: ArchSpec, size: int, value: float, with_neighbours: bool = True) -> list[RunSpec]:
    """One size's SAEs: SEEDS at `value`, and with neighbours NEIGHBOUR_SEED at each neighbouring value."""
    runs = [RunSpec(arch=spec.name, dict_size=size, sparsity=value, seed=seed) for seed in SEEDS]
    if not with_neighbours:
        return runs
    lower, upper = neighbours(spec, value, size)
    return runs + [RunSpec(arch=spec.name, dict_size=size, sparsity=v, seed=NEIGHBOUR_SEED) for v in (lower, upper) if v != value]


def curve_point(ctx: SearchContext, size: int, value: float, rows: list[dict[str, Any]]) -> CurvePoint:
    """The consensus count at one size: the pair at `value`, and each neighbour against one of that pair."""
    from saekit.analysis.consensus import consensus_count
    from saekit.analysis.sweep import load_sweep

    sweep = load_sweep(ctx.out)
    ids = {r["run_id"] for r in rows if r.get("status") == "done"}
    runs = {(r["knob_value"], r["seed"]): r for r in sweep.select(dict_size=size) if r["run_id"] in ids}
    knob_values = sorted({v for v, _ in runs})
    centre = [runs.get((value, seed)) for seed in SEEDS]
    if any(r is None for r in centre):
        return CurvePoint(size, 0, 0, 0, value, None, _seconds(rows), len(rows), centre=0)
    a, b = (sweep.live_directions(r) for r in centre)
    by_value = {value: consensus_count(a, b)}
    for v, partner in zip([v for v in knob_values if v != value], (a, b)):
        if (v, NEIGHBOUR_SEED) in runs:
            by_value[v] = consensus_count(sweep.live_directions(runs[(v, NEIGHBOUR_SEED)]), partner)
    a_late, b_late = (sweep.live_directions(r, late=True) for r in centre)
    late = None if a_late is None or b_late is None else consensus_count(a_late, b_late)
    ordered = sorted(by_value.values())
    most = max(by_value, key=lambda v: (by_value[v], v == value))  # ties go to the centre
    n = len(ordered)
    point = CurvePoint(size, ordered[n // 2], ordered[0], ordered[-1], value, late, _seconds(rows), len(rows), most, by_value[value])
    return replace(point, metrics=pair_metrics(centre))


def _metrics_text(point: CurvePoint) -> str:
    """', FVU 0.150, L0 15.0, 2.0% dead, CE recovered 0.990, KL 0.050' for the metrics the point has."""
    return "".join(", " + m.log.format(point.metrics[m.key]) for m in POINT_METRICS if m.log and m.key in point.metrics)


def pair_metrics(pair: list[dict[str, Any]]) -> dict[str, float]:
    """The mean over the pair (rows of the run store) of each POINT_METRICS value both SAEs have (finite)."""
    means = {}
    for metric in POINT_METRICS:
        values = [run_value(r, metric.key) for r in pair]
        if None not in values:
            means[metric.key] = sum(values) / len(values)
    return means


def _seconds(rows: list[dict[str, Any]]) -> float:
    """Training time of one size's ensemble (its members share it)."""
    return max((float(r.get("seconds") or 0.0) for r in rows), default=0.0)


def _scale(cfg: Config) -> float:
    from saekit.presets import data_scale

    return data_scale(cfg.source)


def _result(
    ctx: SearchContext,
    points: list[CurvePoint],
    cal: Calibration,
    verdict: dict[str, Any],
    stop: str,
    seconds: float,
    errors: list[str],
) -> dict[str, Any]:
    """The search's JSON document: the curve, its verdict, and the estimate fields `saekit estimate` gives (dict_size
    and the knob's value are the recommended SAE's: the smallest trained size with at least twice the count, at the
    knob value whose pair shared the most features there)."""
    n = verdict["n_features"] or 0
    best = next((p for p in points if p.dict_size >= 2 * n), points[-1]) if points else None
    value = None if best is None else best.most_value if best.most_value is not None else best.knob_value
    knob = ctx.spec.knob_name
    recommended = "" if best is None else f" Recommended SAE: {best.dict_size} latents at {knob} = {value:g}."
    return {
        "n_features": verdict["n_features"],
        "low": verdict["low"],
        "high": verdict["high"],
        "dict_size": None if best is None else best.dict_size,
        "knob": ctx.spec.knob,
        ctx.spec.knob: None if value is None else ctx.spec.knob_number(value),
        "l1": value if ctx.spec.knob == "l1" else None,
        "count_size": verdict["dict_size"],
        "summary": verdict["sentence"] + "." + recommended,
        "signals": [],
        "state": verdict["state"],
        "stable": verdict["state"] == "saturated",
        "lower_bound": verdict["state"] != "saturated",
        "sentence": verdict["sentence"],
        "reasons": verdict.get("reasons", []),
        "fit": verdict["fit"],
        "beta": verdict["beta"],
        "next_size": verdict["next_size"],
        "next_seconds": verdict["next_seconds"],
        "curve": [asdict(p) for p in points],
        "target_l0": cal.target_l0,
        "probes": cal.probes,
        "stopped": stop,
        "seconds": seconds,
        "settings": {"samples": ctx.cfg.train.samples, **asdict(ctx.settings)},
        "errors": errors,
    }


def _write(ctx: SearchContext, result: dict[str, Any]) -> None:
    atomic_write_bytes(ctx.out / RESULT_FILE, json.dumps(result, indent=2, default=float).encode())


def read_result(out: str | Path) -> dict[str, Any] | None:
    """OUT/count.json of a search, or None where there is none."""
    path = Path(out) / RESULT_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read {path}: {err}") from None
