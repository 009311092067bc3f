"""The report's sparse autoencoder: c = ReLU(W_e x + b_e), x_hat = W_d c, unit-norm decoder directions.

Sharkey, Braun & Millidge (2022). Parameters are stacked on a leading member
axis K so that an ensemble of SAEs of one size trains in one batched step;
K = 1 is the ordinary case. Members never interact: the total loss is the sum
of the members' losses, and Adam is elementwise.
"""

from __future__ import annotations

from typing import Literal

import torch

from saekit.archspec import RELU
from saekit.sae.base import SparseAutoencoder
from saekit.sae.precision import bmm

DEFAULTS = RELU.constructor_defaults()


class _FusedReluLoss(torch.autograd.Function):
    """Reconstruction and L1 terms of stacked ReLU SAEs with a hand-written backward.

    Same values and gradients as autograd through encode/decode/loss_terms
    (a test checks this), but with as few passes as possible over the large
    (K, B, m) code tensors, which on a CPU cost about as much as a matmul each:
    bias and ReLU are applied in place, the constant L1 gradient is added in
    place to the decoder-gradient matmul, and the ReLU mask is one threshold_backward.
    With `weighted` (the free decoder) each latent's |c_j| is weighted by its decoder row's norm ||W_d,j||: the L1
    gradient on c becomes a (K, 1, m) row added in place, and W_d gets the norm's gradient, a (K, m) scale of its rows.
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, W_dec, b_dec, sum_over_latents: bool, weighted: bool = False):
        K, d, m = W_enc.shape
        xc = (x if b_dec is None else x - b_dec[:, None, :]).expand(K, -1, d)  # (K, B, d)
        B = xc.shape[1]
        c = bmm(xc, W_enc).add_(b_enc[:, None, :]).relu_()  # (K, B, m)
        err = bmm(c, W_dec).sub_(xc)  # x_hat - x: (K, B, d)
        reconstruction = err.pow(2).mean(dim=(1, 2))
        l1_scale = 1.0 / B if sum_over_latents else 1.0 / (B * m)
        norms = W_dec.norm(dim=2) if weighted else None  # (K, m)
        c_sum = c.sum(dim=1)  # (K, m)
        sparsity = (c_sum if norms is None else c_sum * norms).sum(dim=1) * l1_scale
        ctx.save_for_backward(xc, c, err, W_enc, W_dec, norms, c_sum)
        ctx.has_b_dec, ctx.l1_scale, ctx.x_shared = b_dec is not None, l1_scale, x.ndim == 2
        ctx.mark_non_differentiable(c)
        ctx.set_materialize_grads(False)  # no (K, B, m) tensor of zeros for c's gradient
        return reconstruction, sparsity, c

    @staticmethod
    def backward(ctx, g_rec, g_sp, _g_c):
        xc, c, err, W_enc, W_dec, norms, c_sum = ctx.saved_tensors
        K, B, m = c.shape
        d = err.shape[2]
        g_rec = torch.zeros(K, device=c.device) if g_rec is None else g_rec
        g_sp = torch.zeros(K, device=c.device) if g_sp is None else g_sp
        g_err = err * (g_rec * (2.0 / (B * d)))[:, None, None]  # dLoss/dx_hat: (K, B, d)
        g_W_dec = bmm(c.transpose(1, 2), g_err)
        # dLoss/dc = g_err W_dec^T + g_sp * l1_scale (|c| = c on the ReLU's support; times ||W_d,j|| when weighted),
        # then the ReLU mask.
        g_l1 = (g_sp * ctx.l1_scale)[:, None]  # (K, 1)
        if norms is not None:  # d/dW_d,j of c_sum_j * ||W_d,j|| = c_sum_j * W_d,j / ||W_d,j||
            g_W_dec.addcmul_(W_dec, (g_l1 * c_sum / norms.clamp_min(1e-12))[:, :, None])
            g_l1 = g_l1 * norms  # (K, m)
        g_c = bmm(g_err, W_dec.transpose(1, 2)).add_(g_l1[:, None, :])
        g_pre = torch.ops.aten.threshold_backward.grad_input(g_c, c, 0.0, grad_input=g_c)  # in place: (K, B, m)
        g_W_enc = bmm(xc.transpose(1, 2), g_pre)  # (K, d, m)
        g_b_enc = g_pre.sum(dim=1)
        g_b_dec = None
        if ctx.has_b_dec:
            g_b_dec = g_err.sum(dim=1) - bmm(g_b_enc[:, None, :], W_enc.transpose(1, 2))[:, 0]
        g_x = None
        if ctx.needs_input_grad[0]:
            g_x = bmm(g_pre, W_enc.transpose(1, 2)) - g_err
            if ctx.x_shared:
                g_x = g_x.sum(dim=0)
        return g_x, g_W_enc, g_b_enc, g_W_dec, g_b_dec, None, None


class ReluSAE(SparseAutoencoder):
    """K ReLU SAEs of width `dict_size` on inputs of width `d`.

    W_enc: (K, d, m), b_enc: (K, m), W_dec: (K, m, d) with unit rows,
    b_dec: (K, d) when `decoder_bias` (subtracted before encoding, added after decoding).
    Loss = MSE (mean over batch and d) + l1_coef * L1, where L1 is the mean of
    |c| over latents and batch (`l1_reduction="mean"`, the report) or its sum
    over latents averaged over the batch (`"sum"`). With `decoder_norm="free"`
    the decoder rows are unconstrained and each |c_j| is weighted by ||W_d,j||
    (Anthropic's 2024 update), so shrinking a row cannot buy a smaller penalty;
    its rows (and the encoder's columns) may then start at `decoder_init_norm`.
    """

    arch = "relu"
    member_keys = ("seeds", "l1")

    def __init__(
        self,
        d: int,
        dict_size: int,
        seeds: list[int],
        l1: list[float],
        l1_reduction: Literal["mean", "sum"] = DEFAULTS["l1_reduction"],
        decoder_bias: bool = DEFAULTS["decoder_bias"],
        decoder_norm: Literal["unit", "free"] = DEFAULTS["decoder_norm"],
        decoder_init_norm: float = DEFAULTS["decoder_init_norm"],
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__()
        if len(l1) != len(seeds):
            raise ValueError("one l1 coefficient per member")
        if l1_reduction not in ("mean", "sum"):
            raise ValueError(f"l1_reduction must be 'mean' or 'sum', got {l1_reduction!r}")
        if decoder_norm not in ("unit", "free"):
            raise ValueError(f"decoder_norm must be 'unit' or 'free', got {decoder_norm!r}")
        if not decoder_init_norm > 0 or (decoder_norm == "unit" and decoder_init_norm != 1):
            raise ValueError(f"decoder_init_norm must be > 0, and 1 with a unit decoder; got {decoder_init_norm!r}")
        self.l1_reduction, self.decoder_norm, self.decoder_init_norm = l1_reduction, decoder_norm, float(decoder_init_norm)
        self.unit_decoder = decoder_norm == "unit"
        self.init_dictionary(d, dict_size, seeds, decoder_bias, device)
        if self.decoder_init_norm != 1:
            with torch.no_grad():
                self.W_dec.mul_(self.decoder_init_norm)
                self.W_enc.mul_(self.decoder_init_norm)
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
            "decoder_norm": self.decoder_norm,
            "decoder_init_norm": self.decoder_init_norm,
        }

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, d) shared by all members, or (K, B, d) -> codes c: (K, B, m)."""
        if self.b_dec is not None:
            x = x - self.b_dec[:, None, :]
        return torch.relu(torch.matmul(x, self.W_enc) + self.b_enc[:, None, :])

    def sparsity_coef(self) -> torch.Tensor:
        return self.l1_coef

    def sparsity_term(self, c: torch.Tensor) -> torch.Tensor:
        """The L1 term per member, before its coefficient: (K,). With a free decoder, |c_j| * ||W_d,j||."""
        l1 = c.abs()
        if not self.unit_decoder:
            l1 = l1 * self.W_dec.norm(dim=2)[:, None, :]
        return l1.mean(dim=(1, 2)) if self.l1_reduction == "mean" else l1.sum(dim=2).mean(dim=1)

    def training_loss(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Like `loss_terms(x, *self(x))` plus 'codes', computed with a fused backward (see _FusedReluLoss)."""
        sum_over_latents, weighted = self.l1_reduction == "sum", not self.unit_decoder
        reconstruction, sparsity, c = _FusedReluLoss.apply(x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, sum_over_latents, weighted)
        loss = reconstruction + (self.sparsity_scale * self.l1_coef) * sparsity
        return {"reconstruction": reconstruction, "sparsity": sparsity, "loss": loss, "codes": c}

    def loss_terms(self, x: torch.Tensor, x_hat: torch.Tensor, c: torch.Tensor) -> dict[str, torch.Tensor]:
        """{'reconstruction': (K,), 'sparsity': (K,), 'loss': (K,)}; `loss` = reconstruction + l1_coef * sparsity."""
        reconstruction = (x_hat - x).pow(2).mean(dim=(1, 2))
        sparsity = self.sparsity_term(c)
        loss = reconstruction + (self.sparsity_scale * self.l1_coef) * sparsity
        return {"reconstruction": reconstruction, "sparsity": sparsity, "loss": loss}
