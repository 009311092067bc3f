"""Ground truth from a model that computes in superposition: the hidden layer of a small MLP.

n sparse signed features x (each 0 with probability `sparsity`, else Uniform[-1, 1)) enter through a
fixed random embedding E (embed_dim, n) with unit columns, embed_dim < n. An MLP with one hidden layer
of d ReLU neurons (d < 2n, fewer than computing every |x_i| exactly would take) is trained to output
|x_i| for every feature: y = W2 ReLU(W1 E x + b1) + b2, loss sum_i I_i (y_i - |x_i|)^2 with
I_i = importance_decay**i (Adam, lr 3e-3, batch 1024, `model_steps` steps). The source yields the hidden
activations h = ReLU(W1 E x + b1) (B, d).

Ground truth, by probing the trained model with one feature at a time: for feature i and sign s the
response r_(i,s) = mean over a in {0.25, 0.5, 0.75, 1} of h(a s e_i) - h(0), where e_i is the i-th unit
input and h(0) = ReLU(b1) the hidden state with no feature active. |x| needs the two signs to be told
apart, so each feature has two directions, "+i" and "-i". A response counts as represented when its norm
is at least REPRESENTED_FRACTION = 0.2 of the largest response's; those directions, normalised, are the
ground truth (G <= 2n, rows ordered +0, -0, +1, -1, ...). The constant h(0) is not a feature: an SAE
without a decoder bias spends latents on it (docs/results.md, "Ground truth from trained models").
"""

from __future__ import annotations

from pathlib import Path

import torch

from saekit.errors import InputError
from saekit.sources.model_cache import cached_model
from saekit.sources.model_training import fit, sparse_features
from saekit.sources.seeding import seeded_generator
from saekit.sources.streams import Stream

REPRESENTED_FRACTION = 0.2
PROBE_AMPLITUDES = (0.25, 0.5, 0.75, 1.0)
COMPUTE_LR = 3e-3
_INIT_STREAM = 0x636F6D70


def _uniform(shape: tuple[int, ...], bound: float, g: torch.Generator) -> torch.Tensor:
    return (torch.rand(*shape, generator=g) * 2 - 1) * bound


def train_compute(
    n: int, embed_dim: int, d: int, sparsity: float, importance_decay: float, steps: int, seed: int
) -> dict[str, torch.Tensor]:
    """Train the MLP; returns E, W1, b1, W2, b2 and the held-out 'loss' and the 'baseline_loss' of predicting E|x|."""
    g = seeded_generator(seed, _INIT_STREAM)
    E = torch.randn(embed_dim, n, generator=g)
    E = E / E.norm(dim=0, keepdim=True)
    # nn.Linear's default init (bounds 1/sqrt(fan_in)), drawn from the seeded generator
    W1 = _uniform((d, embed_dim), embed_dim**-0.5, g).requires_grad_()
    b1 = _uniform((d,), embed_dim**-0.5, g).requires_grad_()
    W2 = _uniform((n, d), d**-0.5, g).requires_grad_()
    b2 = _uniform((n,), d**-0.5, g).requires_grad_()
    importance = importance_decay ** torch.arange(n, dtype=torch.float32)

    def sample(B: int, gen: torch.Generator) -> torch.Tensor:
        return sparse_features(B, n, sparsity, gen, signed=True)

    def loss_on(x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(x @ E.T @ W1.T + b1) @ W2.T + b2
        return ((y - x.abs()).pow(2) * importance).sum(dim=1).mean()

    loss = fit([W1, b1, W2, b2], loss_on, sample, steps, seed, COMPUTE_LR)
    # the loss of the best constant output (E[|x_i|] = (1 - sparsity) / 2), for scale
    mean_abs = (1 - sparsity) / 2
    baseline = float((importance * ((1 - sparsity) / 3 - mean_abs**2)).sum())
    tensors = {"E": E, "W1": W1, "b1": b1, "W2": W2, "b2": b2}
    return {k: v.detach() for k, v in tensors.items()} | {"loss": torch.tensor(loss), "baseline_loss": torch.tensor(baseline)}


class ComputeSource:
    """Hidden activations of an MLP trained to compute |x| in superposition; `ground_truth` from probing it."""

    def __init__(
        self,
        n_features: int = 64,
        d: int = 48,
        embed_dim: int = 32,
        sparsity: float = 0.97,
        importance_decay: float = 1.0,
        model_steps: int = 10_000,
        seed: int = 0,
        device: str | torch.device = "cpu",
        cache_dir: str | Path | None = None,
    ) -> None:
        self.d, self.n_features, self.sparsity, self.seed = d, n_features, sparsity, seed
        self.device = torch.device(device)
        key = {"kind": "compute", "n_features": n_features, "d": d, "embed_dim": embed_dim, "sparsity": sparsity}
        key.update({"importance_decay": importance_decay, "model_steps": model_steps, "seed": seed, "lr": COMPUTE_LR})
        tensors, self.from_cache = cached_model(
            cache_dir, "compute", key, lambda: train_compute(n_features, embed_dim, d, sparsity, importance_decay, model_steps, seed)
        )
        self.E, self.W1, self.b1 = (tensors[k].to(self.device) for k in ("E", "W1", "b1"))
        self.W2, self.b2 = tensors["W2"].to(self.device), tensors["b2"].to(self.device)
        self.model_loss, self.baseline_loss = float(tensors["loss"]), float(tensors["baseline_loss"])
        responses, labels = self.probe()
        norms = responses.norm(dim=1)
        if not norms.max() > 0:
            raise InputError("the compute model's hidden layer does not respond to any feature; try more source.model_steps")
        keep = norms >= REPRESENTED_FRACTION * norms.max()
        self.represented: torch.Tensor = keep  # (2n,) bool over the directions +0, -0, +1, -1, ...
        self.truth_labels = [label for label, k in zip(labels, keep.tolist()) if k]
        self.ground_truth: torch.Tensor = (responses[keep] / norms[keep, None]).contiguous()  # (G, d)
        self.n_represented = int(keep.sum())

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP's hidden activations for input features x (B, n): (B, d)."""
        return torch.relu(x @ self.E.T @ self.W1.T + self.b1)

    def probe(self) -> tuple[torch.Tensor, list[str]]:
        """Responses (2n, d) of the hidden layer to each feature alone, rows +0, -0, +1, -1, ..., and their labels."""
        n = self.n_features
        eye = torch.eye(n, device=self.device)
        base = self.hidden(torch.zeros(1, n, device=self.device))
        amps = torch.tensor(PROBE_AMPLITUDES, device=self.device)
        rows = []
        for sign in (1.0, -1.0):
            x = (sign * amps[:, None, None] * eye).reshape(-1, n)  # (A * n, n)
            rows.append((self.hidden(x) - base).reshape(len(PROBE_AMPLITUDES), n, self.d).mean(dim=0))
        responses = torch.stack(rows, dim=1).reshape(2 * n, self.d)  # interleave + and -
        labels = [f"{s}{i}" for i in range(n) for s in ("+", "-")]
        return responses, labels

    def batch(self, batch_size: int, step: int, stream: int = Stream.TRAIN) -> torch.Tensor:
        """Batch `step` of `stream`: the hidden activations for fresh sparse features, (B, d) float32."""
        return self.batch_with_codes(batch_size, step, stream)[0]

    def batch_with_codes(self, batch_size: int, step: int, stream: int = Stream.TRAIN) -> tuple[torch.Tensor, torch.Tensor]:
        """`batch(batch_size, step, stream)` and its true codes (B, G): for direction "+i" max(x_i, 0), for "-i"
        max(-x_i, 0), in the order of `ground_truth`'s rows."""
        x = sparse_features(batch_size, self.n_features, self.sparsity, seeded_generator(self.seed, stream, step), signed=True)
        x = x.to(self.device)
        signed = torch.stack([x.clamp(min=0), (-x).clamp(min=0)], dim=2).reshape(batch_size, 2 * self.n_features)
        return self.hidden(x), signed[:, self.represented]

    def describe(self) -> dict[str, float | int]:
        """What a report needs to know about the model behind the data."""
        base = self.hidden(torch.zeros(1, self.n_features, device=self.device))
        return {
            "n_features": self.n_features,
            "n_represented": self.n_represented,
            "model_loss": self.model_loss,
            "baseline_loss": self.baseline_loss,
            "hidden_at_zero_norm": float(base.norm()),
        }
