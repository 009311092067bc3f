"""The report's toy data: sparse non-negative combinations of random unit directions.

Sharkey, Braun & Millidge (2022): G true features are unit vectors drawn
uniformly on the sphere in R^d; feature i fires with probability p_i
proportional to prob_decay**i, scaled so about `mean_active` features fire
per sample; an active feature's coefficient is Uniform[0, 1); x = sum_i c_i f_i.

Choices saekit makes where the report is silent (documented in docs/guides/toy-data.md):
- Probabilities are scaled so that sum_i min(1, s * prob_decay**i) equals
  `mean_active` exactly (the cap at 1 is applied before the scale is solved).
- A sample with no active feature stays the zero vector (the public
  replication switched one random feature on instead).
- Correlated variant: per sample z ~ N(0, Sigma) with Sigma a random
  correlation matrix (a symmetric Uniform[-1, 1) matrix shifted to be
  positive definite, then scaled to unit diagonal, as the replication built
  it); feature i fires when Phi(z_i) < p_i, so its marginal rate stays p_i.
  The coefficient is an independent Uniform[0, 1).
- Batch number t of a stream is a pure function of (seed, stream, t), so a
  stream can restart at any step.
"""

from __future__ import annotations

import torch

from saekit.sources.seeding import EpochSampler, seeded_generator
from saekit.sources.streams import Stream

_TRUTH_STREAM = 0x7275  # generator salts: one for the truth, one per named stream
_CORR_STREAM = 0x636F


def firing_probabilities(n_features: int, prob_decay: float, mean_active: float) -> torch.Tensor:
    """p_i = min(1, s * prob_decay**i) with s chosen so that sum(p) == mean_active.  (G,) float64."""
    base = prob_decay ** torch.arange(n_features, dtype=torch.float64)
    if mean_active >= n_features:
        return torch.ones(n_features, dtype=torch.float64)
    lo, hi = 0.0, mean_active / base[-1].item() + 1.0  # at hi every p is capped at 1, sum = G > mean_active
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if torch.clamp(mid * base, max=1.0).sum().item() < mean_active:
            lo = mid
        else:
            hi = mid
    return torch.clamp(hi * base, max=1.0)


def random_correlation_matrix(n: int, generator: torch.Generator) -> torch.Tensor:
    """A random positive-definite correlation matrix (n, n), float64, unit diagonal."""
    a = torch.rand(n, n, generator=generator, dtype=torch.float64) * 2 - 1
    a = (a + a.T) / 2
    min_eig = torch.linalg.eigvalsh(a).min().item()
    a = a + (1e-3 - min(min_eig, 0.0)) * torch.eye(n, dtype=torch.float64)
    std = a.diagonal().sqrt()
    return a / std[:, None] / std[None, :]


class ToySource:
    """The report's generator.  `ground_truth` is (G, d) with unit rows; `stream` yields (B, d) float32."""

    def __init__(
        self,
        d: int = 256,
        n_features: int = 512,
        prob_decay: float = 0.99,
        mean_active: float = 5.0,
        correlated: bool = False,
        magnitude_decay: float = 1.0,
        noise_std: float = 0.0,
        seed: int = 0,
        n_samples: int | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        if d <= 0 or n_features <= 0:
            raise ValueError("d and n_features must be positive")
        if not 0 < mean_active <= n_features:
            raise ValueError("mean_active must be in (0, n_features]")
        self.d, self.n_features, self.seed = d, n_features, seed
        self.noise_std, self.n_samples = noise_std, n_samples
        self.device = torch.device(device)
        g = seeded_generator(seed, _TRUTH_STREAM)
        directions = torch.randn(n_features, d, generator=g)
        self.ground_truth: torch.Tensor = (directions / directions.norm(dim=1, keepdim=True)).to(self.device)
        self.probs: torch.Tensor = firing_probabilities(n_features, prob_decay, mean_active)
        self.magnitudes: torch.Tensor = (magnitude_decay ** torch.arange(n_features, dtype=torch.float64)).float().to(self.device)
        self._inv_p = (1.0 / self.probs).float().to(self.device)
        self._scaled = magnitude_decay != 1.0
        self.correlation: torch.Tensor | None = None
        if correlated:
            corr = random_correlation_matrix(n_features, seeded_generator(seed, _CORR_STREAM))
            self.correlation = corr.float()
            self._chol_t = torch.linalg.cholesky(corr).T.float().to(self.device)  # z = eps @ L^T
            # Phi(z) < p  <=>  z < Phi^-1(p); p = 1 maps to +inf (always fires).
            self._z_threshold = (torch.special.ndtri(self.probs).float()).to(self.device)
        self._dataset: torch.Tensor | None = None
        self._epochs: EpochSampler | None = None

    # -- sampling -------------------------------------------------------------------------------

    def sample_coefficients(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """The true codes of a fresh batch: (B, G), zero where a feature is off, in [0, magnitude_i) where on."""
        B, G = batch_size, self.n_features
        if self.correlation is None:
            # One uniform u per (sample, feature) gives both events: fire iff u < p, and then
            # u / p ~ Uniform[0, 1) independently of which features fired.
            coef = torch.rand(B, G, generator=generator).to(self.device).mul_(self._inv_p)
            coef.masked_fill_(coef >= 1.0, 0.0)
        else:
            eps = torch.randn(B, G, generator=generator).to(self.device)
            fire = (eps @ self._chol_t) < self._z_threshold
            coef = torch.where(fire, torch.rand(B, G, generator=generator).to(self.device), 0.0)
        return coef * self.magnitudes if self._scaled else coef

    def sample(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """A fresh batch (B, d) drawn with `generator` (a CPU generator; tensors are moved to the device)."""
        return self.sample_with_codes(batch_size, generator)[0]

    def sample_with_codes(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """`sample`'s batch x (B, d) and its true codes (B, G), drawn in the same order from `generator`."""
        codes = self.sample_coefficients(batch_size, generator)
        x = codes @ self.ground_truth
        if self.noise_std > 0:
            x = x + self.noise_std * torch.randn(batch_size, self.d, generator=generator).to(self.device)
        return x, codes

    def batch(self, batch_size: int, step: int, stream: int = Stream.TRAIN) -> torch.Tensor:
        """Batch number `step` of stream `stream` (see `Stream`): (B, d) float32."""
        if self.n_samples is None:
            return self.sample(batch_size, seeded_generator(self.seed, stream, step))
        if self._epochs is None:
            self._epochs = EpochSampler(self.dataset(), self.seed)
        return self._epochs.batch(batch_size, step, stream)

    def batch_with_codes(self, batch_size: int, step: int, stream: int = Stream.TRAIN) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`batch(batch_size, step, stream)` (the same tensor, bit for bit) and its true codes (B, G), zero where a
        feature is off. None for a fixed dataset (`n_samples` set), whose codes are not kept."""
        if self.n_samples is not None:
            return None
        return self.sample_with_codes(batch_size, seeded_generator(self.seed, stream, step))

    def dataset(self) -> torch.Tensor:
        """The fixed dataset (N, d) when `n_samples` is set (generated once, in chunks)."""
        if self.n_samples is None:
            raise ValueError("this source streams fresh samples; set n_samples for a fixed dataset")
        if self._dataset is None:
            g = seeded_generator(self.seed, 0x6461)
            chunks, left = [], self.n_samples
            while left > 0:
                n = min(left, 65536)
                chunks.append(self.sample(n, g))
                left -= n
            self._dataset = torch.cat(chunks)
        return self._dataset
