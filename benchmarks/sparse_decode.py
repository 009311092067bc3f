"""TopK decoding, sparse (only the k kept latents) against dense (scatter to (B, m), then a matmul), forward + backward.

Usage: python benchmarks/sparse_decode.py [--threads 2] [--batch 1024] [--no-step] [--json]
The same measurement as `saekit bench`'s sparse_decode_speedup (d=768, m=16384, k=32, K=1), plus the whole
TopK training step decoding either way. Both sides are timed in alternation, so their ratio comes from one run.
"""

import argparse
import json

import torch

from saekit.bench import bench_sparse_decode

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-step", action="store_true", help="skip the whole TopK training step")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    r = bench_sparse_decode(batch_size=args.batch, repeats=args.repeats, whole_step=not args.no_step)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print(
            f"d={r['d']} m={r['dict_size']} k={r['k']} batch={r['batch_size']} threads={r['threads']}\n"
            f"decode forward+backward: sparse {r['sparse_decode_ms']:.1f} ms, dense {r['dense_decode_ms']:.1f} ms: "
            f"sparse_decode_speedup {r['sparse_decode_speedup']:.2f}"
        )
        if "topk_step_ms" in r:
            print(
                f"TopK training step: sparse decode {r['topk_step_ms']:.1f} ms, dense decode "
                f"{r['topk_dense_decode_step_ms']:.1f} ms: topk_step_speedup {r['topk_step_speedup']:.2f}"
            )
