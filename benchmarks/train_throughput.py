"""Training throughput of one SAE against this machine's matmul rate and a plain PyTorch loop.

Usage: python benchmarks/train_throughput.py [--threads 2] [--json]
Same as `saekit bench`; kept here so benchmarks live together. All ratios come from one run.
"""

import argparse
import json

from saekit.bench import run_benchmarks

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    results = run_benchmarks(threads=args.threads)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for name, r in results.items():
            if not isinstance(r, dict):
                print(f"{name:36s} {r:.4g}")
                continue
            print(name)
            for key, value in r.items():
                print(f"  {key:34s} {value:.4g}" if isinstance(value, float) else f"  {key:34s} {value}")
