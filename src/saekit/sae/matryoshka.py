"""Matryoshka BatchTopK sparse autoencoders: BatchTopK trained so that every prefix of the dictionary reconstructs.

Bussmann, Nabeshima, Karvonen & Nanda (2025), "Learning Multi-Level Features with Matryoshka Sparse
Autoencoders"; Nabeshima (2024), "Matryoshka Sparse Autoencoders". The dictionary's latents are split into
nested prefixes of widths w_1 < w_2 < ... < w_G = m (`prefix_sizes`, from the fractions `prefix_fractions`
of dict_size). Latents are chosen as by BatchTopK, the k*B largest ReLU activations of the whole batch over
all m latents, and the prefix reconstructions use the first w_g of them:

    x_hat_g = b_d + sum_{j < w_g} c_j W_d,j
    loss    = sum_g mean over batch and d of (x - x_hat_g)^2  +  aux_coef * AuxK

so the first latents must reconstruct on their own, which pushes the most common features into them. The
prefix errors are summed, as in the paper and SAELens (dictionary_learning averages them with weights,
1/G each by default); with Adam the two differ only in AuxK's weight relative to the reconstruction.
AuxK reconstructs the full reconstruction's residual x - x_hat_G, as in BatchTopK. Everything else is
BatchTopK's: the inference threshold (the running mean of the smallest kept activation), `encode` and
`forward` through it (x_hat = x_hat_G), the unit-norm decoder and the dead-latent counts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from saekit.archspec import MATRYOSHKA, prefix_sizes
from saekit.sae.batchtopk import BatchTopKSAE
from saekit.sae.sparse_decode import batch_topk_path, sparse_decode_flat

DEFAULTS = MATRYOSHKA.constructor_defaults()


class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    """K Matryoshka BatchTopK SAEs; member i keeps k[i]*B activations per training batch of B samples.

    Parameters and buffers as `BatchTopKSAE` (W_enc (K, d, m), b_enc (K, m), W_dec (K, m, d), b_dec (K, d),
    threshold (K,), samples_since_fired (K, m)). `prefix_fractions` (shared by the members) gives the prefix
    widths `prefix_sizes`, each fraction of dict_size rounded to the nearest integer; the last is 1 (the whole
    dictionary).
    """

    arch = "matryoshka"

    def __init__(
        self,
        d: int,
        dict_size: int,
        seeds: list[int],
        k: list[int],
        prefix_fractions: Sequence[float] = DEFAULTS["prefix_fractions"],
        aux_k: int | None = DEFAULTS["aux_k"],
        aux_coef: float = DEFAULTS["aux_coef"],
        dead_after: int = DEFAULTS["dead_after"],
        threshold_momentum: float = DEFAULTS["threshold_momentum"],
        decoder_bias: bool = DEFAULTS["decoder_bias"],
        device: str | torch.device = "cpu",
    ) -> None:
        sizes = prefix_sizes(dict_size, prefix_fractions)  # ValueError before any tensor is made
        super().__init__(d, dict_size, seeds, k, aux_k, aux_coef, dead_after, threshold_momentum, decoder_bias, device)
        self.prefix_sizes = sizes
        self.prefix_fractions = tuple(float(f) for f in prefix_fractions)

    def init_kwargs(self) -> dict:
        return {**super().init_kwargs(), "prefix_fractions": list(self.prefix_fractions)}

    # -- the nested reconstructions -----------------------------------------------------------

    def _group_bounds(self) -> list[tuple[int, int]]:
        """[(start, end)] of each group of latents, the part a prefix adds to the one before it."""
        starts = [0, *self.prefix_sizes[:-1]]
        return list(zip(starts, self.prefix_sizes))

    def _with_bias(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        """Group decodings (K, B, d) each -> prefix reconstructions: their running sums, plus b_dec."""
        out, total = [], None
        for part in parts:
            total = part if total is None else total + part
            out.append(total if self.b_dec is None else total + self.b_dec[:, None, :])
        return out

    def prefix_reconstructions(self, c: torch.Tensor) -> list[torch.Tensor]:
        """Dense codes c (K, B, m) -> [x_hat_g (K, B, d)] for every prefix g: b_d + the first w_g latents' decoding."""
        return self._with_bias([torch.bmm(c[:, :, a:b], self.W_dec[:, a:b]) for a, b in self._group_bounds()])

    def prefix_reconstructions_flat(self, values: torch.Tensor, flat_indices: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
        """BatchTopK's kept entries, values and flat_indices (K, n) into the flattened (B, m) codes -> [x_hat_g
        (K, B, d)] for every prefix g, at the cost of one decoding of the whole code.

        Sparse path (as `batch_topk_path` says for the whole dictionary): one `sparse_decode_flat` over B*G rows,
        row (b, g) holding sample b's entries of group g, then running sums over g. Dense path: the scattered
        codes' columns of each group through its rows of W_dec."""
        K, _ = values.shape
        m, G = self.dict_size, len(self.prefix_sizes)
        if batch_topk_path(values.shape[1], batch_size, self.W_dec) == "dense":
            codes = values.new_zeros(K, batch_size * m).scatter_add(1, flat_indices, values)
            return self.prefix_reconstructions(codes.view(K, batch_size, m))
        sample, latent = torch.div(flat_indices, m, rounding_mode="floor"), flat_indices % m
        group = torch.bucketize(latent, torch.tensor(self.prefix_sizes, device=latent.device), right=True)  # (K, n) in 0..G-1
        parts = sparse_decode_flat(values, (sample * G + group) * m + latent, self.W_dec, batch_size * G)  # (K, B*G, d)
        return self._with_bias(list(parts.view(K, batch_size, G, -1).unbind(dim=2)))

    @staticmethod
    def prefix_losses(x: torch.Tensor, reconstructions: list[torch.Tensor]) -> torch.Tensor:
        """(K, G): each prefix's mean over batch and d of (x - x_hat_g)^2; x (B, d) or (K, B, d)."""
        return torch.stack([(r - x).pow(2).mean(dim=(1, 2)) for r in reconstructions], dim=1)

    # -- training -----------------------------------------------------------------------------

    def training_loss(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """{'reconstruction' (the prefix errors summed), 'prefix_losses' (K, G) detached, 'sparsity' (AuxK),
        'loss', each (K,) but prefix_losses, 'codes' (K, B, m) detached}. Updates the threshold and the firing
        counts (which latents are dead is decided before this batch)."""
        dead = self.dead_latents()
        pre = self.pre_activations(x)
        K, B, m = pre.shape
        values, indices, smallest = self.batch_top_k(pre)
        self.update_threshold(smallest)
        reconstructions = self.prefix_reconstructions_flat(values, indices, B)
        prefix = self.prefix_losses(x, reconstructions)
        reconstruction = prefix.sum(dim=1)
        codes = torch.zeros(K, B * m, dtype=values.dtype, device=values.device).scatter(1, indices, values.detach()).view(K, B, m)
        residual = (x - reconstructions[-1]).detach()
        aux = self.auxk_loss(pre, dead, residual) if self.aux_coef > 0 else torch.zeros_like(reconstruction)
        self.record_firing((codes > 0).any(dim=1), x.shape[-2])
        loss = reconstruction + self.aux_coef * aux
        return {"reconstruction": reconstruction, "prefix_losses": prefix.detach(), "sparsity": aux, "loss": loss, "codes": codes}

    def loss_terms(self, x: torch.Tensor, x_hat: torch.Tensor, c: torch.Tensor) -> dict[str, torch.Tensor]:
        """{'reconstruction' (the prefix errors of codes c summed), 'sparsity' (0: AuxK needs training's dead set),
        'loss'}, each (K,); x_hat is not used (it is the last prefix's reconstruction)."""
        reconstruction = self.prefix_losses(x, self.prefix_reconstructions(c)).sum(dim=1)
        return {"reconstruction": reconstruction, "sparsity": torch.zeros_like(reconstruction), "loss": reconstruction}
