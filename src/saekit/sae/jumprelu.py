"""JumpReLU SAEs (Rajamanoharan et al. 2024, "Jumping Ahead: Improving Reconstruction Fidelity with JumpReLU
Sparse Autoencoders"): c = z * H(z - theta) with a learned threshold theta per latent, trained on
reconstruction + lambda * L0.

The step H has no useful gradient, so both places it appears use the paper's straight-through
pseudo-derivatives with respect to theta, with a kernel K of bandwidth eps:

    d/dtheta [z H(z - theta)] ~ -(theta / eps) K((z - theta) / eps)
    d/dtheta [H(z - theta)]   ~ -(1 / eps) K((z - theta) / eps)

where K is the rectangle kernel, 1 on |u| < 1/2 and 0 elsewhere. With respect to z, the JumpReLU passes
the gradient where it fires (H(z - theta)) and the L0 step passes none.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from saekit.archspec import JUMPRELU
from saekit.sae.base import SparseAutoencoder

DEFAULTS = JUMPRELU.constructor_defaults()


def rectangle_window(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """K((z - theta) / eps) for the rectangle kernel: 1.0 where |z - theta| < eps / 2, else 0.0.

    pre: (K, B, m); threshold: (K, m). Returns (K, B, m) of pre's dtype."""
    return ((pre - threshold[:, None, :]).abs() < bandwidth / 2).to(pre.dtype)


class JumpReLUFunction(torch.autograd.Function):
    """c = z * H(z - theta); dc/dz = H(z - theta); dc/dtheta ~ -(theta / eps) K((z - theta) / eps).

    forward(pre (K, B, m), threshold (K, m), bandwidth: float) -> codes (K, B, m)."""

    @staticmethod
    def forward(ctx, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        fires = pre > threshold[:, None, :]
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * fires

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        pre, threshold = ctx.saved_tensors
        g_pre = g_threshold = None
        if ctx.needs_input_grad[0]:
            g_pre = g * (pre > threshold[:, None, :])
        if ctx.needs_input_grad[1]:
            window = rectangle_window(pre, threshold, ctx.bandwidth)
            g_threshold = -(threshold / ctx.bandwidth) * (g * window).sum(dim=1)
        return g_pre, g_threshold, None


class StepFunction(torch.autograd.Function):
    """H(z - theta) (1.0 where z > theta); no gradient to z; dH/dtheta ~ -(1 / eps) K((z - theta) / eps).

    forward(pre (K, B, m), threshold (K, m), bandwidth: float) -> (K, B, m) of zeros and ones."""

    @staticmethod
    def forward(ctx, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold[:, None, :]).to(pre.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[None, torch.Tensor | None, None]:
        pre, threshold = ctx.saved_tensors
        g_threshold = None
        if ctx.needs_input_grad[1]:
            window = rectangle_window(pre, threshold, ctx.bandwidth)
            g_threshold = -(g * window).sum(dim=1) / ctx.bandwidth
        return None, g_threshold, None


class JumpReLUSAE(SparseAutoencoder):
    """K JumpReLU SAEs of width `dict_size` on inputs of width `d`.

    W_enc: (K, d, m), b_enc: (K, m), log_threshold: (K, m) (theta = exp(log_threshold), so it stays
    positive), W_dec: (K, m, d), b_dec: (K, d) when `decoder_bias`.
    pre = W_enc^T (x - b_dec) + b_enc; c = pre * H(pre - theta); x_hat = W_dec^T c + b_dec.
    Loss = MSE (mean over batch and d, as the ReLU SAE) + l0_coef * L0, where L0 is the number of active
    latents per sample averaged over the batch. `decoder_norm="unit"` keeps decoder rows at unit norm
    (the default); "free" leaves them unconstrained, which the L0 penalty allows because it does not
    depend on the scale of the codes.
    """

    arch = "jumprelu"
    member_keys = ("seeds", "l0_coef")

    def __init__(
        self,
        d: int,
        dict_size: int,
        seeds: list[int],
        l0_coef: list[float],
        bandwidth: float = DEFAULTS["bandwidth"],
        init_threshold: float = DEFAULTS["init_threshold"],
        decoder_bias: bool = DEFAULTS["decoder_bias"],
        decoder_norm: Literal["unit", "free"] = "unit",
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__()
        if len(l0_coef) != len(seeds):
            raise ValueError("one l0_coef per member")
        if not bandwidth > 0 or not init_threshold > 0:
            raise ValueError("bandwidth and init_threshold must be positive")
        if decoder_norm not in ("unit", "free"):
            raise ValueError(f"decoder_norm must be 'unit' or 'free', got {decoder_norm!r}")
        self.bandwidth, self.init_threshold = float(bandwidth), float(init_threshold)
        self.decoder_norm = decoder_norm
        self.unit_decoder = decoder_norm == "unit"
        self.init_dictionary(d, dict_size, seeds, decoder_bias, device)
        self.log_threshold = nn.Parameter(torch.full((self.n_members, dict_size), math.log(init_threshold), device=device))
        self.l0_values = [float(a) for a in l0_coef]
        self.register_buffer("l0_coef", torch.tensor(self.l0_values, dtype=torch.float32, device=device))  # (K,)

    def init_kwargs(self) -> dict:
        return {
            "d": self.d,
            "dict_size": self.dict_size,
            "seeds": list(self.seeds),
            "l0_coef": list(self.l0_values),
            "bandwidth": self.bandwidth,
            "init_threshold": self.init_threshold,
            "decoder_bias": self.b_dec is not None,
            "decoder_norm": self.decoder_norm,
        }

    def threshold(self) -> torch.Tensor:
        """theta: (K, m), positive."""
        return self.log_threshold.exp()

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, d) or (K, B, d) -> W_enc^T (x - b_dec) + b_enc: (K, B, m)."""
        if self.b_dec is not None:
            x = x - self.b_dec[:, None, :]
        return torch.matmul(x, self.W_enc) + self.b_enc[:, None, :]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, d) or (K, B, d) -> codes (K, B, m); differentiable in theta through the STE."""
        return JumpReLUFunction.apply(self.pre_activations(x), self.threshold(), self.bandwidth)

    def sparsity_coef(self) -> torch.Tensor:
        return self.l0_coef

    def sparsity_term(self, c: torch.Tensor) -> torch.Tensor:
        """L0 per member, (K,): active latents per sample, averaged over the batch (no gradient)."""
        return (c != 0).sum(dim=2).to(c.dtype).mean(dim=1)

    def loss_terms(self, x: torch.Tensor, x_hat: torch.Tensor, c: torch.Tensor) -> dict[str, torch.Tensor]:
        """{'reconstruction', 'sparsity', 'loss'}, each (K,), from codes alone: the L0 here carries no gradient
        (training uses `training_loss`, whose L0 goes through the step's straight-through estimator)."""
        reconstruction = (x_hat - x).pow(2).mean(dim=(1, 2))
        sparsity = self.sparsity_term(c)
        return {
            "reconstruction": reconstruction,
            "sparsity": sparsity,
            "loss": reconstruction + (self.sparsity_scale * self.l0_coef) * sparsity,
        }

    def training_loss(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Reconstruction + sparsity_scale * l0_coef * L0, with both steps' theta gradients from the STE."""
        pre = self.pre_activations(x)
        theta = self.threshold()
        c = JumpReLUFunction.apply(pre, theta, self.bandwidth)
        reconstruction = (self.decode(c) - x).pow(2).mean(dim=(1, 2))
        l0 = StepFunction.apply(pre, theta, self.bandwidth).sum(dim=2).mean(dim=1)
        loss = reconstruction + (self.sparsity_scale * self.l0_coef) * l0
        return {"reconstruction": reconstruction, "sparsity": l0, "loss": loss, "codes": c.detach()}

    @torch.no_grad()
    def resample_latents(self, dead: torch.Tensor, x: torch.Tensor, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> int:
        """The base class's resampling (encoder, decoder, b_enc), and the resampled latents' thresholds back at
        `init_threshold` with their Adam moments zeroed (a threshold grown while dead would keep them silent)."""
        count = super().resample_latents(dead, x, optimizer, generator)
        self.log_threshold[dead] = math.log(self.init_threshold)
        state = optimizer.state.get(self.log_threshold, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][dead] = 0.0
        return count
