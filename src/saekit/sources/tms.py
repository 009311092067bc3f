"""Ground truth from a learned low-rank model: the autoencoder of "Toy Models of Superposition".

Elhage et al. (2022): n sparse features x (each 0 with probability `sparsity`, else Uniform[0, 1)) are
compressed to d dimensions by W (d, n) and read back as x' = ReLU(W^T W x + b), trained to minimise the
importance-weighted error sum_i I_i (x_i - x'_i)^2 with I_i = importance_decay**i (Adam, lr 1e-3,
batch 1024, `model_steps` steps). The source yields the hidden activations h = W x (B, d).

Ground truth: the columns of W the model represents, normalised. A column counts as represented when
its norm is above REPRESENTED_NORM = 0.5: trained columns sit near 1 (represented) or near 0 (dropped),
with few in between (docs/guides/toy-data.md, "Ground truth from trained models").
"""

from __future__ import annotations

from pathlib import Path

import torch

from saekit.errors import InputError
from saekit.sources.model_cache import cached_model
from saekit.sources.model_training import fit, sparse_features
from saekit.sources.seeding import seeded_generator
from saekit.sources.streams import Stream

REPRESENTED_NORM = 0.5
TMS_LR = 1e-3
_INIT_STREAM = 0x746D73


def train_tms(n: int, d: int, sparsity: float, importance_decay: float, steps: int, seed: int) -> dict[str, torch.Tensor]:
    """Train the TMS autoencoder; returns {'W': (d, n), 'b': (n,), 'loss': () held-out loss}."""
    g = seeded_generator(seed, _INIT_STREAM)
    W = torch.nn.init.xavier_normal_(torch.empty(d, n), generator=g).requires_grad_()
    b = torch.zeros(n, requires_grad=True)
    importance = importance_decay ** torch.arange(n, dtype=torch.float32)

    def loss_on(x: torch.Tensor) -> torch.Tensor:
        x_hat = torch.relu(x @ W.T @ W + b)
        return ((x - x_hat).pow(2) * importance).sum(dim=1).mean()

    loss = fit([W, b], loss_on, lambda B, gen: sparse_features(B, n, sparsity, gen), steps, seed, TMS_LR)
    return {"W": W.detach(), "b": b.detach(), "loss": torch.tensor(loss)}


class TMSSource:
    """Hidden activations of a trained TMS autoencoder; `ground_truth` (G, d) = its represented columns."""

    def __init__(
        self,
        n_features: int = 80,
        d: int = 20,
        sparsity: float = 0.97,
        importance_decay: float = 0.97,
        model_steps: int = 10_000,
        seed: int = 0,
        device: str | torch.device = "cpu",
        cache_dir: str | Path | None = None,
    ) -> None:
        self.d, self.n_features, self.sparsity, self.seed = d, n_features, sparsity, seed
        self.device = torch.device(device)
        key = {"kind": "tms", "n_features": n_features, "d": d, "sparsity": sparsity, "importance_decay": importance_decay}
        key.update({"model_steps": model_steps, "seed": seed, "lr": TMS_LR})
        tensors, self.from_cache = cached_model(
            cache_dir, "tms", key, lambda: train_tms(n_features, d, sparsity, importance_decay, model_steps, seed)
        )
        self.W, self.b = tensors["W"].to(self.device), tensors["b"].to(self.device)
        self.model_loss = float(tensors["loss"])
        norms = self.W.norm(dim=0)
        self.represented: torch.Tensor = norms > REPRESENTED_NORM  # (n,) bool
        self.n_represented = int(self.represented.sum())
        if self.n_represented == 0:
            raise InputError("the tms model represents no feature (no column of W has norm > 0.5); try more source.model_steps")
        self.ground_truth: torch.Tensor = (self.W[:, self.represented] / norms[self.represented]).T.contiguous()  # (G, d)

    def batch(self, batch_size: int, step: int, stream: int = Stream.TRAIN) -> torch.Tensor:
        """Batch `step` of `stream`: h = W x for fresh sparse features x, (B, d) float32."""
        return self.batch_with_codes(batch_size, step, stream)[0]

    def batch_with_codes(self, batch_size: int, step: int, stream: int = Stream.TRAIN) -> tuple[torch.Tensor, torch.Tensor]:
        """`batch(batch_size, step, stream)` and its true codes (B, G): the input features x of the represented
        columns, in the order of `ground_truth`'s rows."""
        x = sparse_features(batch_size, self.n_features, self.sparsity, seeded_generator(self.seed, stream, step)).to(self.device)
        return x @ self.W.T, x[:, self.represented]

    def describe(self) -> dict[str, float | int]:
        """What a report needs to know about the model behind the data."""
        return {"n_features": self.n_features, "n_represented": self.n_represented, "model_loss": self.model_loss}
