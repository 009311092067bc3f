"""Cost of a `synth` batch against one training step of a ReLU SAE as large as the model's feature count.

Usage: python benchmarks/synth_batch.py [--threads 1] [--repeats 5] [--batch 4096] [--json]
For G = 4096 features in d = 256 and G = 16,384 in d = 768 (SynthSAEBench-16k's shape), with the synth
defaults otherwise (hierarchy, Zipfian firing, rank-25 correlation, magnitudes, bias): the median seconds of
`SynthSource.batch`, of one saekit training step (ReluSAE with K = 1 and G latents, the trainer's Adam), and
their ratio. Orthogonalisation is skipped (0 steps): it changes the directions, not the cost of sampling.
All figures come from one run on this machine.
"""

import argparse
import json
import statistics
import time

import torch

from saekit.config import TrainConfig
from saekit.sae import ReluSAE
from saekit.sources.synth import SynthSource
from saekit.train.loop import make_state, optimisation_step

SHAPES = ((4096, 256), (16_384, 768))


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(G: int, d: int, batch: int, repeats: int) -> dict:
    source = SynthSource(d=d, n_features=G, hierarchy_roots=G // 128, orthogonalize_steps=0, seed=0)
    steps = iter(range(10**9))
    synth_s = median_seconds(lambda: source.batch(batch, next(steps)), repeats)
    sae = ReluSAE(d, G, [0], [0.3])
    opt = make_state(sae, TrainConfig()).optimizer
    x = source.batch(batch, 10**6)
    step_s = median_seconds(lambda: optimisation_step(sae, opt, x), repeats)
    return {"n_features": G, "d": d, "batch": batch, "synth_batch_s": synth_s, "train_step_s": step_s, "ratio": synth_s / step_s}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure(G, d, args.batch, args.repeats) for G, d in SHAPES]
    if args.json:
        print(json.dumps({"threads": args.threads, "repeats": args.repeats, "rows": rows}, indent=2))
    else:
        print(f"threads {args.threads}, repeats {args.repeats}, batch {args.batch}")
        for r in rows:
            print(f"G={r['n_features']:>6} d={r['d']:>4}  synth batch {r['synth_batch_s']:.4f} s  "
                  f"train step {r['train_step_s']:.4f} s  ratio {r['ratio']:.3f}")
