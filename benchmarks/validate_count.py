"""The feature count against the truth on ten toy configurations: `saekit reproduce --preset quick` on each.

Usage: python benchmarks/validate_count.py [--threads 2] [--only rq256,v4] [--keep DIR] [--json]

Runs the adaptive search (`reproduce --preset quick`) as a fresh process per configuration, one after the other,
and prints one Markdown row per configuration: the true number of features G, the count with its range, the error,
the verdict, the curve (size: count), the recommended SAE (size, knob value), its MMCS per seed and the wall time.
The truth is used only to score the result. OMP/torch threads are set to --threads for every process.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from time_to_estimate import timed  # benchmarks/ is on sys.path when a script in it runs

# name -> (source overrides, true number of features); the report's data is d = 256, G = 512
CONFIGS: dict[str, tuple[list[str], int]] = {
    "rq256": ([], 512),
    "v1": (["source.d=64", "source.n_features=128"], 128),
    "v2": (["source.d=96", "source.n_features=256", "source.prob_decay=0.995", "source.mean_active=4"], 256),
    "v3": (["source.d=64", "source.n_features=160", "source.correlated=true"], 160),
    "v4": (["source.d=80", "source.n_features=200", "source.magnitude_decay=0.995"], 200),
    "v5": (["source.d=64", "source.n_features=128", "source.noise_std=0.02", "source.seed=5"], 128),
    "v6": (["source.d=128", "source.n_features=256", "source.prob_decay=0.985", "source.mean_active=6", "source.seed=3"], 256),
    "v7": (["source.d=64", "source.n_features=256", "source.seed=4"], 256),
    "v8": (["source.d=48", "source.n_features=96", "source.seed=9"], 96),
    "v9": (["source.seed=11"], 512),
}


def run_one(name: str, folder: Path, threads: int) -> dict:
    """Wall seconds, the search's result and the recommended SAE's MMCS per seed for one configuration."""
    overrides, truth = CONFIGS[name]
    args = ["reproduce", "--preset", "quick", "--out", str(folder)]
    for item in overrides:
        args += ["--set", item]
    seconds, out = timed(args, threads)
    est = out["estimate"]
    knob = est.get("knob", "l1")
    trained = {p["dict_size"]: p.get("samples") for p in est["curve"]}  # a size trained again keeps its last length
    chosen = [
        r
        for r in out["runs"]
        if r.get("dict_size") == est.get("dict_size")
        and r.get(knob) == est.get(knob)
        and r.get("samples") == trained.get(r.get("dict_size"))
    ]
    return {
        "name": name,
        "truth": truth,
        "n_features": est["n_features"],
        "low": est.get("low"),
        "high": est.get("high"),
        "error": est["n_features"] / truth - 1,
        "state": est["state"],
        "curve": [(p["dict_size"], p["count"], p.get("samples")) for p in est["curve"]],
        "recommended": (est.get("dict_size"), knob, est.get(knob)),
        "mmcs": [r.get("mmcs") for r in sorted(chosen, key=lambda r: r.get("seed", 0))],
        "seconds": seconds,
    }


def markdown_row(r: dict) -> str:
    """One row of the validation table."""
    curve = ", ".join(f"{m}: {c}" + (f" ({s / 1e6:g}M)" if s and s != 1_000_000 else "") for m, c, s in r["curve"])
    size, _knob, value = r["recommended"]
    mmcs = ", ".join(f"{v:.4f}" for v in r["mmcs"] if v is not None)
    return (
        f"| {r['name']} | {r['truth']} | {r['n_features']} ({r['low']}–{r['high']}) | {100 * r['error']:+.1f}% | {r['state']} "
        f"| {curve} | {size}, {value:.4g} | {mmcs} | {r['seconds']:.0f} s |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default=",".join(CONFIGS), help="comma-separated names of the configurations to run")
    ap.add_argument("--keep", default=None, help="keep each run's folder under this directory")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}; known: {', '.join(CONFIGS)}")
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.keep or tmp)
        rows = []
        for name in names:
            rows.append(run_one(name, base / name, args.threads))
            print(f"{name}: {rows[-1]['n_features']} of {rows[-1]['truth']} in {rows[-1]['seconds']:.0f} s", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "threads": args.threads, "rows": rows}, indent=2))
        return
    print("| run | G | count (low–high) | error | verdict | curve (size: count) | recommended (size, knob) | its MMCS (seeds) | time |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(markdown_row(r))
    total = sum(r["seconds"] for r in rows)
    print(f"\n{len(rows)} configurations, {total:.0f} s in all, {time.strftime('%Y-%m-%d')}, {args.threads} threads")


if __name__ == "__main__":
    main()
