"""SynthSAEBench-style synthetic activations (`source.kind: synth`): generated, or read from a SAELens folder.

Chanin & Garriga-Alonso (2026), "SynthSAEBench": G features with Zipfian firing, a forest hierarchy (a child
fires only where its parent does; some parents' children are mutually exclusive; children optionally scaled
by their parent's value), low-rank correlated firing, per-feature magnitudes, near-orthogonal directions and
a bias. saekit.sources.synth_build makes a model from the config's keys, saekit.sources.synth_folder reads
one that SAELens saved, saekit.sources.synth_sampling draws from it sparsely, and
saekit.sources.synth_probs gives each feature's realised firing rate.
"""

from __future__ import annotations

from pathlib import Path

import torch

from saekit.sources.model_cache import cached_model
from saekit.sources.seeding import seeded_generator
from saekit.sources.streams import Stream
from saekit.sources.synth_build import build_model, directions
from saekit.sources.synth_folder import read_saelens_folder
from saekit.sources.synth_model import SynthModel
from saekit.sources.synth_probs import realised_probabilities
from saekit.sources.synth_sampling import Entries, SamplingPlan, decode, one_thread, sample_entries


class SynthSource:
    """Samples x = codes @ (feature vectors) + bias of a synthetic model.

    Attributes (G features in d dimensions):

    - `ground_truth` (G, d): the feature directions, unit rows (on the device);
    - `feature_norms` (G,): the norms of the model's feature vectors (1 for generated models and for
      SAELens's own); `codes` multiply the vectors themselves, so x = codes @ (feature_norms[:, None] *
      ground_truth) + bias;
    - `bias` (d,): added to every sample (zeros when the model has none; on the device);
    - `probs` (G,) float64: P(code_i > 0), the marginal rate each feature actually fires at after the
      hierarchy (gating, mutual exclusion), compensation and magnitudes clipped at 0 (saekit.sources.synth_probs;
      exact without correlation, a quasi-Monte Carlo average over the copula's factor with it);
    - `sampling_probs` (G,) float64: the probability each feature is drawn with before the hierarchy acts
      (SAELens's `firing_probabilities`, after compensation);
    - `parent` (G,) int64: each feature's parent, -1 for roots and features outside any tree;
    - `mutually_exclusive` (G,) bool: parents whose children are mutually exclusive;
      `exclusive_group` (G,) int64: the group id of each such child, -1 elsewhere;
    - `magnitude_mean`, `magnitude_std` (G,): a drawn feature's value is max(0, mean + std * N(0, 1)).

    `batch(B, step, stream)` is a pure function of (seed, stream, step): sampling runs on the CPU, on one
    thread, from seeded_generator(seed, stream, step); the decode (an embedding bag over the active
    features) runs on the device (on one thread too when that is the CPU). Build from the config's keys
    (the arguments below), or from a SAELens folder with `SynthSource.from_folder`.
    """

    def __init__(
        self,
        d: int = 256,
        n_features: int = 4096,
        firing: str = "zipfian",
        firing_max: float = 0.4,
        firing_min: float = 5e-4,
        firing_exponent: float = 0.5,
        hierarchy_roots: int = 32,
        hierarchy_branching: int = 4,
        hierarchy_depth: int = 3,
        exclusive_portion: float = 1.0,
        hierarchy_compensate: bool = True,
        hierarchy_scale_children: bool = True,
        correlation_rank: int = 25,
        correlation_scale: float = 0.1,
        magnitude_mean: float = 5.0,
        magnitude_mean_last: float = 4.0,
        magnitude_std: float = 0.5,
        magnitude_std_spread: float = 0.5,
        bias_norm: float = 0.5,
        orthogonalize_steps: int = 100,
        orthogonalize_lr: float = 3e-4,
        seed: int = 0,
        device: str | torch.device = "cpu",
        cache_dir: str | Path | None = None,
    ) -> None:
        keys = {k: v for k, v in locals().items() if k not in ("self", "device", "cache_dir", "__class__")}
        vectors = None
        if orthogonalize_steps > 0 and cache_dir is not None:  # the slow part at large G: kept between runs
            key = {"kind": "synth", "d": d, "n_features": n_features, "steps": orthogonalize_steps, "lr": orthogonalize_lr, "seed": seed}
            tensors, _ = cached_model(
                cache_dir, "synth", key, lambda: {"vectors": directions(n_features, d, orthogonalize_steps, orthogonalize_lr, seed)}
            )
            vectors = tensors["vectors"]
        self._setup(build_model(keys, vectors), seed, device)

    @classmethod
    def from_folder(cls, path: str | Path, seed: int = 0, device: str | torch.device = "cpu") -> SynthSource:
        """The model a SAELens `SyntheticModel.save` folder holds; `seed` seeds the data streams (and the
        folded-normal magnitudes when the folder's config has no seed)."""
        source = cls.__new__(cls)
        source._setup(read_saelens_folder(path, fallback_seed=seed), seed, device)
        return source

    @classmethod
    def from_model(cls, model: SynthModel, seed: int = 0, device: str | torch.device = "cpu") -> SynthSource:
        """A source over an already built SynthModel."""
        source = cls.__new__(cls)
        source._setup(model, seed, device)
        return source

    def _setup(self, model: SynthModel, seed: int, device: str | torch.device) -> None:
        self.model, self.seed, self.device = model, seed, torch.device(device)
        self.d, self.n_features = model.d, model.n_features
        norms = model.vectors.norm(dim=1)
        self.feature_norms: torch.Tensor = norms.to(self.device)
        self.ground_truth: torch.Tensor = (model.vectors / norms[:, None]).to(self.device)
        self._vectors = model.vectors.to(self.device)
        self.bias: torch.Tensor = model.bias.to(self.device)
        self.sampling_probs: torch.Tensor = model.sampling_probs
        self._probs: torch.Tensor | None = None
        self.parent: torch.Tensor = model.parent
        self.mutually_exclusive: torch.Tensor = model.exclusive
        self.exclusive_group: torch.Tensor = model.group
        self.magnitude_mean, self.magnitude_std = model.mean, model.std
        self._plan = SamplingPlan(model)

    @property
    def probs(self) -> torch.Tensor:
        """(G,) float64: P(code_i > 0) (see the class docstring); computed on first use."""
        if self._probs is None:
            self._probs = realised_probabilities(self.model, seed=self.seed)
        return self._probs

    def sample_entries(self, batch_size: int, generator: torch.Generator) -> Entries:
        """The active codes of a fresh batch (rows, features, values; on the CPU)."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        with one_thread():
            return sample_entries(self._plan, batch_size, generator)

    def _decode(self, entries: Entries, batch_size: int) -> torch.Tensor:
        """x (B, d) on the device; on the CPU on one thread, like sampling (an embedding bag of ~B * L0 rows)."""
        if self.device.type != "cpu":
            return decode(entries, batch_size, self._vectors, self.bias)
        with one_thread():
            return decode(entries, batch_size, self._vectors, self.bias)

    def batch(self, batch_size: int, step: int, stream: int = Stream.TRAIN) -> torch.Tensor:
        """Batch number `step` of stream `stream` (see `Stream`): (B, d) float32."""
        entries = self.sample_entries(batch_size, seeded_generator(self.seed, stream, step))
        return self._decode(entries, batch_size)

    def batch_with_codes(self, batch_size: int, step: int, stream: int = Stream.TRAIN) -> tuple[torch.Tensor, torch.Tensor]:
        """The same x as `batch(batch_size, step, stream)` and its codes (B, G), 0 where a feature is off:
        x = codes @ (feature_norms[:, None] * ground_truth) + bias."""
        entries = self.sample_entries(batch_size, seeded_generator(self.seed, stream, step))
        x = self._decode(entries, batch_size)
        return x, entries.dense(batch_size, self.n_features).to(self.device)

    def describe(self) -> dict[str, float | int]:
        """What a report needs to know about the model behind the data."""
        m = self.model
        return {
            "n_features": self.n_features,
            "d": self.d,
            "expected_active": float(self.probs.sum()),
            "in_hierarchy": int(((m.parent >= 0) | torch.isin(torch.arange(self.n_features), m.parent)).sum()),
            "exclusive_groups": int(m.group.max()) + 1,
            "correlation_rank": 0 if m.factor is None else int(m.factor.shape[1]),
            "bias_norm": float(m.bias.norm()),
        }
