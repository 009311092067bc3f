"""The interface every SAE architecture implements, and the decoder-norm constraint they share."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from saekit.archspec import ARCH_SPECS


def random_unit_rows(rows: int, cols: int, seed: int) -> torch.Tensor:
    """(rows, cols) float32 with rows drawn uniformly on the unit sphere, from a generator seeded by `seed`."""
    g = torch.Generator()
    g.manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    return w / w.norm(dim=1, keepdim=True)


class SparseAutoencoder(nn.Module):
    """K stacked SAEs.  Subclasses set `arch` and implement encode, decode and loss_terms.

    Shapes: x (B, d) or (K, B, d); codes (K, B, m); W_dec (K, m, d) whose rows
    are the dictionary directions. Every parameter and persistent buffer has the
    member axis K first (so `member(k)` can slice the state dict).

    The training loop calls, per step: `training_loss(x)` -> backward of its
    'loss' summed over members -> `before_optimizer_step()` -> Adam ->
    `after_optimizer_step()`. With `unit_decoder`, these two keep decoder rows at
    unit norm (parallel gradient component removed, rows renormalised).
    `sparsity_scale` (0..1) is set by the loop for a warm-up of the sparsity
    coefficient; architectures without one ignore it.
    """

    arch: str = ""
    d: int
    dict_size: int
    n_members: int
    W_dec: nn.Parameter
    unit_decoder: bool = True
    sparsity_scale: float = 1.0

    def init_dictionary(
        self, d: int, dict_size: int, seeds: list[int], decoder_bias: bool, device: str | torch.device, encoder_bias: bool = True
    ) -> None:
        """Set d, dict_size, n_members, seeds and the parameters every architecture starts from: W_dec (K, m, d)
        with unit rows drawn from each member's seed, W_enc (K, d, m) its transpose, b_enc (K, m) zeros (unless
        `encoder_bias` is False) and b_dec (K, d) zeros when `decoder_bias` (else None)."""
        self.d, self.dict_size, self.n_members = d, dict_size, len(seeds)
        self.seeds = list(seeds)
        W_dec = torch.stack([random_unit_rows(dict_size, d, seed) for seed in seeds]).to(device)
        self.W_dec = nn.Parameter(W_dec)  # (K, m, d)
        self.W_enc = nn.Parameter(W_dec.transpose(1, 2).contiguous())  # (K, d, m)
        if encoder_bias:
            self.b_enc = nn.Parameter(torch.zeros(self.n_members, dict_size, device=device))  # (K, m)
        self.b_dec = nn.Parameter(torch.zeros(self.n_members, d, device=device)) if decoder_bias else None  # (K, d)

    def init_kwargs(self) -> dict:
        """Keyword arguments that rebuild an SAE of the same shape and hyperparameters (weights aside).
        They are stored in cfg.json, so values must be JSON (numbers, strings, booleans, lists)."""
        raise NotImplementedError

    @classmethod
    def config_kwargs(cls, sae_cfg: Any) -> dict:
        """The constructor's architecture options read from an `SAEConfig` (besides d, dict_size, seeds
        and the sparsity knob's per-member list): the keys of the architecture's spec, under their argument names."""
        spec = ARCH_SPECS[cls.arch]
        return {spec.params.get(key, key): getattr(sae_cfg, key) for key in spec.config_defaults if key != spec.knob}

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
        """c: (K, B, m) -> x_hat = c W_dec (+ b_dec): (K, B, d). The dense decoder every architecture shares."""
        x_hat = torch.bmm(c, self.W_dec)
        b_dec = getattr(self, "b_dec", None)
        return x_hat if b_dec is None else x_hat + b_dec[:, None, :]

    def loss_terms(self, x: torch.Tensor, x_hat: torch.Tensor, c: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def sparsity_term(self, c: torch.Tensor) -> torch.Tensor:
        """The sparsity penalty per member before its coefficient, (K,), on codes c (K, B, m);
        zeros for architectures whose sparsity is not a penalty (TopK)."""
        return torch.zeros(c.shape[0], device=c.device)

    def sparsity_coef(self) -> torch.Tensor:
        """The penalty's coefficient per member, (K,) (zeros when there is none)."""
        return torch.zeros(self.n_members, device=self.W_dec.device)

    @torch.no_grad()
    def resample_latents(
        self, dead: torch.Tensor, x: torch.Tensor, optimizer: torch.optim.Optimizer, generator: torch.Generator | list[torch.Generator]
    ) -> int:
        """Re-initialise dead latents on inputs the SAE reconstructs badly (Bricken et al. 2023, "Towards Monosemanticity").

        The loop is shared; what a re-initialised latent's parameters become is `reinit_latents`, which
        architectures with other parameters than W_enc, b_enc, W_dec, b_dec override.

        dead: (K, m) bool; x: (N, d) recent inputs. For each member, inputs are drawn with probability
        proportional to their squared reconstruction error; a dead latent's decoder row becomes the
        normalised input, its encoder column that direction scaled to 0.2 x the mean norm of the live
        encoder columns, its bias 0, and its Adam moments 0. Returns how many latents were resampled.

        `generator`: one for all members (drawn from in member order), or one per member, so that what a
        member draws does not depend on which other members share its ensemble (the training loop's way).
        """
        generators = list(generator) if isinstance(generator, (list, tuple)) else [generator] * self.n_members
        x_hat, _ = self(x)
        sq_err = (x_hat - x).pow(2).sum(dim=2)  # (K, N)
        total = 0
        for k in range(self.n_members):
            idx = dead[k].nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            weights = sq_err[k].double().cpu()
            weights = weights if weights.sum() > 0 else torch.ones_like(weights)
            picks = torch.multinomial(weights, idx.numel(), replacement=True, generator=generators[k]).to(x.device)
            xin = x[picks] if self.b_dec is None else x[picks] - self.b_dec[k]
            dirs = xin / xin.norm(dim=1, keepdim=True).clamp_min(1e-12)  # (n_dead, d)
            enc_norms = self.W_enc[k].norm(dim=0)  # (m,)
            live = ~dead[k]
            scale = 0.2 * (enc_norms[live].mean() if live.any() else torch.tensor(1.0, device=x.device))
            for param, index in self.reinit_latents(k, idx, dirs, scale):
                state = optimizer.state.get(param, {})
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in state:
                        state[key][index] = 0.0
            total += idx.numel()
        return total

    @torch.no_grad()
    def reinit_latents(self, k: int, idx: torch.Tensor, dirs: torch.Tensor, scale: torch.Tensor) -> list[tuple[nn.Parameter, tuple]]:
        """Member k's latents `idx` get decoder rows `dirs` (n, d), encoder columns dirs * scale and bias 0.
        Returns the (parameter, index) slots set, whose Adam moments the caller zeroes."""
        self.W_dec[k, idx] = dirs
        self.W_enc[k][:, idx] = dirs.T * scale
        self.b_enc[k, idx] = 0.0
        return [(self.W_dec, (k, idx)), (self.W_enc, (k, slice(None), idx)), (self.b_enc, (k, idx))]

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

    def before_optimizer_step(self) -> None:
        """After backward, before Adam: drop the decoder gradient's component along each (unit) row."""
        if self.unit_decoder:
            self.remove_parallel_grad()

    def after_optimizer_step(self) -> None:
        """After Adam: put decoder rows back on the unit sphere."""
        if self.unit_decoder:
            self.normalize_decoder()

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
