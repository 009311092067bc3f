"""Final evaluation of trained SAEs on a fresh window of samples, and recovery of known features."""

from __future__ import annotations

import torch

from saekit.metrics import dead_fraction, dense_fraction, mmcs, recovered_fraction
from saekit.metrics.window import WindowStats
from saekit.sae.base import SparseAutoencoder
from saekit.sources import Source, Stream

MIN_EVAL_BATCH = 4096  # evaluation batches have at least this many rows (more when training's are larger)


def eval_batch_size(train_batch_size: int) -> int:
    """Rows of an evaluation batch after training with batches of `train_batch_size`."""
    return max(train_batch_size, MIN_EVAL_BATCH)


def evaluate(sae: SparseAutoencoder, source: Source, n_samples: int, batch_size: int) -> list[dict[str, float]]:
    """Per-member metrics of `evaluate_window` (without the fire counts)."""
    return evaluate_window(sae, source, n_samples, batch_size)[0]


@torch.no_grad()
def evaluate_window(sae: SparseAutoencoder, source: Source, n_samples: int, batch_size: int) -> tuple[list[dict[str, float]], torch.Tensor]:
    """(rows, fire_counts (K, m)). Rows per member: mse, fvu, l0, dead_fraction, dense_fraction, reconstruction/sparsity/l1 terms over
    `n_samples` fresh samples of the evaluation stream; with ground truth also mmcs (truth -> dictionary),
    mmcs_dict (dictionary -> truth), recovered_0_9 and recovered_0_9_matched."""
    stats = WindowStats(sae.n_members, sae.d, sae.dict_size, device=sae.W_dec.device)
    step, seen = 0, 0
    penalty = torch.zeros(sae.n_members, dtype=torch.float64, device=sae.W_dec.device)  # sum over batches of rows x mean term
    while seen < n_samples:
        x = source.batch(batch_size, step, Stream.EVAL)[: n_samples - seen]
        x_hat, c = sae(x)
        stats.update(x, x_hat, c)
        penalty += sae.sparsity_term(c).double() * x.shape[0]
        seen += x.shape[0]
        step += 1
    mse, fvu, l0 = stats.mse(), stats.fvu(), stats.l0()
    sparsity = penalty / max(seen, 1)
    l1_coef = sae.sparsity_coef().detach()
    truth = source.ground_truth
    directions = sae.directions()
    rows = []
    for k in range(sae.n_members):
        row = {
            "mse": mse[k].item(),
            "fvu": fvu[k].item(),
            "l0": l0[k].item(),
            "dead_fraction": dead_fraction(stats.fire_counts[k]),
            "dense_fraction": dense_fraction(stats.fire_counts[k], stats.n),
            "reconstruction_loss": mse[k].item(),
            "sparsity_loss": sparsity[k].item(),
            "l1_loss": (l1_coef[k].double() * sparsity[k]).item(),
            "eval_samples": stats.n,
        }
        if truth is not None:
            row["mmcs"] = mmcs(directions[k], truth)
            row["mmcs_dict"] = mmcs(truth, directions[k])
            row["recovered_0_9"] = recovered_fraction(directions[k], truth, 0.9, "max")
            row["recovered_0_9_matched"] = recovered_fraction(directions[k], truth, 0.9, "matched")
        rows.append(row)
    return rows, stats.fire_counts
