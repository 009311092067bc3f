"""Gated SAEs (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse Autoencoders").

A gate path decides which latents fire and a magnitude path, sharing the gate's directions up to a
per-latent scale, says how strongly:

    x~ = x - b_dec
    pi_gate = W_enc^T x~ + b_gate
    pi_mag  = (exp(r_mag) * W_enc)^T x~ + b_mag = exp(r_mag) * (W_enc^T x~) + b_mag
    c = H(pi_gate > 0) * ReLU(pi_mag);  x_hat = W_dec^T c + b_dec

Loss = MSE(x, x_hat) + l1 * ||ReLU(pi_gate)||_1 + MSE(x, x_hat_aux), where x_hat_aux decodes ReLU(pi_gate)
through copies of W_dec and b_dec that get no gradient from it. The L1 and auxiliary terms are what give
the gate path gradients (H has none); the magnitudes are free of the L1 shrinkage.
"""

from __future__ import annotations

import torch
from torch import nn

from saekit.archspec import GATED
from saekit.sae.base import SparseAutoencoder

DEFAULTS = GATED.constructor_defaults()


class GatedSAE(SparseAutoencoder):
    """K gated SAEs of width `dict_size` on inputs of width `d`.

    W_enc: (K, d, m) (the gate directions), b_gate, r_mag, b_mag: (K, m), W_dec: (K, m, d), b_dec: (K, d)
    when `decoder_bias`. MSE terms are means over batch and d (as the ReLU SAE); the L1 term
    ||ReLU(pi_gate)||_1 is summed over latents and averaged over the batch.

    Decoder rows are kept at unit norm (as in the paper). A free decoder with the L1 term weighted by
    decoder norms is not offered: the penalised gate values are not the decoded magnitudes, so shrinking a
    decoder row while r_mag grows lowers the penalty at no cost; on the small toy case (d=32, G=48) it trained
    to dense codes or exploding errors (FVU 1.9 to 5.8) where the unit-norm decoder reached MMCS 0.997.
    """

    arch = "gated"
    member_keys = ("seeds", "l1")

    def __init__(
        self,
        d: int,
        dict_size: int,
        seeds: list[int],
        l1: list[float],
        decoder_bias: bool = DEFAULTS["decoder_bias"],
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__()
        if len(l1) != len(seeds):
            raise ValueError("one l1 coefficient per member")
        self.init_dictionary(d, dict_size, seeds, decoder_bias, device, encoder_bias=False)
        K = self.n_members
        self.b_gate = nn.Parameter(torch.zeros(K, dict_size, device=device))  # (K, m)
        self.r_mag = nn.Parameter(torch.zeros(K, dict_size, device=device))  # (K, m)
        self.b_mag = nn.Parameter(torch.zeros(K, dict_size, device=device))  # (K, m)
        self.l1_values = [float(a) for a in l1]
        self.register_buffer("l1_coef", torch.tensor(self.l1_values, dtype=torch.float32, device=device))  # (K,)

    def init_kwargs(self) -> dict:
        return {
            "d": self.d,
            "dict_size": self.dict_size,
            "seeds": list(self.seeds),
            "l1": list(self.l1_values),
            "decoder_bias": self.b_dec is not None,
        }

    def gate_and_magnitude(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, d) or (K, B, d) -> (pi_gate, pi_mag), each (K, B, m)."""
        if self.b_dec is not None:
            x = x - self.b_dec[:, None, :]
        projection = torch.matmul(x, self.W_enc)  # (K, B, m), shared by both paths
        pi_gate = projection + self.b_gate[:, None, :]
        pi_mag = projection * self.r_mag.exp()[:, None, :] + self.b_mag[:, None, :]
        return pi_gate, pi_mag

    @staticmethod
    def codes_from(pi_gate: torch.Tensor, pi_mag: torch.Tensor) -> torch.Tensor:
        """c = H(pi_gate > 0) * ReLU(pi_mag): (K, B, m)."""
        return torch.relu(pi_mag) * (pi_gate > 0)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, d) or (K, B, d) -> codes c: (K, B, m)."""
        return self.codes_from(*self.gate_and_magnitude(x))

    def decode_frozen(self, c: torch.Tensor) -> torch.Tensor:
        """Like `decode`, through detached W_dec and b_dec (the auxiliary path): (K, B, m) -> (K, B, d)."""
        x_hat = torch.bmm(c, self.W_dec.detach())
        if self.b_dec is not None:
            x_hat = x_hat + self.b_dec.detach()[:, None, :]
        return x_hat

    def sparsity_coef(self) -> torch.Tensor:
        return self.l1_coef

    @staticmethod
    def gate_l1(pi_gate: torch.Tensor) -> torch.Tensor:
        """||ReLU(pi_gate)||_1 per member, (K,): summed over latents, averaged over the batch."""
        return torch.relu(pi_gate).sum(dim=2).mean(dim=1)

    def sparsity_term(self, c: torch.Tensor) -> torch.Tensor:
        """The L1 term needs the gate pre-activations, which codes do not hold: from codes alone this is their
        L1 norm (summed over latents, averaged over the batch), used in evaluation."""
        return c.abs().sum(dim=2).mean(dim=1)

    def loss_terms(self, x: torch.Tensor, x_hat: torch.Tensor, c: torch.Tensor) -> dict[str, torch.Tensor]:
        """Reconstruction and the codes' L1 only (the gate terms need x's gate pre-activations: see `training_loss`)."""
        reconstruction = (x_hat - x).pow(2).mean(dim=(1, 2))
        sparsity = self.sparsity_term(c)
        return {
            "reconstruction": reconstruction,
            "sparsity": sparsity,
            "loss": reconstruction + (self.sparsity_scale * self.l1_coef) * sparsity,
        }

    def training_loss(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """{'reconstruction', 'sparsity' (the gate L1), 'auxiliary', 'loss'}, each (K,), and 'codes' (K, B, m).

        loss = reconstruction + sparsity_scale * l1 * sparsity + auxiliary."""
        pi_gate, pi_mag = self.gate_and_magnitude(x)
        c = self.codes_from(pi_gate, pi_mag)
        reconstruction = (self.decode(c) - x).pow(2).mean(dim=(1, 2))
        gate_active = torch.relu(pi_gate)
        sparsity = self.gate_l1(pi_gate)
        auxiliary = (self.decode_frozen(gate_active) - x).pow(2).mean(dim=(1, 2))
        loss = reconstruction + (self.sparsity_scale * self.l1_coef) * sparsity + auxiliary
        return {"reconstruction": reconstruction, "sparsity": sparsity, "auxiliary": auxiliary, "loss": loss, "codes": c.detach()}

    @torch.no_grad()
    def reinit_latents(self, k: int, idx: torch.Tensor, dirs: torch.Tensor, scale: torch.Tensor) -> list[tuple[nn.Parameter, tuple]]:
        """The base class's resampling (Bricken et al. 2023) for the gated layout: decoder rows `dirs`, gate
        directions dirs * scale, b_gate, b_mag and r_mag 0 (magnitude path = gate path)."""
        self.W_dec[k, idx] = dirs
        self.W_enc[k][:, idx] = dirs.T * scale
        for bias in (self.b_gate, self.r_mag, self.b_mag):
            bias[k, idx] = 0.0
        biases = [(p, (k, idx)) for p in (self.b_gate, self.r_mag, self.b_mag)]
        return [(self.W_dec, (k, idx)), (self.W_enc, (k, slice(None), idx)), *biases]
