"""Time to a feature count on the report's toy data: the commands a user runs, timed in one run.

Usage: python benchmarks/time_to_estimate.py [--threads 2] [--repeats 1] [--with-grid] [--json]

Times, each as a fresh `saekit` process in a new folder, one after the other:
  train   `saekit train configs/toy.yaml` (one 1024-latent SAE, 3M samples): the yardstick
  count   `saekit count configs/toy.yaml` (the adaptive search)
  grid    `saekit reproduce --preset grid` (the fixed grid the search replaced; only with --with-grid, ~10 minutes)
and prints each one's wall time, its ratio to `train` measured in the same repeat, and the count with its error
against the data's 512 true features. Medians over repeats. OMP/torch threads are set to --threads for every
process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "configs" / "toy.yaml"
TRUE_FEATURES = 512


def timed(args: list[str], threads: int) -> tuple[float, dict | list | None]:
    """Wall seconds of `saekit ARGS --json` and its parsed stdout."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "saekit", *args, "--json", "--no-progress"], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"saekit {' '.join(args)} failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    return seconds, json.loads(done.stdout)


def one_repeat(threads: int, with_grid: bool) -> dict[str, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        train_s, _ = timed(["train", str(TOY), "--out", f"{tmp}/train"], threads)
        count_s, count = timed(["count", str(TOY), "--out", f"{tmp}/count"], threads)
        rows = {
            "train": {"seconds": train_s},
            "count": {
                "seconds": count_s,
                "n_features": count["n_features"],
                "state": count["state"],
                "sentence": count["sentence"],
                "curve": [(p["dict_size"], p["count"], p["low"], p["high"]) for p in count["curve"]],
            },
        }
        if with_grid:
            grid_s, grid = timed(["reproduce", "--preset", "grid", "--out", f"{tmp}/grid"], threads)
            rows["grid"] = {"seconds": grid_s, "n_features": (grid.get("estimate") or {}).get("n_features")}
    for row in rows.values():
        row["ratio_to_train"] = row["seconds"] / train_s
        if row.get("n_features") is not None:
            row["error"] = row["n_features"] / TRUE_FEATURES - 1
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--with-grid", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    repeats = [one_repeat(args.threads, args.with_grid) for _ in range(args.repeats)]
    summary = {
        name: {
            "median_seconds": statistics.median(r[name]["seconds"] for r in repeats),
            "median_ratio_to_train": statistics.median(r[name]["ratio_to_train"] for r in repeats),
            "counts": [r[name].get("n_features") for r in repeats],
        }
        for name in repeats[0]
    }
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "threads": args.threads, "repeats": repeats, "summary": summary}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for name, s in summary.items():
        counts = "" if name == "train" else f"  counts {s['counts']} (truth {TRUE_FEATURES})"
        print(f"{name:6s} {s['median_seconds']:7.1f} s  {s['median_ratio_to_train']:.2f}x train{counts}")


if __name__ == "__main__":
    main()
