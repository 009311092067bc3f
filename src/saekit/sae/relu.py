"""The report's sparse autoencoder: c = ReLU(W_e x + b_e), x_hat = W_d c, unit-norm decoder directions.

Sharkey, Braun & Millidge (2022). Parameters are stacked on a leading member
axis K so that an ensemble of SAEs of one size trains in one batched step;
K = 1 is the ordinary case. Members never interact: the total loss is the sum
of the members' losses, and Adam is elementwise.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from saekit.sae.base import SparseAutoencoder, random_unit_rows


class _FusedReluLoss(torch.autograd.Function):
    """Reconstruction and L1 terms of stacked ReLU SAEs with a hand-written backward.

    Same values and gradients as autograd through encode/decode/loss_terms
    (a test checks this), but with as few passes as possible over the large
    (K, B, m) code tensors, which on a CPU cost about as much as a matmul each:
    bias and ReLU are applied in place, the constant L1 gradient is added in
    place to the decoder-gradient matmul, and the ReLU mask is one threshold_backward.
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, W_dec, b_dec, sum_over_latents: bool):
        K, d, m = W_enc.shape
        xc = (x if b_dec is None else x - b_dec[:, None, :]).expand(K, -1, d)  # (K, B, d)
        B = xc.shape[1]
        c = torch.bmm(xc, W_enc).add_(b_enc[:, None, :]).relu_()  # (K, B, m)
        err = torch.bmm(c, W_dec).sub_(xc)  # x_hat - x: (K, B, d)
        reconstruction = err.pow(2).mean(dim=(1, 2))
        sparsity = c.sum(dim=(1, 2)) / (B if sum_over_latents else B * m)
        ctx.save_for_backward(xc, c, err, W_enc, W_dec)
        ctx.has_b_dec, ctx.l1_scale, ctx.x_shared = b_dec is not None, (1.0 / B if sum_over_latents else 1.0 / (B * m)), x.ndim == 2
        ctx.mark_non_differentiable(c)
        ctx.set_materialize_grads(False)  # no (K, B, m) tensor of zeros for c's gradient
        return reconstruction, sparsity, c

    @staticmethod
    def backward(ctx, g_rec, g_sp, _g_c):
        xc, c, err, W_enc, W_dec = ctx.saved_tensors
        K, B, m = c.shape
        d = err.shape[2]
        g_rec = torch.zeros(K, device=c.device) if g_rec is None else g_rec
        g_sp = torch.zeros(K, device=c.device) if g_sp is None else g_sp
        g_err = err * (g_rec * (2.0 / (B * d)))[:, None, None]  # dLoss/dx_hat: (K, B, d)
        g_W_dec = torch.bmm(c.transpose(1, 2), g_err)
        # dLoss/dc = g_err W_dec^T + g_sp * l1_scale (|c| = c on the ReLU's support), then the ReLU mask.
        g_c = torch.bmm(g_err, W_dec.transpose(1, 2)).add_((g_sp * ctx.l1_scale)[:, None, None])
        g_pre = torch.ops.aten.threshold_backward.grad_input(g_c, c, 0.0, grad_input=g_c)  # in place: (K, B, m)
        g_W_enc = torch.bmm(xc.transpose(1, 2), g_pre)  # (K, d, m)
        g_b_enc = g_pre.sum(dim=1)
        g_b_dec = None
        if ctx.has_b_dec:
            g_b_dec = g_err.sum(dim=1) - torch.bmm(g_b_enc[:, None, :], W_enc.transpose(1, 2))[:, 0]
        g_x = None
        if ctx.needs_input_grad[0]:
            g_x = torch.bmm(g_pre, W_enc.transpose(1, 2)) - g_err
            if ctx.x_shared:
                g_x = g_x.sum(dim=0)
        return g_x, g_W_enc, g_b_enc, g_W_dec, g_b_dec, None


class ReluSAE(SparseAutoencoder):
    """K ReLU SAEs of width `dict_size` on inputs of width `d`.

    W_enc: (K, d, m), b_enc: (K, m), W_dec: (K, m, d) with unit rows,
    b_dec: (K, d) when `decoder_bias` (subtracted before encoding, added after decoding).
    Loss = MSE (mean over batch and d) + l1_coef * L1, where L1 is the mean of
    |c| over latents and batch (`l1_reduction="mean"`, the report) or its sum
    over latents averaged over the batch (`"sum"`).
    """

    arch = "relu"
    member_keys = ("seeds", "l1")

    def __init__(
        self,
        d: int,
        dict_size: int,
        seeds: list[int],
        l1: list[float],
        l1_reduction: Literal["mean", "sum"] = "mean",
        decoder_bias: bool = False,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__()
        if len(l1) != len(seeds):
            raise ValueError("one l1 coefficient per member")
        if l1_reduction not in ("mean", "sum"):
            raise ValueError(f"l1_reduction must be 'mean' or 'sum', got {l1_reduction!r}")
        self.d, self.dict_size, self.n_members = d, dict_size, len(seeds)
        self.l1_reduction = l1_reduction
        self.seeds = list(seeds)
        W_dec = torch.stack([random_unit_rows(dict_size, d, seed) for seed in seeds]).to(device)
        self.W_dec = nn.Parameter(W_dec)  # (K, m, d)
        self.W_enc = nn.Parameter(W_dec.transpose(1, 2).contiguous())  # (K, d, m)
        self.b_enc = nn.Parameter(torch.zeros(self.n_members, dict_size, device=device))  # (K, m)
        self.b_dec = nn.Parameter(torch.zeros(self.n_members, d, device=device)) if decoder_bias else None  # (K, d)
        self.l1_values = [float(a) for a in l1]
        self.register_buffer("l1_coef", torch.tensor(l1, dtype=torch.float32, device=device))  # (K,)

    def init_kwargs(self) -> dict:
        return {
            "d": self.d,
            "dict_size": self.dict_size,
            "seeds": list(self.seeds),
            "l1": list(self.l1_values),
            "l1_reduction": self.l1_reduction,
            "decoder_bias": self.b_dec is not None,
        }

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, d) shared by all members, or (K, B, d) -> codes c: (K, B, m)."""
        if self.b_dec is not None:
            x = x - self.b_dec[:, None, :]
        return torch.relu(torch.matmul(x, self.W_enc) + self.b_enc[:, None, :])

    def decode(self, c: torch.Tensor) -> torch.Tensor:
        """c: (K, B, m) -> x_hat: (K, B, d)."""
        x_hat = torch.bmm(c, self.W_dec)
        if self.b_dec is not None:
            x_hat = x_hat + self.b_dec[:, None, :]
        return x_hat

    def sparsity_term(self, c: torch.Tensor) -> torch.Tensor:
        """The L1 term per member, before its coefficient: (K,)."""
        l1 = c.abs()
        return l1.mean(dim=(1, 2)) if self.l1_reduction == "mean" else l1.sum(dim=2).mean(dim=1)

    def training_loss(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Like `loss_terms(x, *self(x))` plus 'codes', computed with a fused backward (see _FusedReluLoss)."""
        reconstruction, sparsity, c = _FusedReluLoss.apply(x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.l1_reduction == "sum")
        return {"reconstruction": reconstruction, "sparsity": sparsity, "loss": reconstruction + self.l1_coef * sparsity, "codes": c}

    @torch.no_grad()
    def resample_latents(self, dead: torch.Tensor, x: torch.Tensor, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> int:
        """Re-initialise dead latents on inputs the SAE reconstructs badly (Bricken et al. 2023, "Towards Monosemanticity").

        dead: (K, m) bool; x: (N, d) recent inputs. For each member, inputs are drawn with probability
        proportional to their squared reconstruction error; a dead latent's decoder row becomes the
        normalised input, its encoder column that direction scaled to 0.2 x the mean norm of the live
        encoder columns, its bias 0, and its Adam moments 0. Returns how many latents were resampled.
        """
        x_hat, _ = self(x)
        sq_err = (x_hat - x).pow(2).sum(dim=2)  # (K, N)
        total = 0
        for k in range(self.n_members):
            idx = dead[k].nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            weights = sq_err[k].double().cpu()
            weights = weights if weights.sum() > 0 else torch.ones_like(weights)
            picks = torch.multinomial(weights, idx.numel(), replacement=True, generator=generator).to(x.device)
            xin = x[picks] if self.b_dec is None else x[picks] - self.b_dec[k]
            dirs = xin / xin.norm(dim=1, keepdim=True).clamp_min(1e-12)  # (n_dead, d)
            enc_norms = self.W_enc[k].norm(dim=0)  # (m,)
            live = ~dead[k]
            scale = 0.2 * (enc_norms[live].mean() if live.any() else torch.tensor(1.0, device=x.device))
            self.W_dec[k, idx] = dirs
            self.W_enc[k][:, idx] = dirs.T * scale
            self.b_enc[k, idx] = 0.0
            for param, index in ((self.W_dec, (k, idx)), (self.W_enc, (k, slice(None), idx)), (self.b_enc, (k, idx))):
                state = optimizer.state.get(param, {})
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in state:
                        state[key][index] = 0.0
            total += idx.numel()
        return total

    def loss_terms(self, x: torch.Tensor, x_hat: torch.Tensor, c: torch.Tensor) -> dict[str, torch.Tensor]:
        """{'reconstruction': (K,), 'sparsity': (K,), 'loss': (K,)}; `loss` = reconstruction + l1_coef * sparsity."""
        reconstruction = (x_hat - x).pow(2).mean(dim=(1, 2))
        sparsity = self.sparsity_term(c)
        return {"reconstruction": reconstruction, "sparsity": sparsity, "loss": reconstruction + self.l1_coef * sparsity}
