"""The interface every SAE architecture implements, and the decoder-norm constraint they share."""

from __future__ import annotations

import torch
from torch import nn


def random_unit_rows(rows: int, cols: int, seed: int) -> torch.Tensor:
    """(rows, cols) float32 with rows drawn uniformly on the unit sphere, from a generator seeded by `seed`."""
    g = torch.Generator()
    g.manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    return w / w.norm(dim=1, keepdim=True)


class SparseAutoencoder(nn.Module):
    """K stacked SAEs.  Subclasses set `arch` and implement encode, decode and loss_terms.

    Shapes: x (B, d) or (K, B, d); codes (K, B, m); W_dec (K, m, d) whose rows
    are the dictionary directions.
    """

    arch: str = ""
    d: int
    dict_size: int
    n_members: int
    W_dec: nn.Parameter

    def init_kwargs(self) -> dict:
        """Keyword arguments that rebuild an SAE of the same shape and hyperparameters (weights aside)."""
        raise NotImplementedError

    def member(self, k: int) -> SparseAutoencoder:
        """Member k as an ensemble of one (a copy)."""
        kwargs = self.init_kwargs()
        kwargs.update({key: [kwargs[key][k]] for key in self.member_keys})
        single = type(self)(**kwargs).to(self.W_dec.device)
        single.load_state_dict({name: t[k : k + 1].clone() for name, t in self.state_dict().items()})
        return single

    member_keys: tuple[str, ...] = ("seeds",)  # init kwargs that hold one value per member

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, c: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def loss_terms(self, x: torch.Tensor, x_hat: torch.Tensor, c: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def resample_latents(self, dead: torch.Tensor, x: torch.Tensor, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> int:
        """Re-initialise the `dead` (K, m) latents from inputs x (N, d); returns how many."""
        raise NotImplementedError

    def training_loss(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss terms of a training step, each (K,), plus 'codes' (K, B, m) detached."""
        x_hat, c = self(x)
        return {**self.loss_terms(x, x_hat, c), "codes": c.detach()}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, d) -> (x_hat (K, B, d), c (K, B, m))."""
        c = self.encode(x)
        return self.decode(c), c

    def directions(self) -> torch.Tensor:
        """The dictionary: decoder rows normalised to unit length, (K, m, d), detached."""
        w = self.W_dec.detach()
        return w / w.norm(dim=2, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Project out of each decoder row's gradient its component along the row (rows are unit norm)."""
        g, w = self.W_dec.grad, self.W_dec
        if g is not None:
            g.addcmul_(w, torch.einsum("kmd,kmd->km", g, w).unsqueeze(2), value=-1.0)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale every decoder row to unit norm."""
        self.W_dec.div_(self.W_dec.norm(dim=2, keepdim=True).clamp_min(1e-12))
