"""Each SAE architecture's facts in one place (torch-free): its name, sparsity knob, config keys and defaults.

The config (`saekit.config`: known architectures, per-architecture defaults and keys, field descriptions), the
constructors in `saekit.sae` (their default arguments, and the registry `saekit.sae.ARCHITECTURES`), the store,
the analysis and the report all read these specs, so an SAE built from Python with its defaults is the one
`saekit train` builds. Adding an architecture: its module under `saekit/sae/`, a spec here, and a test.

The defaults are the values measured best on the report's toy data (d=256, G=512, batch 256, Adam lr 1e-3;
docs/guides/architectures.md).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True)
class ArchSpec:
    """One architecture.

    `knob` is the config key of the sparsity knob, named `knob_label` in text and `knob_symbol` in formulas;
    `sparsity_term` says what the loss's sparsity term measures and what multiplies it (figure labels).
    `defaults`: every config key (`sae.KEY`) the architecture reads besides arch, dict_size, decoder_bias and
    decoder_bias_init, knob first, with its default. `params` names the constructor argument of a key where the
    two differ. `impl` is where the class lives, "module:Class". `data_units`: the keys whose values are in units
    of the data's scale, with the power: the defaults were tuned on the report's toy data, and on data s times
    its scale a key of power p takes default · s^p (an L1 coefficient weighs activations, ∝ s, against a squared
    error, ∝ s²: power 1; an L0 coefficient weighs a count against it: power 2; thresholds are activations: 1)."""

    name: str
    knob: str
    knob_label: str
    knob_symbol: str
    sparsity_term: str
    defaults: Mapping[str, Any]
    decoder_bias: bool
    description: str
    impl: str
    params: Mapping[str, str] = field(default_factory=dict)
    data_units: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if next(iter(self.defaults), None) != self.knob:
            raise ValueError(f"{self.name}: the knob {self.knob!r} must be the first of the defaults")
        if not set(self.data_units) <= set(self.defaults):
            raise ValueError(f"{self.name}: data_units names keys that are not in the defaults")
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))
        object.__setattr__(self, "data_units", MappingProxyType(dict(self.data_units)))

    def scaled_defaults(self, scale: float) -> dict[str, Any]:
        """The `data_units` keys' defaults for data `scale` times the toy data's scale (3 significant figures)."""
        return {key: float(f"{self.defaults[key] * scale**power:.3g}") for key, power in self.data_units.items()}

    @property
    def knob_name(self) -> str:
        """The knob as axis labels and legends name it: 'L1 coefficient α', 'k', 'L0 coefficient λ'."""
        return self.knob_label if self.knob_label == self.knob_symbol else f"{self.knob_label} {self.knob_symbol}"

    @property
    def integer_knob(self) -> bool:
        """Whether the knob takes whole numbers (k)."""
        return isinstance(self.defaults[self.knob], int)

    def knob_number(self, value: float) -> int | float:
        """A knob value as the config holds it (an int for k); the store keeps every value as a float."""
        return int(value) if self.integer_knob else float(value)

    @property
    def config_defaults(self) -> dict[str, Any]:
        """What `sae.arch: NAME` sets when the keys are not given: `defaults` and decoder_bias."""
        return {**self.defaults, "decoder_bias": self.decoder_bias}

    def constructor_defaults(self) -> dict[str, Any]:
        """The constructor's default arguments (every config key but the knob, under its argument's name)."""
        return {self.params.get(key, key): value for key, value in self.config_defaults.items() if key != self.knob}

    def load(self) -> type:
        """The architecture's class (imports torch)."""
        module, name = self.impl.split(":")
        return getattr(importlib.import_module(module), name)


L1_KNOB = {"knob": "l1", "knob_label": "L1 coefficient", "knob_symbol": "α"}
K_KNOB = {"knob": "k", "knob_label": "k", "knob_symbol": "k"}
# AuxK stronger and sooner than Gao et al.'s (1/32 after 10M tokens of a language model): on the report's toy data
# the rarest true features fire once in ~3,000 samples and are learned through AuxK. BatchTopK plateaued at
# MMCS 0.97 with 1/32 and 100k samples and reached 0.99 with 0.25 and 20k; TopK reached the same MMCS (0.996)
# either way, twice as fast with these.
AUXK_DEFAULTS = {"aux_k": None, "aux_coef": 0.25, "dead_after": 20_000}

RELU = ArchSpec(
    name="relu",
    **L1_KNOB,
    sparsity_term="|latents|, before × α",
    # l1 0.3 (with the mean reduction, 1024 latents, 3M samples) reached MMCS >= 0.996 on fresh seeds with every true
    # feature recovered at cosine 0.9; 0.1 and 1.0 were both worse (MMCS 0.986, 0.982). With the mean reduction the
    # effective penalty per latent shrinks as 1/dict_size.
    defaults={"l1": 0.3, "l1_reduction": "mean", "decoder_norm": "unit", "decoder_init_norm": 1.0},
    decoder_bias=False,
    description="the report's SAE: c = ReLU(W_e x + b_e), x_hat = W_d c, loss MSE + α·L1 (Sharkey et al. 2022)",
    impl="saekit.sae.relu:ReluSAE",
    data_units={"l1": 1},
)
TOPK = ArchSpec(
    name="topk",
    **K_KNOB,
    sparsity_term="AuxK on dead latents, before × aux_coef",
    defaults={"k": 8, **AUXK_DEFAULTS},  # k a little above the toy data's mean of 5 active features
    decoder_bias=True,
    description="the k largest pre-activations of each sample, AuxK loss on dead latents (Gao et al. 2024)",
    impl="saekit.sae.topk:TopKSAE",
)
BATCHTOPK = ArchSpec(
    name="batchtopk",
    **K_KNOB,
    sparsity_term="AuxK on dead latents, before × aux_coef",
    # BatchTopK spends its k*B budget across the batch: k above the data's mean L0 goes to split features.
    defaults={"k": 5, **AUXK_DEFAULTS, "threshold_momentum": 0.01},
    decoder_bias=True,
    description="the k·B largest activations of a batch, one learned threshold at inference (Bussmann et al. 2024)",
    impl="saekit.sae.batchtopk:BatchTopKSAE",
)
MATRYOSHKA = ArchSpec(
    name="matryoshka",
    **K_KNOB,
    sparsity_term="AuxK on dead latents, before × aux_coef",
    # k as batchtopk's. Three prefixes, each twice the one before: on the report's generator at d=32, G=64, 128 latents,
    # k=3, 400k samples, they reached MMCS 0.927 / 0.921 (seeds 0, 1), four from 1/8 0.909 / 0.894
    # (docs/guides/architectures.md); the first prefix is 1/4 of the dictionary, and dict_size >= 3 can hold them.
    defaults={"k": 5, "prefix_fractions": (0.25, 0.5, 1.0), **AUXK_DEFAULTS, "threshold_momentum": 0.01},
    decoder_bias=True,
    description="BatchTopK whose loss sums the reconstruction errors of nested prefixes of the dictionary (Bussmann et al. 2025)",
    impl="saekit.sae.matryoshka:MatryoshkaBatchTopKSAE",
)
JUMPRELU = ArchSpec(
    name="jumprelu",
    knob="l0_coef",
    knob_label="L0 coefficient",
    knob_symbol="λ",
    sparsity_term="active latents per sample, before × λ",
    defaults={"l0_coef": 3e-5, "jump_bandwidth": 0.03, "jump_init_threshold": 0.05},
    decoder_bias=True,
    description="c = z·H(z − θ) with a learned threshold per latent, loss MSE + λ·L0 (Rajamanoharan et al. 2024b)",
    impl="saekit.sae.jumprelu:JumpReLUSAE",
    params={"jump_bandwidth": "bandwidth", "jump_init_threshold": "init_threshold"},
    data_units={"l0_coef": 2, "jump_bandwidth": 1, "jump_init_threshold": 1},
)
GATED = ArchSpec(
    name="gated",
    **L1_KNOB,
    sparsity_term="|ReLU(gate pre-activations)|, before × α",
    # l1 0.0005 reached MMCS 0.986-0.987 on seeds 0, 7, 8 of the report's data; 0.001 gave 0.967-0.983.
    defaults={"l1": 0.0005},
    decoder_bias=True,
    description="a gate path picks the latents, a magnitude path sharing its directions sizes them (Rajamanoharan et al. 2024a)",
    impl="saekit.sae.gated:GatedSAE",
    data_units={"l1": 1},
)

ARCH_SPECS: dict[str, ArchSpec] = {spec.name: spec for spec in (RELU, TOPK, BATCHTOPK, JUMPRELU, GATED, MATRYOSHKA)}


def prefix_sizes(dict_size: int, fractions: Sequence[float]) -> list[int]:
    """The matryoshka prefix widths for `dict_size` latents: each fraction times dict_size, rounded to the nearest
    integer (halves up). ValueError unless the fractions increase strictly in (0, 1] and end at 1, and the widths
    increase strictly from at least 1 (too many fractions for a small dictionary collapse two widths)."""
    fractions = [float(f) for f in fractions]
    if not fractions or any(not 0 < f <= 1 for f in fractions) or fractions[-1] != 1:
        raise ValueError(f"prefix_fractions must be fractions in (0, 1] ending at 1, got {fractions}")
    if any(b <= a for a, b in zip(fractions, fractions[1:])):
        raise ValueError(f"prefix_fractions must increase strictly, got {fractions}")
    sizes = [math.floor(f * dict_size + 0.5) for f in fractions]
    if sizes[0] < 1 or any(b <= a for a, b in zip(sizes, sizes[1:])):
        raise ValueError(
            f"prefix_fractions {fractions} of dict_size {dict_size} give prefix widths {sizes}, which must increase strictly from 1"
        )
    return sizes


def spec_for_knob(knob: str) -> ArchSpec:
    """The first architecture whose knob is `knob` (labels and symbols are the same for every user of a knob)."""
    for spec in ARCH_SPECS.values():
        if spec.knob == knob:
            return spec
    raise KeyError(f"no architecture has the sparsity knob {knob!r}")
