"""Wall time of `saekit train` at SynthSAEBench-16k's full shape (16,384 features in 768 dimensions) on this machine.

Usage: python benchmarks/synth_full_shape.py [--threads 2] [--samples 200000] [--json]
Runs `saekit train` as a user would: source.kind synth with 128 trees (SynthSAEBench-16k's forest; the other synth
keys are its settings already), a BatchTopK SAE with 4096 latents at k 25 (SynthSAEBench's benchmark SAE), batch
1024. Reports the wall time of the whole command, the time of the training loop it prints, the samples per second
of that loop, and what SynthSAEBench's 200M training samples would take at that rate. The model's directions
(100 orthogonalisation steps) are built on the first run and cached in OUT/sources, so the command is run twice
into the same folder and both wall times are printed.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

SYNTHSAEBENCH_SAMPLES = 200_000_000
SETTINGS = [
    "source.kind=synth",
    "source.n_features=16384",
    "source.d=768",
    "source.hierarchy_roots=128",
    "sae.arch=batchtopk",
    "sae.dict_size=4096",
    "sae.k=25",
    "train.batch_size=1024",
]


def train(out: str, samples: int, threads: int, run: int) -> dict:
    """One `saekit train` into `out` (a fresh run id each time); its wall seconds and its JSON row."""
    sets = [*SETTINGS, f"train.samples={samples}", f"train.seed={run}"]
    cmd = [sys.executable, "-m", "saekit", "train", "--json", "--no-progress", "--out", out]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=6 * 3600)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"saekit train failed: {done.stderr.strip().splitlines()[-1:]}")
    (row,) = json.loads(done.stdout)
    return {"wall_s": wall, "train_s": row["seconds"], "samples": row["samples"], "mmcs": row.get("mmcs"), "l0": row.get("l0")}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--samples", type=int, default=200_000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out = tempfile.mkdtemp(prefix="synth-full-")
    try:
        first = train(out, args.samples, args.threads, 0)  # builds and caches the model
        second = train(out, args.samples, args.threads, 1)  # the model from the cache
    finally:
        shutil.rmtree(out, ignore_errors=True)
    rate = second["samples"] / second["train_s"]
    result = {
        "threads": args.threads,
        "samples": args.samples,
        "first_wall_s": first["wall_s"],
        "cached_wall_s": second["wall_s"],
        "train_s": second["train_s"],
        "samples_per_s": rate,
        "hours_for_200M": SYNTHSAEBENCH_SAMPLES / rate / 3600,
        "mmcs": second["mmcs"],
        "l0": second["l0"],
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"16,384 x 768, BatchTopK 4096 latents k 25, {args.samples:,} samples, {args.threads} threads: "
            f"wall {first['wall_s']:.0f} s (model built) / {second['wall_s']:.0f} s (cached), training {second['train_s']:.0f} s, "
            f"{rate:,.0f} samples/s; SynthSAEBench's 200M samples: {result['hours_for_200M']:.1f} h"
        )
