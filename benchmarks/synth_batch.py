"""Cost of a `synth` batch against one training step of a ReLU SAE as large as the model's feature count.

Usage: python benchmarks/synth_batch.py [--threads 1] [--repeats 5] [--batch 4096] [--json]
For G = 4096 features in d = 256 and G = 16,384 in d = 768 (SynthSAEBench-16k's shape), with the synth
defaults otherwise (hierarchy, Zipfian firing, rank-25 correlation, magnitudes, bias): the median seconds of
`SynthSource.batch`, of one saekit training step (ReluSAE with K = 1 and G latents, the trainer's Adam), and
the median and largest of their per-round ratios (each round times one of each, back to back).
Orthogonalisation is skipped (0 steps): it changes the directions, not the cost of sampling.
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


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(G: int, d: int, batch: int, repeats: int) -> dict:
    """Medians over `repeats` rounds, each timing one synth batch then one training step back to back (so that the
    load of a shared machine hits both alike); `ratio` is the median of the rounds' ratios."""
    source = SynthSource(d=d, n_features=G, hierarchy_roots=G // 128, orthogonalize_steps=0, seed=0)
    sae = ReluSAE(d, G, [0], [0.3])
    opt = make_state(sae, TrainConfig()).optimizer
    x = source.batch(batch, 10**6)
    optimisation_step(sae, opt, x)  # warm-up
    synth, step = [], []
    for r in range(repeats):
        synth.append(seconds(lambda step=r: source.batch(batch, step)))
        step.append(seconds(lambda: optimisation_step(sae, opt, x)))
    ratios = [s / t for s, t in zip(synth, step)]
    return {"n_features": G, "d": d, "batch": batch, "synth_batch_s": statistics.median(synth),
            "train_step_s": statistics.median(step), "ratio": statistics.median(ratios), "max_ratio": max(ratios)}


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
                  f"train step {r['train_step_s']:.4f} s  ratio {r['ratio']:.3f} (largest {r['max_ratio']:.3f})")
