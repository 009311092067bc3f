"""The marginal firing rate of every feature of a synthetic model after its hierarchy: P(code_i > 0).

Given the copula's factor draw e (or always, without a copula), features are drawn independently, feature i
with probability q_i(e) = Phi((f_i . e - t_i) / s_i) * P(mean_i + std_i * N(0, 1) > 0). A feature without a
parent is then on with probability q_i * w_i, a child with (its parent's rate) * q_i * w_i, where w_i = 1
outside a mutually exclusive group and, inside one, the chance that a uniformly random pick among the
members that are on keeps i: w_i = E[1 / (1 + K)] with K the number of other members on, which equals
the integral over t in [0, 1] of prod_{j != i} (1 - q_j (1 - t)) (the generating function of K), a
polynomial that Gauss-Legendre quadrature integrates exactly.

Without a copula these rates are exact. With one they are averaged over `n_draws` scrambled Sobol points of e
(a randomised quasi-Monte Carlo estimate; features without a parent or group stay exact, since the copula
keeps their marginal at sampling_probs_i * P(magnitude > 0)).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from saekit.sources.synth_model import SynthModel

N_DRAWS = 4096  # Sobol points of the factor draw e for a correlated model
_CHUNK_ELEMENTS = 2**23  # elements of the largest temporary of a chunk of draws


def positive_magnitude(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """P(mean + std * N(0, 1) > 0) per feature, (G,) float64; with std 0: 1 where mean > 0, else 0."""
    mean, std = mean.double(), std.double()
    with_noise = torch.special.ndtr(mean / std.clamp_min(1e-300))
    return torch.where(std > 0, with_noise, (mean > 0).double())


class _Groups:
    """Mutually exclusive groups as a padded (n_groups, width) table of member features (-1 = pad)."""

    def __init__(self, group: torch.Tensor) -> None:
        members = torch.nonzero(group >= 0).flatten()
        self.any = bool(members.numel())
        if not self.any:
            return
        ids = group[members]
        order = torch.argsort(ids, stable=True)
        members, ids = members[order], ids[order]
        n_groups = int(ids.max()) + 1
        sizes = torch.bincount(ids, minlength=n_groups)
        width = int(sizes.max())
        rank = torch.arange(members.shape[0]) - torch.repeat_interleave(sizes.cumsum(0) - sizes, sizes)
        self.table = torch.full((n_groups, width), -1, dtype=torch.long)
        self.table[ids, rank] = members
        nodes, weights = np.polynomial.legendre.leggauss(max(1, math.ceil(width / 2)))
        self.nodes = torch.from_numpy((nodes + 1) / 2)  # on [0, 1]
        self.weights = torch.from_numpy(weights / 2)

    def keep_probability(self, q: torch.Tensor) -> torch.Tensor:
        """w (S, G) float64 for member probabilities q (S, G): 1 outside groups."""
        w = torch.ones_like(q)
        if not self.any:
            return w
        valid = self.table >= 0
        qg = torch.where(valid, q[:, self.table.clamp(min=0)], 0.0)  # (S, n_groups, width)
        factors = 1 - qg[..., None] * (1 - self.nodes)  # (S, n_groups, width, nodes), each >= node > 0
        total = factors.prod(dim=2, keepdim=True)
        keep = (total / factors * self.weights).sum(dim=-1)  # (S, n_groups, width)
        w[:, self.table[valid]] = keep[:, valid]
        return w


def _rates(model: SynthModel, q: torch.Tensor, groups: _Groups) -> torch.Tensor:
    """Per-draw rates (S, G) from the per-draw probabilities q (S, G) of being drawn with a positive value."""
    qw = q * groups.keep_probability(q)
    rates = qw.clone()
    for level in range(1, int(model.depth.max()) + 1):
        children = torch.nonzero(model.depth == level).flatten()
        rates[:, children] = rates[:, model.parent[children]] * qw[:, children]
    return rates


def realised_probabilities(model: SynthModel, n_draws: int = N_DRAWS, seed: int = 0) -> torch.Tensor:
    """P(code_i > 0) for every feature: (G,) float64 (see the module docstring)."""
    drawn = model.sampling_probs.double() * positive_magnitude(model.mean, model.std)
    groups = _Groups(model.group)
    if model.factor is None:
        return _rates(model, drawn[None], groups)[0]
    factor, scale = model.factor.double(), model.diag.double().sqrt()
    threshold = torch.special.ndtri(1 - model.sampling_probs.double())
    width = groups.table.shape[1] * groups.weights.shape[0] if groups.any else 1
    chunk = max(1, _CHUNK_ELEMENTS // (model.n_features * width))
    points = torch.quasirandom.SobolEngine(factor.shape[1], scramble=True, seed=seed).draw(n_draws, dtype=torch.float64)
    e = torch.special.ndtri(points.clamp(1e-12, 1 - 1e-12))  # (n_draws, r) ~ N(0, I_r)
    total = torch.zeros(model.n_features, dtype=torch.float64)
    for part in e.split(chunk):
        q = torch.special.ndtr((part @ factor.T - threshold) / scale) * positive_magnitude(model.mean, model.std)
        total += _rates(model, q, groups).sum(dim=0)
    rates = total / n_draws
    alone = (model.parent < 0) & (model.group < 0)
    rates[alone] = drawn[alone]
    return rates
