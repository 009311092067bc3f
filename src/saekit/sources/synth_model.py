"""The synthetic model behind `source.kind: synth`: its tensors, their checks, and the hierarchy tables sampling reads.

A model (SynthSAEBench's, Chanin & Garriga-Alonso 2026) is G features in R^d:

- `vectors` (G, d): feature i's vector f_i (SAELens keeps them at unit norm; a folder may hold any norm);
- `bias` (d,): added to every sample;
- `sampling_probs` (G,): feature i is drawn with this probability before the hierarchy acts;
- optionally a low-rank Gaussian copula: z = `factor` @ e + sqrt(`diag`) * eta with e ~ N(0, I_r),
  eta ~ N(0, I_G); feature i is drawn when z_i > Phi^-1(1 - sampling_probs[i]);
- magnitudes: a drawn feature takes max(0, `mean`[i] + `std`[i] * N(0, 1)); a value of 0 counts as off;
- a forest: `parent`[i] (-1: none). A child stays on only where its parent is on; where `rescale`[i] its value
  is multiplied by (parent's value / parent's mean); children sharing an `group` id >= 0 are mutually
  exclusive: where several are on, one chosen uniformly at random survives.

x = sum_i code_i * f_i + bias.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from saekit.errors import InputError

MAX_FEATURES = 2**24  # G above this is refused (sampling tables are int64 per feature)
MAX_WIDTH = 2**16  # d above this is refused
MAX_ELEMENTS = 2**31  # G * d above this is refused (8 GB of float32 feature vectors)
MAX_DEPTH = 256  # deeper hierarchies are refused


@dataclass
class SynthModel:
    """The tensors of a synthetic model, on the CPU (see the module docstring for their meaning)."""

    vectors: torch.Tensor  # (G, d) float32
    bias: torch.Tensor  # (d,) float32
    sampling_probs: torch.Tensor  # (G,) float64 in [0, 1]
    mean: torch.Tensor  # (G,) float32
    std: torch.Tensor  # (G,) float32, >= 0
    parent: torch.Tensor  # (G,) int64, -1 = none
    rescale: torch.Tensor  # (G,) bool
    group: torch.Tensor  # (G,) int64, -1 = no mutually exclusive group
    exclusive: torch.Tensor  # (G,) bool: the feature's children form a mutually exclusive group
    factor: torch.Tensor | None = None  # (G, r) float32
    diag: torch.Tensor | None = None  # (G,) float32, > 0
    depth: torch.Tensor = field(init=False)  # (G,) int64: 0 for features without a parent

    def __post_init__(self) -> None:
        check_model(self)
        self.depth = feature_depths(self.parent)
        check_groups(self)

    @property
    def n_features(self) -> int:
        return self.vectors.shape[0]

    @property
    def d(self) -> int:
        return self.vectors.shape[1]

    @property
    def correlated(self) -> bool:
        return self.factor is not None


def _finite(t: torch.Tensor, name: str) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise InputError(f"synthetic model: {name} holds NaN/Inf values")


def _shape(t: torch.Tensor, shape: tuple[int, ...], name: str) -> None:
    if tuple(t.shape) != shape:
        raise InputError(f"synthetic model: {name} has shape {tuple(t.shape)}, expected {shape}")


def check_sizes(G: int, d: int) -> None:
    """Refuse sizes that are not positive or too large to hold."""
    if G <= 0 or d <= 0:
        raise InputError(f"synthetic model: sizes must be positive, got {G} features in {d} dimensions")
    if G > MAX_FEATURES or d > MAX_WIDTH or G * d > MAX_ELEMENTS:
        raise InputError(f"synthetic model: {G} features in {d} dimensions is too large (at most 2**24 features, 2**16 dims)")


def check_model(m: SynthModel) -> None:
    """Shapes, dtypes and ranges of every tensor; InputError in one line otherwise."""
    if m.vectors.ndim != 2:
        raise InputError(f"synthetic model: feature vectors must be 2-D (G, d), got shape {tuple(m.vectors.shape)}")
    G, d = m.vectors.shape
    check_sizes(G, d)
    for name, t, shape in (("bias", m.bias, (d,)), ("firing probabilities", m.sampling_probs, (G,)), ("mean magnitudes", m.mean, (G,)),
                           ("std magnitudes", m.std, (G,)), ("parent", m.parent, (G,)), ("rescale", m.rescale, (G,)),
                           ("group", m.group, (G,)), ("exclusive", m.exclusive, (G,))):
        _shape(t, shape, name)
        _finite(t, name)
    _finite(m.vectors, "feature vectors")
    if bool((m.vectors.norm(dim=1) == 0).any()):
        raise InputError("synthetic model: a feature vector is zero")
    if bool(((m.sampling_probs < 0) | (m.sampling_probs > 1)).any()):
        raise InputError("synthetic model: firing probabilities must lie in [0, 1]")
    if bool((m.std < 0).any()):
        raise InputError("synthetic model: std magnitudes must be >= 0")
    if bool(((m.parent < -1) | (m.parent >= G)).any()):
        raise InputError(f"synthetic model: a parent index is outside [-1, {G})")
    if (m.factor is None) != (m.diag is None):
        raise InputError("synthetic model: a correlation needs both its factor and its diagonal")
    if m.factor is not None and m.diag is not None:
        if m.factor.ndim != 2 or m.factor.shape[0] != G or m.factor.shape[1] == 0:
            raise InputError(f"synthetic model: correlation factor has shape {tuple(m.factor.shape)}, expected ({G}, rank)")
        _shape(m.diag, (G,), "correlation diagonal")
        _finite(m.factor, "correlation factor")
        _finite(m.diag, "correlation diagonal")
        if bool((m.diag <= 0).any()):
            raise InputError("synthetic model: the correlation diagonal must be > 0")
    rescaled_parents = m.parent[m.rescale & (m.parent >= 0)]
    if rescaled_parents.numel() and bool((m.mean[rescaled_parents] <= 0).any()):
        raise InputError("synthetic model: a parent whose children are scaled by its value needs a mean magnitude > 0")


def feature_depths(parent: torch.Tensor) -> torch.Tensor:
    """(G,) int64: 0 for features without a parent, else the parent's depth + 1. A cycle, or a hierarchy
    deeper than MAX_DEPTH levels (sampling walks it level by level), is refused."""
    depth = torch.where(parent < 0, 0, -1)
    known = parent < 0
    safe = parent.clamp(min=0)
    for level in range(1, MAX_DEPTH + 1):
        ready = ~known & known[safe]
        if not bool(ready.any()):
            break
        depth[ready] = level
        known |= ready
    if not bool(known.all()):
        raise InputError(f"synthetic model: the hierarchy is cyclic (a feature is its own ancestor) or deeper than {MAX_DEPTH} levels")
    return depth


def check_groups(m: SynthModel) -> None:
    """Members of a mutually exclusive group share one parent; ids are 0..n_groups-1."""
    members = m.group >= 0
    if not bool(members.any()):
        return
    ids = m.group[members]
    n = int(ids.max()) + 1
    if n > m.n_features:
        raise InputError("synthetic model: more mutually exclusive groups than features")
    parents = m.parent[members]
    first = torch.full((n,), -2, dtype=torch.long).scatter_reduce(0, ids, parents, "amax", include_self=False)
    last = torch.full((n,), -2, dtype=torch.long).scatter_reduce(0, ids, parents, "amin", include_self=False)
    if not torch.equal(first, last):
        raise InputError("synthetic model: a mutually exclusive group has members with different parents")
