"""Why can splicing an SAE's reconstruction into a language model lower its next-token loss? Controls, measured.

Usage: python benchmarks/splice_controls.py OUT RUN_ID [--tokens 16384] [--threads 2] [--scales 0.8,0.9 [--only-scales]] [--json]

OUT is a sweep or count folder trained on a causal model's activations (`source.kind: activations`), RUN_ID one of
its SAEs. On held-out windows of the source (the same windows the downstream evaluation uses, but more of them), the
layer's activations x at the scored positions are replaced by:

  identity      x itself (must give the clean loss)
  sae           the SAE's reconstruction x_hat (what ce_sae measures)
  sae_renorm    x_hat rescaled per token to the norm of x (the SAE's directions without its shrinkage)
  shrink        x scaled by the SAE's mean shrinkage, mean |x_hat| / mean |x| (its shrinkage without its directions)
  noise         x plus Gaussian noise of the SAE's FVU (an error of the same size in random directions)
  scale_f       f·x for each factor f of --scales (how the loss depends on the stream's scale alone)

and the script prints, for each, the mean cross-entropy (nats), its difference from the clean loss with a standard
error over windows (paired: the same tokens), and the mean KL(P_clean || P_spliced). Massive activations (norm over
the source's threshold) stay clean, as in training and in the downstream evaluation.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from saekit.config import parse_config  # noqa: E402
from saekit.io import load_sae, read_cfg  # noqa: E402
from saekit.lm.models import load_model  # noqa: E402
from saekit.lm.sites import replace  # noqa: E402
from saekit.sources import make_source  # noqa: E402
from saekit.sources.streams import Stream  # noqa: E402
from saekit.store import RunStore  # noqa: E402

Splice = Callable[[torch.Tensor], torch.Tensor]


def run_row(out: Path, run_id: str) -> dict:
    with RunStore(out) as store:
        rows = [r for r in store.runs("done") if r["run_id"] == run_id]
    if not rows:
        raise SystemExit(f"{run_id}: no finished run of that id in {out}")
    return rows[0]


def splices(sae, scale: float, threshold: float, x_sample: torch.Tensor, factors: list[float] = ()) -> dict[str, Splice]:
    """The controls, each (n, d) raw activations -> (n, d); rows over `threshold` pass through unchanged."""

    def recon(x: torch.Tensor) -> torch.Tensor:
        x_hat, _ = sae(x * scale)
        return x_hat[0] / scale

    with torch.no_grad():
        kept = x_sample[x_sample.norm(dim=1) <= threshold]
        x_hat = recon(kept)
        shrink = float(x_hat.norm(dim=1).mean() / kept.norm(dim=1).mean())
        fvu = float(((kept - x_hat) ** 2).sum() / ((kept - kept.mean(0)) ** 2).sum())
        noise_std = math.sqrt(fvu * float(((kept - kept.mean(0)) ** 2).sum(1).mean()) / kept.shape[1])

    def guard(fn: Splice) -> Splice:
        def spliced(x: torch.Tensor) -> torch.Tensor:
            x = x.float()
            out = fn(x)
            massive = x.norm(dim=1) > threshold
            out[massive] = x[massive]
            return out

        return spliced

    def renorm(x: torch.Tensor) -> torch.Tensor:
        y = recon(x)
        return y * (x.norm(dim=1, keepdim=True) / y.norm(dim=1, keepdim=True).clamp_min(1e-12))

    generator = torch.Generator().manual_seed(0)
    table = {
        "identity": lambda x: x.clone(),
        "sae": recon,
        "sae_renorm": renorm,
        "shrink": lambda x: x * shrink,
        "noise": lambda x: x + noise_std * torch.randn(x.shape, generator=generator),
        **{f"scale_{f:g}": (lambda x, f=f: x * f) for f in factors},
    }
    print(f"SAE on {kept.shape[0]} sampled tokens: FVU {fvu:.3f}, mean norm ratio |x_hat|/|x| {shrink:.3f}", file=sys.stderr)
    return {name: guard(fn) for name, fn in table.items()}


@torch.inference_mode()
def per_window_losses(lm, windows: torch.Tensor, layer: int, site: str, skip: int, splice: Splice | None, clean_lp=None):
    """Per window: (summed CE, summed KL against clean_lp (or None), tokens), and the log-probs of this pass."""
    all_lp, results = [], []
    for i in range(windows.shape[0]):
        ids = windows[i : i + 1]
        if splice is None:
            logits = lm.model(input_ids=ids, use_cache=False).logits
        else:

            def patched(act: torch.Tensor) -> torch.Tensor:
                out = act.clone()
                kept = act[:, skip:]
                out[:, skip:] = splice(kept.reshape(-1, act.shape[-1])).reshape(kept.shape).to(act.dtype)
                return out

            with replace(lm, layer, site, patched):
                logits = lm.model(input_ids=ids, use_cache=False).logits
        lp = F.log_softmax(logits[0, skip:-1].float(), dim=-1)
        target = ids[0, skip + 1 :]
        ce = float(F.nll_loss(lp, target, reduction="sum"))
        kl = None if clean_lp is None else float(F.kl_div(lp, clean_lp[i], reduction="sum", log_target=True))
        results.append((ce, kl, target.numel()))
        all_lp.append(lp)
    return results, all_lp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("run_id")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scales", default="", help="comma list of extra factors f: x replaced by f·x (e.g. 0.8,0.9)")
    parser.add_argument("--only-scales", action="store_true", help="run only identity and the --scales controls")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    row = run_row(args.out, args.run_id)
    stored = row["config"]
    source_keys = {k: v for k, v in stored["source"].items() if k != "d"}  # the width comes from the folder
    cfg = parse_config({"source": source_keys, "sae": stored["sae"], "train": stored["train"]})
    source = make_source(cfg.source)
    manifest = source.manifest
    lm = load_model(str(manifest["model"]))
    windows = source.eval_token_windows(args.tokens)
    sae = load_sae(row["checkpoint"])
    scale = float(read_cfg(row["checkpoint"]).get("input_scale", 1.0))
    layer, site, skip = int(manifest["layer"]), str(manifest["site"]), source.skip_positions
    x_sample = source.batch(8192, 0, Stream.EVAL).cpu() / source.input_scale  # held-out ordinary rows, raw scale
    factors = [float(f) for f in args.scales.split(",") if f.strip()]
    controls = splices(sae, scale, source.norm_threshold, x_sample, factors)
    if args.only_scales:
        controls = {name: fn for name, fn in controls.items() if name == "identity" or name.startswith("scale_")}
    clean, clean_lp = per_window_losses(lm, windows, layer, site, skip, None)
    tokens = sum(n for _, _, n in clean)
    report = {"run_id": args.run_id, "windows": int(windows.shape[0]), "tokens": tokens, "ce_clean": sum(c for c, _, _ in clean) / tokens}
    for name, splice in controls.items():
        res, _ = per_window_losses(lm, windows, layer, site, skip, splice, clean_lp)
        diffs = [(c - c0) / n for (c, _, n), (c0, _, _) in zip(res, clean)]
        report[name] = {
            "ce": sum(c for c, _, _ in res) / tokens,
            "ce_minus_clean": sum(c - c0 for (c, _, _), (c0, _, _) in zip(res, clean)) / tokens,
            "se_over_windows": statistics.stdev(diffs) / math.sqrt(len(diffs)),
            "kl": sum(k for _, k, _ in res) / tokens,
        }
        print(
            f"{name:>11}: CE {report[name]['ce']:.4f}  minus clean {report[name]['ce_minus_clean']:+.4f} "
            f"(± {report[name]['se_over_windows']:.4f})  KL {report[name]['kl']:.4f}",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
