"""Final evaluation of trained SAEs on a fresh window of samples, and recovery of known features."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from saekit.metrics import dead_fraction, dense_fraction, mmcs, recovered_fraction
from saekit.metrics.truth_window import TRUTH_KEYS, TruthWindow
from saekit.metrics.window import WindowStats
from saekit.sae.base import SparseAutoencoder
from saekit.sources import Source, Stream

MIN_EVAL_BATCH = 4096  # evaluation batches have at least this many rows (more when training's are larger)

# Keys the evaluation added after the first layout of `saekit train --json`: printed after the older keys, in this order.
LATER_KEYS = ("shrinkage", *TRUTH_KEYS)


def eval_batch_size(train_batch_size: int) -> int:
    """Rows of an evaluation batch after training with batches of `train_batch_size`."""
    return max(train_batch_size, MIN_EVAL_BATCH)


def evaluate(sae: SparseAutoencoder, source: Source, n_samples: int, batch_size: int) -> list[dict[str, float]]:
    """Per-member metrics of `evaluate_window` (without the fire counts)."""
    return evaluate_window(sae, source, n_samples, batch_size)[0]


def eval_batches(source: Any, n_samples: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """(x (B, d), true codes (B, G) or None) over `n_samples` rows of the evaluation stream. Codes come from the
    source's `batch_with_codes` where it has one that gives them (x is then the same as `batch`'s)."""
    with_codes = getattr(source, "batch_with_codes", None)
    step, seen = 0, 0
    while seen < n_samples:
        pair = with_codes(batch_size, step, Stream.EVAL) if with_codes is not None else None
        if pair is None:
            with_codes = None  # this source gives no codes (e.g. a fixed dataset): plain batches from here on
            x, codes = source.batch(batch_size, step, Stream.EVAL), None
        else:
            x, codes = pair
        left = n_samples - seen
        yield x[:left], None if codes is None else codes[:left]
        seen += min(left, x.shape[0])
        step += 1


@torch.no_grad()
def evaluate_window(sae: SparseAutoencoder, source: Source, n_samples: int, batch_size: int) -> tuple[list[dict[str, float]], torch.Tensor]:
    """(rows, fire_counts (K, m)). Rows per member: mse, fvu, l0, dead_fraction, dense_fraction, reconstruction/sparsity/l1
    terms and shrinkage over `n_samples` fresh samples of the evaluation stream; with ground truth also mmcs (truth ->
    dictionary), mmcs_dict (dictionary -> truth), recovered_0_9, recovered_0_9_matched, mcc and uniqueness; where the
    source gives true codes (`batch_with_codes`) also precision, recall, f1, split and, when a feature has a parent
    (`source.parent`), absorption (`saekit.metrics.truth_window`)."""
    device = sae.W_dec.device
    stats = WindowStats(sae.n_members, sae.d, sae.dict_size, device=device)
    truth = source.ground_truth
    known = None if truth is None else TruthWindow(sae.directions(), truth.to(device), getattr(source, "parent", None))
    penalty = torch.zeros(sae.n_members, dtype=torch.float64, device=device)  # sum over batches of rows x mean term
    for x, codes in eval_batches(source, n_samples, batch_size):
        x_hat, c = sae(x)
        stats.update(x, x_hat, c)
        penalty += sae.sparsity_term(c).double() * x.shape[0]
        if known is not None and codes is not None:
            known.update(c, codes.to(device))
    rows = _window_rows(sae, stats, penalty / max(stats.n, 1))
    if truth is not None:
        _add_recovery(rows, sae.directions(), truth, known.rows(stats.fire_counts))
    return rows, stats.fire_counts


def _window_rows(sae: SparseAutoencoder, stats: WindowStats, sparsity: torch.Tensor) -> list[dict[str, Any]]:
    """Per member, the metrics that need no ground truth."""
    mse, fvu, l0, shrinkage = stats.mse(), stats.fvu(), stats.l0(), stats.shrinkage()
    l1_coef = sae.sparsity_coef().detach()
    return [
        {
            "mse": mse[k].item(),
            "fvu": fvu[k].item(),
            "l0": l0[k].item(),
            "dead_fraction": dead_fraction(stats.fire_counts[k]),
            "dense_fraction": dense_fraction(stats.fire_counts[k], stats.n),
            "reconstruction_loss": mse[k].item(),
            "sparsity_loss": sparsity[k].item(),
            "l1_loss": (l1_coef[k].double() * sparsity[k]).item(),
            "eval_samples": stats.n,
            "shrinkage": shrinkage[k].item(),
        }
        for k in range(sae.n_members)
    ]


def _add_recovery(rows: list[dict[str, Any]], directions: torch.Tensor, truth: torch.Tensor, known: list[dict[str, Any]]) -> None:
    """Add to each member's row how its dictionary (K, m, d) recovers the truth (G, d), and its TruthWindow values."""
    for k, row in enumerate(rows):
        row["mmcs"] = mmcs(directions[k], truth)
        row["mmcs_dict"] = mmcs(truth, directions[k])
        row["recovered_0_9"] = recovered_fraction(directions[k], truth, 0.9, "max")
        row["recovered_0_9_matched"] = recovered_fraction(directions[k], truth, 0.9, "matched")
        row.update(known[k])
