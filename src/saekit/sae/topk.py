"""TopK sparse autoencoders: z = ReLU(TopK(W_e^T (x - b_d) + b_e)), x_hat = W_d z + b_d.

Gao et al. (2024), "Scaling and evaluating sparse autoencoders". Each sample
keeps its k largest pre-activations (the rest are zeroed), so the sparsity is
set directly by k instead of by a penalty. Decoder rows are kept at unit norm
(the base class's hooks), the encoder starts as the decoder's transpose, and an
auxiliary loss (AuxK) gives latents that have stopped firing a gradient:

    AuxK = mean over batch and d of (e_hat - e)^2,   e = x - x_hat (detached),
    e_hat = W_d^T ReLU(top aux_k pre-activations among dead latents)  (no bias)

A latent is dead when it has not fired for `dead_after` training samples; the
count lives in the persistent buffer `samples_since_fired` (K, m), so it
survives checkpoints. The total loss is reconstruction + aux_coef * AuxK (Gao et al.
use aux_coef = 1/32 and a 10M-token window; the defaults here, in saekit.archspec,
are what the toy data needed), with
the reconstruction term the same MSE (mean over batch and d) as the ReLU SAE;
Gao et al. normalise both terms by the input variance instead, which leaves
their ratio, and with Adam the training, unchanged.

Members of an ensemble may have different k: every member takes the top
max(k) and zeroes its ranks at and beyond its own k.
"""

from __future__ import annotations

import torch

from saekit.archspec import TOPK
from saekit.sae.base import SparseAutoencoder
from saekit.sae.sparse_decode import decode_topk

DEFAULTS = TOPK.constructor_defaults()


class TopKSAE(SparseAutoencoder):
    """K TopK SAEs of width `dict_size` on inputs of width `d`, member i keeping k[i] latents per sample.

    W_enc: (K, d, m), b_enc: (K, m), W_dec: (K, m, d) with unit rows, b_dec: (K, d) when `decoder_bias`.
    Buffers: `k_per_member` (K,) (not saved: it is in cfg.json), `samples_since_fired` (K, m) (saved).
    `aux_k` = None means d // 2.
    """

    arch = "topk"
    member_keys = ("seeds", "k")

    def __init__(
        self,
        d: int,
        dict_size: int,
        seeds: list[int],
        k: list[int],
        aux_k: int | None = DEFAULTS["aux_k"],
        aux_coef: float = DEFAULTS["aux_coef"],
        dead_after: int = DEFAULTS["dead_after"],
        decoder_bias: bool = DEFAULTS["decoder_bias"],
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__()
        if len(k) != len(seeds):
            raise ValueError("one k per member")
        if any(int(v) != v or not 0 < v <= dict_size for v in k):
            raise ValueError(f"every k must be an integer in 1..dict_size ({dict_size}), got {list(k)}")
        if aux_k is not None and aux_k <= 0:
            raise ValueError(f"aux_k must be positive, got {aux_k}")
        if aux_coef < 0 or dead_after <= 0:
            raise ValueError("aux_coef must be >= 0 and dead_after > 0")
        self.k_values = [int(v) for v in k]
        self.aux_k, self.aux_coef, self.dead_after = aux_k, float(aux_coef), int(dead_after)
        self.init_dictionary(d, dict_size, seeds, decoder_bias, device)
        self.register_buffer("k_per_member", torch.tensor(self.k_values, device=device), persistent=False)  # (K,)
        self.register_buffer("samples_since_fired", torch.zeros(self.n_members, dict_size, dtype=torch.long, device=device))

    # -- construction -------------------------------------------------------------------------

    def init_kwargs(self) -> dict:
        return {
            "d": self.d,
            "dict_size": self.dict_size,
            "seeds": list(self.seeds),
            "k": list(self.k_values),
            "aux_k": self.aux_k,
            "aux_coef": self.aux_coef,
            "dead_after": self.dead_after,
            "decoder_bias": self.b_dec is not None,
        }

    @property
    def n_aux(self) -> int:
        """Latents the AuxK loss reconstructs the residual from: aux_k (default d // 2), at most dict_size."""
        return min(self.aux_k if self.aux_k is not None else max(1, self.d // 2), self.dict_size)

    # -- encoding and decoding ----------------------------------------------------------------

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, d) shared by all members, or (K, B, d) -> W_enc^T (x - b_dec) + b_enc: (K, B, m).

        Computed as x W_enc + (b_enc - b_dec W_enc), so that b_dec's gradient costs a (1, m) x (m, d) product
        instead of a (B, m) x (m, d) one."""
        bias = self.b_enc[:, None, :]  # (K, 1, m)
        if self.b_dec is not None:
            bias = bias - torch.bmm(self.b_dec[:, None, :], self.W_enc)
        return torch.matmul(x, self.W_enc) + bias

    def top_k(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pre: (K, B, m) -> (values (K, B, max k), indices (K, B, max k)): each member's top k[i] pre-activations
        through a ReLU; ranks at and beyond a member's own k have value 0."""
        values, indices = pre.topk(max(self.k_values), dim=2, sorted=True)
        values = values.relu()
        if min(self.k_values) < values.shape[2]:
            kept = torch.arange(values.shape[2], device=pre.device)[None, :] < self.k_per_member[:, None]  # (K, max k)
            values = values * kept[:, None, :]
        return values, indices

    def _dense(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Sparse codes (K, B, j) at `indices` -> dense codes (K, B, m)."""
        K, B, _ = values.shape
        return torch.zeros(K, B, self.dict_size, dtype=values.dtype, device=values.device).scatter(2, indices, values)

    def _decode_sparse(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """(values, indices) (K, B, j) -> x_hat (K, B, d), decoding only the kept latents."""
        x_hat = decode_topk(values, indices, self.W_dec)
        return x_hat if self.b_dec is None else x_hat + self.b_dec[:, None, :]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, d) or (K, B, d) -> dense codes c: (K, B, m) with at most k[i] nonzeros per sample."""
        return self._dense(*self.top_k(self.pre_activations(x)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, d) -> (x_hat (K, B, d), c (K, B, m)); the reconstruction is decoded sparsely."""
        values, indices = self.top_k(self.pre_activations(x))
        return self._decode_sparse(values, indices), self._dense(values, indices)

    # -- training -----------------------------------------------------------------------------

    def dead_latents(self) -> torch.Tensor:
        """(K, m) bool: latents that have not fired for at least `dead_after` training samples."""
        return self.samples_since_fired >= self.dead_after

    @torch.no_grad()
    def record_firing(self, fired: torch.Tensor, batch_size: int) -> None:
        """Count a training batch of `batch_size` samples: latents that fired (fired: (K, m) bool) restart at 0."""
        self.samples_since_fired.add_(batch_size).masked_fill_(fired, 0)

    def auxk_loss(self, pre: torch.Tensor, dead: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """AuxK per member, (K,): mean over batch and d of (e_hat - residual)^2, where e_hat decodes (without
        bias) the ReLU of the top `n_aux` pre-activations among the dead latents. 0 for a member with none dead.

        pre: (K, B, m); dead: (K, m) bool; residual: (K, B, d), the main reconstruction's error x - x_hat, detached.
        """
        has_dead = dead.any(dim=1)  # (K,)
        if not bool(has_dead.any()):
            return torch.zeros(pre.shape[0], device=pre.device, dtype=pre.dtype)
        masked = pre.masked_fill(~dead[:, None, :], float("-inf"))
        values, indices = masked.topk(self.n_aux, dim=2, sorted=False)
        values = values.relu()  # live latents (-inf) and negative pre-activations contribute nothing
        e_hat = decode_topk(values, indices, self.W_dec)
        aux = (e_hat - residual).pow(2).mean(dim=(1, 2))
        return torch.where(has_dead, aux, torch.zeros_like(aux))

    def train_reconstruction(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The training path from pre-activations (K, B, m): (x_hat (K, B, d), dense codes (K, B, m) detached,
        fired (K, m) bool)."""
        values, indices = self.top_k(pre)
        codes = self._dense(values.detach(), indices)
        return self._decode_sparse(values, indices), codes, (codes > 0).any(dim=1)

    def training_loss(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """{'reconstruction', 'sparsity' (the AuxK loss), 'loss', each (K,), 'codes' (K, B, m) detached}.

        Which latents are dead is decided before this batch; the batch then updates the firing counts."""
        dead = self.dead_latents()
        pre = self.pre_activations(x)
        x_hat, codes, fired = self.train_reconstruction(pre)
        reconstruction = (x_hat - x).pow(2).mean(dim=(1, 2))
        aux = self.auxk_loss(pre, dead, (x - x_hat).detach()) if self.aux_coef > 0 else torch.zeros_like(reconstruction)
        self.record_firing(fired, x.shape[-2])
        return {"reconstruction": reconstruction, "sparsity": aux, "loss": reconstruction + self.aux_coef * aux, "codes": codes}

    def loss_terms(self, x: torch.Tensor, x_hat: torch.Tensor, c: torch.Tensor) -> dict[str, torch.Tensor]:
        """{'reconstruction', 'sparsity', 'loss'}, each (K,), of a forward pass; 'sparsity' (AuxK) is 0 here because
        it needs the pre-activations and the dead set of training (see `training_loss`)."""
        reconstruction = (x_hat - x).pow(2).mean(dim=(1, 2))
        zeros = torch.zeros_like(reconstruction)
        return {"reconstruction": reconstruction, "sparsity": zeros, "loss": reconstruction}

    @torch.no_grad()
    def resample_latents(self, dead: torch.Tensor, x: torch.Tensor, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> int:
        """The base class's resampling (same parameter layout); resampled latents also restart their firing count."""
        count = super().resample_latents(dead, x, optimizer, generator)
        self.samples_since_fired.masked_fill_(dead, 0)
        return count
