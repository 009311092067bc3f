"""Time to MMCS >= 0.99 with < 10% dead latents: saekit's trainer, a plain PyTorch loop and SAELens, in one run.

Usage: python benchmarks/time_to_mmcs.py [--threads 2] [--trainers saekit,plain,saelens] [--max-samples N]
           [--check-every 51200] [--set key=value ...] [--peers-at recipe|report] [--json]

One ReLU SAE on the report's toy data (d=256, G=512; 1024 latents), trained by each trainer in
turn until a check first finds MMCS (mean over the true features of the best cosine with any decoder direction)
>= --target-mmcs and fewer than --max-dead of its latents dead (never firing on --eval-samples held-out samples of
the source's eval stream), or until --max-samples. Checks run every --check-every samples with the clock stopped.
  saekit   saekit's own loop (saekit.train.loop.train) on the recipe: --config (default configs/toy_fast.yaml,
           saekit's fast recipe: the L1 weighted by decoder norms with a free decoder started at norm 0.1, lr 2e-3
           with a linear decay, bfloat16 products), then any --set; it generates each batch in its loop, inside the clock.
  plain    a plain PyTorch loop: c = relu(W_e x + b_e), x_hat = W_d c, loss = MSE (mean) + l1 * mean |c| (each |c_j|
           times ||W_d,j|| and rows started at the recipe's decoder_init_norm when its decoder is free, except with
           --peers-at report; else unit decoder rows renormalised after each step),
           torch.optim.Adam; saekit's init; the peers' lr and lr schedule, the recipe's batch size and l1.
  saelens  SAELens's StandardTrainingSAE trained by its SAETrainer.fit (only when `import sae_lens` works): its own
           loss (summed MSE, L1 weighted by decoder norms; l1_coefficient = l1 * d / m, the same objective up to a
           factor d), init, trained b_dec and gradient clipping; the peers' lr and schedule, the recipe's batch size.
The peers' lr and schedule are the recipe's (--peers-at recipe, the default) or the report's, lr 1e-3 without decay
(--peers-at report: each library as a user of the report's setup runs it).
plain and saelens read batches of the same source's training stream generated before the clock starts (a pool of
--pool-samples, cycled). The recipe's train.samples is replaced by --max-samples (default: the recipe's), so the lr
schedule spans it. Ratios are each trainer's seconds to the target over the fastest peer's (plain or saelens).
Run it under a venv with sae-lens to get the third row; saekit is then read from this checkout's src/.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("saekit") is None:  # e.g. a venv with sae-lens but without saekit: this checkout's source
    sys.path.insert(0, str(ROOT / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from saekit.config import Config, TrainConfig, expand_grid, load_config  # noqa: E402
from saekit.device import resolve_device  # noqa: E402
from saekit.metrics import mmcs  # noqa: E402
from saekit.sae.geometric_median import geometric_median  # noqa: E402
from saekit.sources import Source, Stream, make_source  # noqa: E402
from saekit.train.loop import TrainingDiverged, lr_factor, make_state, matmul_precision, train, warmup_factor  # noqa: E402
from saekit.train.plan import EnsemblePlan  # noqa: E402
from saekit.train.run import BIAS_INIT_SAMPLES, build_ensemble  # noqa: E402

FAST = ROOT / "configs" / "toy_fast.yaml"
TRAINERS = ("saekit", "plain", "saelens")
PEERS = ("plain", "saelens")
REPORT_TRAIN = {"lr": 1e-3, "lr_decay": "none", "lr_warmup": 0.0}  # the report's Adam setup, for --peers-at report
EVAL_CHUNK = 4096  # held-out rows encoded at once by a check

Encode = Callable[[torch.Tensor], torch.Tensor]  # (N, d) -> codes (N, m)


class _Reached(Exception):
    """Raised from a check inside a trainer's own loop to stop it at the target."""


class Stopwatch:
    """Seconds accumulated between start() and stop() calls (synchronising CUDA at each)."""

    def __init__(self, device: torch.device) -> None:
        self.seconds, self._since, self._cuda = 0.0, None, device.type == "cuda"

    def _now(self) -> float:
        if self._cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def start(self) -> None:
        self._since = self._now()

    def stop(self) -> None:
        if self._since is not None:
            self.seconds += self._now() - self._since
            self._since = None


@dataclass
class Setup:
    """What every trainer shares: the recipe, the data, the held-out batch and the target."""

    cfg: Config
    source: Source
    truth: torch.Tensor  # (G, d) unit rows
    x_eval: torch.Tensor  # (N, d) held-out samples of the eval stream
    device: torch.device
    n_steps: int
    steps_per_check: int
    target: float
    max_dead: float
    pool: torch.Tensor | None = None  # (P, B, d) pre-generated training batches for the peers
    peer_train: TrainConfig | None = None  # the peers' train settings (default: the recipe's)

    @property
    def peers(self) -> TrainConfig:
        return self.peer_train or self.cfg.train

    @property
    def batch_size(self) -> int:
        return self.cfg.train.batch_size

    def due(self, steps: int) -> bool:
        """Whether a check follows step number `steps` (1-based): every steps_per_check steps, and after the last."""
        return steps % self.steps_per_check == 0 or steps == self.n_steps


@dataclass
class Tracker:
    """The checks of one trainer, with its training clock (stopped during each check)."""

    setup: Setup
    watch: Stopwatch
    checks: list[dict[str, float]] = field(default_factory=list)
    reached: dict[str, float] | None = None

    @torch.no_grad()
    def check(self, samples: int, directions: torch.Tensor, encode: Encode) -> bool:
        """Record MMCS and the dead fraction after `samples`; True once the target is met."""
        self.watch.stop()
        s = self.setup
        with matmul_precision("highest"):
            score = mmcs(directions.float(), s.truth)
            fired = torch.zeros(directions.shape[0], dtype=torch.bool, device=s.device)
            for x in s.x_eval.split(EVAL_CHUNK):
                fired |= (encode(x) > 0).any(dim=0)
        dead = 1.0 - fired.double().mean().item()
        row = {"samples": samples, "seconds": self.watch.seconds, "mmcs": score, "dead_fraction": dead}
        self.checks.append(row)
        if self.reached is None and score >= s.target and dead < s.max_dead:
            self.reached = row
        self.watch.start()
        return self.reached is not None

    def result(self, trainer: str, how: str, status: str = "ok") -> dict[str, Any]:
        """The trainer's row: samples and seconds to the target (None when not reached), best and last MMCS, last dead fraction."""
        last = self.checks[-1] if self.checks else {}
        samples_trained = int(last.get("samples", 0))
        return {
            "trainer": trainer,
            "how": how,
            "status": status,
            "reached": self.reached is not None,
            "samples": None if self.reached is None else int(self.reached["samples"]),
            "seconds": None if self.reached is None else self.reached["seconds"],
            "samples_trained": samples_trained,
            "train_seconds": self.watch.seconds,
            "samples_per_second": samples_trained / self.watch.seconds if self.watch.seconds > 0 else None,
            "best_mmcs": max((c["mmcs"] for c in self.checks), default=None),
            "final_mmcs": last.get("mmcs"),
            "final_dead_fraction": last.get("dead_fraction"),
            "checks": self.checks,
        }


# -- saekit -------------------------------------------------------------------------------------------------------


def run_saekit(setup: Setup) -> dict[str, Any]:
    """saekit's training loop on the recipe (data generated in the loop), stopped by the first check at the target."""
    cfg = setup.cfg
    torch.manual_seed(cfg.train.seed)
    spec = expand_grid(cfg)[0]
    sae = build_ensemble(cfg, EnsemblePlan(spec.arch, spec.dict_size, (spec,), ("bench",)), setup.source.d, setup.device)
    if cfg.sae.decoder_bias and cfg.sae.decoder_bias_init == "geometric_median":  # as saekit.train.run.start_ensemble
        with torch.no_grad():
            sae.b_dec.copy_(geometric_median(setup.source.batch(BIAS_INIT_SAMPLES, 0, Stream.BIAS_INIT)).expand_as(sae.b_dec))
    train_cfg = cfg.train.model_copy(update={"log_every": setup.steps_per_check})
    state = make_state(sae, train_cfg)
    tracker = Tracker(setup, Stopwatch(setup.device))

    def on_log(samples: int, row: dict[str, torch.Tensor]) -> None:
        if tracker.check(samples, sae.directions()[0], lambda x: sae.encode(x)[0]):
            raise _Reached

    status = "ok"
    tracker.watch.start()
    try:
        train(sae, setup.source, train_cfg, on_log=on_log, state=state, progress=False)
    except _Reached:
        pass
    except TrainingDiverged as err:
        status = f"diverged: {err}"
    tracker.watch.stop()
    return tracker.result("saekit", "saekit.train.loop.train on the recipe", status)


# -- plain PyTorch ------------------------------------------------------------------------------------------------


class PlainReluSAE(nn.Module):
    """c = relu(x W_e + b_e), x_hat = c W_d; decoder rows start as saekit's (rows of norm `init_norm` from `seed`),
    W_e = W_d^T. With `free`, the L1 term weighs each |c_j| by ||W_d,j|| and the rows are not renormalised."""

    def __init__(self, d: int, m: int, seed: int, free: bool = False, init_norm: float = 1.0) -> None:
        super().__init__()
        w = torch.randn(m, d, generator=torch.Generator().manual_seed(seed))
        w = init_norm * w / w.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w)  # (m, d)
        self.W_enc = nn.Parameter(w.T.contiguous())  # (d, m)
        self.b_enc = nn.Parameter(torch.zeros(m))
        self.free = free

    def l1(self, c: torch.Tensor, mean: bool) -> torch.Tensor:
        """mean over latents (or sum) of |c|, each times its decoder row's norm when free; mean over the batch."""
        a = c.abs() * self.W_dec.norm(dim=1) if self.free else c.abs()
        return a.mean() if mean else a.sum(dim=1).mean()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.W_enc + self.b_enc)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.encode(x)
        return c @ self.W_dec, c

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        if not self.free:
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True))


def run_plain(setup: Setup) -> dict[str, Any]:
    """The plain loop on the pre-generated batches, with the peers' lr (and schedule), the recipe's batch size and l1."""
    tc, sae_cfg = setup.peers, setup.cfg.sae
    torch.manual_seed(tc.seed)
    free = sae_cfg.decoder_norm == "free" and setup.peer_train is None  # at the report's setup, the report's unit rows
    model = PlainReluSAE(setup.source.d, sae_cfg.dict_size, tc.seed, free, sae_cfg.decoder_init_norm if free else 1.0).to(setup.device)
    opt = torch.optim.Adam(model.parameters(), lr=tc.lr)
    l1 = float(sae_cfg.l1)
    mean_l1 = sae_cfg.l1_reduction == "mean"
    pool = setup.pool
    tracker = Tracker(setup, Stopwatch(setup.device))
    tracker.watch.start()
    for t in range(setup.n_steps):
        for group in opt.param_groups:
            group["lr"] = tc.lr * lr_factor(t, setup.n_steps, tc)
        x = pool[t % pool.shape[0]]
        x_hat, c = model(x)
        sparsity = model.l1(c, mean_l1)
        loss = (x_hat - x).pow(2).mean() + l1 * warmup_factor(t, setup.n_steps, tc.l1_warmup) * sparsity
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.normalize_decoder()
        if setup.due(t + 1) and tracker.check((t + 1) * setup.batch_size, model.W_dec.detach(), model.encode):
            break
    tracker.watch.stop()
    return tracker.result("plain", "plain PyTorch loop (autograd, torch.optim.Adam) on pre-generated batches")


# -- SAELens ------------------------------------------------------------------------------------------------------


def _checked_batches(setup: Setup, tracker: Tracker, sae: Any) -> Iterator[torch.Tensor]:
    """The pool's batches, cycled; before handing out the batch after every steps_per_check steps, a check (which
    raises _Reached at the target, ending SAETrainer.fit)."""
    t = 0
    while True:
        if t > 0 and t % setup.steps_per_check == 0 and tracker.check(t * setup.batch_size, sae.W_dec.detach(), sae.encode):
            raise _Reached
        yield setup.pool[t % setup.pool.shape[0]]
        t += 1


def saelens_version() -> str | None:
    """sae_lens's version, or None when it cannot be imported here."""
    try:
        import sae_lens
    except ImportError:
        return None
    return str(sae_lens.__version__)


def run_saelens(setup: Setup) -> dict[str, Any]:
    """SAELens's StandardTrainingSAE through SAETrainer.fit on the pre-generated batches."""
    from sae_lens import SAETrainer, StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training import sae_trainer
    from tqdm.auto import tqdm

    tc, sae_cfg, n = setup.peers, setup.cfg.sae, setup.n_steps
    d, m = setup.source.d, sae_cfg.dict_size
    # saekit's loss x d is SAELens's: summed MSE + l1_coefficient * sum_j |c_j| ||W_d,j||, with unit decoder rows
    l1_coefficient = float(sae_cfg.l1) * d / (m if sae_cfg.l1_reduction == "mean" else 1)
    torch.manual_seed(tc.seed)
    sae = StandardTrainingSAE(
        StandardTrainingSAEConfig(
            d_in=d, d_sae=m, device=str(setup.device), l1_coefficient=l1_coefficient, l1_warm_up_steps=round(tc.l1_warmup * n)
        )
    )
    trainer_cfg = SAETrainerConfig(
        total_training_samples=n * setup.batch_size,
        train_batch_size_samples=setup.batch_size,
        lr=tc.lr,
        lr_end=tc.lr,
        lr_scheduler_name="constant",
        lr_warm_up_steps=round(tc.lr_warmup * n),
        lr_decay_steps=round(tc.lr_decay_fraction * n) if tc.lr_decay == "linear" else 0,
        device=str(setup.device),
        logger=LoggingConfig(log_to_wandb=False),
    )
    tracker = Tracker(setup, Stopwatch(setup.device))
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=_checked_batches(setup, tracker, sae))
    tracker.watch.start()
    try:
        with mock.patch.object(sae_trainer, "tqdm", partial(tqdm, disable=True)):  # no progress bar, as saekit's run
            trainer.fit()
        tracker.check(trainer.n_training_samples, sae.W_dec.detach(), sae.encode)  # fit ends after its last step
    except _Reached:
        pass
    tracker.watch.stop()
    return tracker.result("saelens", f"sae_lens {saelens_version()} SAETrainer.fit, StandardTrainingSAE (its full trainer)")


# -- the run ------------------------------------------------------------------------------------------------------


def recipe(config: str, overrides: list[str], max_samples: int | None) -> Config:
    """The saekit config of the one ReLU SAE all trainers train; train.samples = max_samples when given."""
    cfg = load_config(config, overrides)
    if max_samples is not None:
        cfg.train.samples = max_samples
    if len(expand_grid(cfg)) != 1 or cfg.sae.arch != "relu":
        raise SystemExit("the recipe must describe one ReLU SAE (no lists in sae.dict_size, sae.l1 or train.seeds)")
    return cfg


def make_setup(cfg: Config, args: argparse.Namespace, peers: bool) -> Setup:
    """The source, its truth, the held-out batch and (for the peers) the pre-generated training batches."""
    device = resolve_device(cfg.train.device, "train.device")
    source = make_source(cfg.source, device)
    if source.ground_truth is None:
        raise SystemExit("the source has no known features to score MMCS against")
    B = cfg.train.batch_size
    n_steps = math.ceil(cfg.train.samples / B)
    setup = Setup(
        cfg=cfg,
        source=source,
        truth=source.ground_truth.to(device).float(),
        x_eval=source.batch(args.eval_samples, 0, Stream.EVAL),
        device=device,
        n_steps=n_steps,
        steps_per_check=max(1, round(args.check_every / B)),
        target=args.target_mmcs,
        max_dead=args.max_dead,
    )
    if args.peers_at == "report":
        setup.peer_train = cfg.train.model_copy(update=REPORT_TRAIN)
    if peers:
        n_pool = min(n_steps, math.ceil(args.pool_samples / B))
        setup.pool = torch.empty(n_pool, B, source.d, device=device)  # filled in place: no second copy of the pool
        for t in range(n_pool):
            setup.pool[t] = source.batch(B, t, Stream.TRAIN)
    return setup


def add_ratios(results: dict[str, dict[str, Any]]) -> float | None:
    """Set each row's `ratio_to_fastest_peer` (seconds over the fastest peer's that reached the target); returns that time."""
    peer_times = [r["seconds"] for name, r in results.items() if name in PEERS and r.get("reached")]
    fastest = min(peer_times, default=None)
    for r in results.values():
        r["ratio_to_fastest_peer"] = r["seconds"] / fastest if fastest and r.get("seconds") is not None else None
    return fastest


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every requested trainer, one after the other, in this process."""
    trainers = [t.strip() for t in args.trainers.split(",") if t.strip()]
    unknown = [t for t in trainers if t not in TRAINERS]
    if unknown:
        raise SystemExit(f"unknown trainer(s) {unknown}; choose among {', '.join(TRAINERS)}")
    cfg = recipe(args.config, args.set, args.max_samples)
    sl_version = saelens_version() if "saelens" in trainers else None
    peers = "plain" in trainers or ("saelens" in trainers and sl_version is not None)
    setup = make_setup(cfg, args, peers)
    runners = {"saekit": run_saekit, "plain": run_plain, "saelens": run_saelens}
    results: dict[str, dict[str, Any]] = {}
    for name in trainers:
        if name == "saelens" and sl_version is None:
            results[name] = {"trainer": name, "status": "not installed", "reached": False, "seconds": None}
            continue
        random.seed(cfg.train.seed)
        np.random.seed(cfg.train.seed)
        torch.manual_seed(cfg.train.seed)
        results[name] = runners[name](setup)
    fastest = add_ratios(results)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "sae_lens": sl_version,
        "device": str(setup.device),
        "recipe": {
            "config": str(args.config),
            "overrides": list(args.set),
            "train": cfg.train.model_dump(),
            "sae": cfg.sae.relevant(),
        },
        "peers_at": args.peers_at,
        "peer_train": {k: getattr(setup.peers, k) for k in ("lr", "lr_decay", "lr_decay_fraction", "lr_warmup")},
        "data": {"d": setup.source.d, "n_features": setup.truth.shape[0], "eval_samples": setup.x_eval.shape[0]},
        "target": {"mmcs": args.target_mmcs, "dead_fraction_below": args.max_dead},
        "max_samples": setup.n_steps * setup.batch_size,
        "check_every": setup.steps_per_check * setup.batch_size,
        "pool_samples": None if setup.pool is None else setup.pool.shape[0] * setup.batch_size,
        "fastest_peer_seconds": fastest,
        "results": results,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--trainers", default=",".join(TRAINERS), help="comma-separated among saekit, plain, saelens")
    ap.add_argument("--config", default=str(FAST), help="saekit config of the recipe (default: saekit's fast recipe)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override after the defaults (repeatable)")
    ap.add_argument("--max-samples", type=int, default=None, help="training samples at most (default: the recipe's train.samples)")
    ap.add_argument("--check-every", type=int, default=51_200, help="samples between checks (rounded to whole batches)")
    ap.add_argument("--eval-samples", type=int, default=20_000, help="held-out samples on which a latent must fire once to be alive")
    ap.add_argument("--pool-samples", type=int, default=1_000_000, help="pre-generated training samples for plain and saelens (cycled)")
    ap.add_argument("--target-mmcs", type=float, default=0.99)
    ap.add_argument("--max-dead", type=float, default=0.10, help="the dead fraction must be below this")
    ap.add_argument(
        "--peers-at",
        choices=("recipe", "report"),
        default="recipe",
        help="the peers' lr and schedule: the recipe's (configs/toy_fast.yaml: lr 2e-3, linear decay) or the report's (lr 1e-3, constant)",
    )
    ap.add_argument("--json", action="store_true")
    return ap.parse_args(argv)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(out: dict[str, Any]) -> None:
    """A line per trainer: samples and seconds to the target (or the best MMCS seen), dead fraction, ratio."""
    r = out["recipe"]
    print(f"{out['date']}  threads {out['threads']}  torch {out['torch']}  sae_lens {out['sae_lens'] or 'not installed'}  {out['device']}")
    print(f"recipe: {r['config']} + {' '.join(r['overrides'])}")
    print(
        f"target: MMCS >= {out['target']['mmcs']} with dead < {out['target']['dead_fraction_below']:.0%} "
        f"(d={out['data']['d']}, G={out['data']['n_features']}, m={r['sae']['dict_size']}), checks every {out['check_every']:,} "
        f"samples on {out['data']['eval_samples']:,} held-out samples, at most {out['max_samples']:,} samples"
    )
    for name, row in out["results"].items():
        if row["status"] == "not installed":
            print(f"{name:8s} not installed")
            continue
        if row["reached"]:
            head = f"{row['samples']:>10,} samples {row['seconds']:8.2f} s  {_fmt(row['ratio_to_fastest_peer'], '.2f')}x fastest peer"
        else:
            best = _fmt(row["best_mmcs"], ".4f")
            head = f"not reached by {row['samples_trained']:,} samples ({row['train_seconds']:.1f} s), best MMCS {best}"
        tail = f"final MMCS {_fmt(row['final_mmcs'], '.4f')}, dead {_fmt(row['final_dead_fraction'], '.3f')}"
        rate = f"{_fmt(row['samples_per_second'], ',.0f')} samples/s"
        status = "" if row["status"] == "ok" else f"  [{row['status']}]"
        print(f"{name:8s} {head}; {tail}; {rate}  ({row['how']}){status}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the flags, set the thread count and seeds, run and print; returns the results."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    out = run(args)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print_table(out)
    return out


if __name__ == "__main__":
    main()
