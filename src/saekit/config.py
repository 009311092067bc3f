"""Typed configs (pydantic v2, unknown keys refused), YAML loading, `--set` overrides, grid expansion.

A config has three sections, each a flat model whose fields are documented
below; every default is the value we recommend for the report's toy data.
Lists in `sae.dict_size`, the architecture's sparsity knob (`sae.l1`, `sae.k`, ...: see
saekit.archspec) or `train.seeds` make a grid: one SAE per combination.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from saekit.archspec import ARCH_SPECS, prefix_sizes
from saekit.errors import InputError

# Tables derived from the architecture specs (saekit.archspec).
SPARSITY_KNOBS: dict[str, str] = {name: spec.knob for name, spec in ARCH_SPECS.items()}  # the config key each one sweeps
KNOWN_ARCHS = tuple(ARCH_SPECS)
KNOB_LABELS = {spec.knob: spec.knob_label for spec in ARCH_SPECS.values()}  # how each knob is named in text
DEFAULT_L1 = ARCH_SPECS["relu"].defaults["l1"]


# The largest integer any key accepts: seeds go to torch.Generator.manual_seed (a signed 64-bit integer)
# and sizes to tensor shapes, so larger numbers would fail deep inside torch instead of here.
MAX_INT = 2**62


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_assignment=True)

    @field_validator("*", mode="after")
    @classmethod
    def _not_huge(cls, value: Any) -> Any:
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_INT:
                raise ValueError(f"{v} is too large (at most 2**62)")
        return value


# Defaults that differ by source kind, applied when the key is not given. `tms`: 80 features in 20 dimensions;
# `compute`: a small MLP computing |x| of 64 features through a 32-wide embedding with 48 hidden neurons
# (docs/guides/toy-data.md); `synth`: a CPU-sized SynthSAEBench, 4096 features in 256 dimensions (SynthSAEBench-16k
# has 16,384 in 768; docs/guides/synth-data.md). A `synth` source read from a folder (source.path) takes its sizes
# from the folder instead.
KIND_DEFAULTS: dict[str, dict[str, Any]] = {
    "tms": {"d": 20, "n_features": 80, "sparsity": 0.97, "importance_decay": 0.97},
    "compute": {"d": 48, "n_features": 64, "embed_dim": 32, "sparsity": 0.97, "importance_decay": 1.0},
    "synth": {"d": 256, "n_features": 4096},
}
TOY_ONLY_KEYS = ("prob_decay", "mean_active", "correlated", "magnitude_decay", "noise_std", "n_samples")
MODEL_ONLY_KEYS = ("sparsity", "importance_decay", "model_steps")  # tms and compute
ACTIVATIONS_ONLY_KEYS = ("buffer_size", "skip_positions", "max_norm_ratio", "normalize", "eval_fraction")
SYNTH_ONLY_KEYS = (
    "firing", "firing_max", "firing_min", "firing_exponent",
    "hierarchy_roots", "hierarchy_branching", "hierarchy_depth", "exclusive_portion", "hierarchy_compensate", "hierarchy_scale_children",
    "correlation_rank", "correlation_scale",
    "magnitude_mean", "magnitude_mean_last", "magnitude_std", "magnitude_std_spread",
    "bias_norm", "orthogonalize_steps", "orthogonalize_lr",
)  # the generator's keys; with source.path the model comes from the folder and none of them may be given


class SourceConfig(_Section):
    """Where activations come from. `toy` is the report's generator; `tms` and `compute` are small models
    trained in-house whose hidden activations carry known features; `synth` is SynthSAEBench's generator
    (hierarchy, correlation, Zipfian firing), or a model SAELens saved; `file` is a tensor on disk;
    `activations` a folder of a language model's activations written by `saekit activations`."""

    kind: Literal["toy", "tms", "compute", "synth", "file", "activations"] = Field(
        "toy",
        description="toy: the report's generator; tms: a Toy Models of Superposition autoencoder's hidden layer; "
        "compute: an MLP computing |x| in superposition, its hidden layer; synth: a SynthSAEBench-style synthetic model "
        "(generated from the synth keys, or read from a SAELens folder in source.path); file: a tensor on disk; "
        "activations: a folder of activation shards written by `saekit activations`",
    )
    d: int = Field(
        256,
        gt=0,
        description="width of the activations the SAE reads (tms: 20, compute: 48, synth: 256); `file`, `activations` and a "
        "synth folder: read from the data (a value given that differs is refused)",
    )
    n_features: int = Field(512, gt=0, description="G, the number of true (input) features (tms: 80, compute: 64, synth: 4096)")
    prob_decay: float = Field(0.99, gt=0, le=1, description="toy: feature i fires with probability proportional to prob_decay**i")
    mean_active: float = Field(5.0, gt=0, description="toy: expected number of active features per sample")
    correlated: bool = Field(False, description="toy: fire features through a Gaussian copula with a random correlation matrix")
    magnitude_decay: float = Field(1.0, gt=0, le=1, description="toy: feature i's coefficient is scaled by magnitude_decay**i; 1 = off")
    noise_std: float = Field(0.0, ge=0, description="toy: std of isotropic Gaussian noise added to every sample")
    sparsity: float = Field(0.97, ge=0, lt=1, description="tms, compute: each feature is zero with this probability")
    importance_decay: float = Field(
        0.97, gt=0, le=1, description="tms, compute: feature i's weight in the model's loss is importance_decay**i (compute: 1)"
    )
    embed_dim: int = Field(32, gt=0, description="compute: width of the fixed random embedding the features enter through")
    model_steps: int = Field(10_000, gt=0, description="tms, compute: Adam steps (batch 1024) that train the model")
    # synth: defaults are SynthSAEBench-16k's (SAELens docs, synth_sae_bench.md: "SynthSAEBench-16k" configuration),
    # scaled to 4096 features where a number counts features (roots); the rest are per-feature or per-pair figures.
    firing: Literal["zipfian", "linear", "random", "constant"] = Field(
        "zipfian",
        description="synth: firing probability over feature ranks 1..G: zipfian ~ rank^-firing_exponent mapped onto "
        "[firing_min, firing_max]; linear from firing_max down to firing_min; random uniform in that range; constant firing_max",
    )
    firing_max: float = Field(0.4, gt=0, le=1, description="synth: probability of the most frequent feature (SynthSAEBench-16k: 0.4)")
    firing_min: float = Field(5e-4, gt=0, le=1, description="synth: probability of the rarest feature (SynthSAEBench-16k: 5e-4)")
    firing_exponent: float = Field(0.5, gt=0, description="synth: Zipf exponent of `zipfian` (SynthSAEBench-16k: 0.5)")
    hierarchy_roots: int = Field(
        32,
        ge=0,
        description="synth: trees in the feature forest; features 0..roots-1 are their roots, the next ones their descendants "
        "breadth first; 0 = no hierarchy. SynthSAEBench-16k's 128 trees of 85 features hold 66% of its 16,384 features; "
        "32 trees keep that share of 4096",
    )
    hierarchy_branching: int = Field(4, ge=2, description="synth: children of every node above the last level (SynthSAEBench-16k: 4)")
    hierarchy_depth: int = Field(3, ge=1, description="synth: levels below the root (1 = a root with leaves; SynthSAEBench-16k: 3)")
    exclusive_portion: float = Field(
        1.0, ge=0, le=1, description="synth: fraction of parents whose children are mutually exclusive (SynthSAEBench-16k: all)"
    )
    hierarchy_compensate: bool = Field(
        True,
        description="synth: raise a child's probability by 1/p(parent) (and, among exclusive siblings, by 1 + their summed "
        "p / p(parent)) so that it fires at about its own rate despite the gating (SynthSAEBench-16k: on)",
    )
    hierarchy_scale_children: bool = Field(
        True, description="synth: multiply a child's value by its parent's value / the parent's mean magnitude (SynthSAEBench-16k: on)"
    )
    correlation_rank: int = Field(
        25, ge=0, description="synth: rank of the Gaussian copula that correlates firing; 0 = independent features (SynthSAEBench-16k: 25)"
    )
    correlation_scale: float = Field(
        0.1,
        ge=0,
        description="synth: std of the copula's factor entries; the latent correlation of two features is f_i . f_j, of typical size "
        "scale^2 * sqrt(rank) (0.05 at the defaults). SynthSAEBench-16k: 0.1"
    )
    magnitude_mean: float = Field(5.0, gt=0, description="synth: mean value of feature 0 when it fires (SynthSAEBench-16k: 5)")
    magnitude_mean_last: float = Field(
        4.0, gt=0, description="synth: mean value of the last feature; linear in between (SynthSAEBench-16k: 4)"
    )
    magnitude_std: float = Field(
        0.5, ge=0, description="synth: std of a firing feature's value; values below 0 are cut to 0 (off). SynthSAEBench-16k: 0.5"
    )
    magnitude_std_spread: float = Field(
        0.5,
        ge=0,
        description="synth: each feature's std is drawn as |N(magnitude_std, spread^2)|; 0 = every feature has magnitude_std "
        "(SynthSAEBench-16k: 0.5)",
    )
    bias_norm: float = Field(0.5, ge=0, description="synth: norm of a random bias added to every sample; 0 = none (SynthSAEBench-16k: 0.5)")
    orthogonalize_steps: int = Field(
        100,
        ge=0,
        description="synth: Adam steps pushing the feature directions apart; 0 = plain random directions (SynthSAEBench-16k: 100)",
    )
    orthogonalize_lr: float = Field(3e-4, gt=0, description="synth: learning rate of those steps (SynthSAEBench-16k: 3e-4)")
    seed: int = Field(0, ge=0, description="seeds the true features (or the model) and the data stream")
    n_samples: int | None = Field(
        None, gt=0, description="toy: fixed dataset of this many samples, cycled in shuffled epochs; null = fresh samples every step"
    )
    path: str | None = Field(
        None,
        description="`file`: a .safetensors (tensor 'activations', optional 'ground_truth') or .npy file of shape (N, d); "
        "`activations`: the folder `saekit activations` wrote; `synth`: a SAELens synthetic-model folder "
        "(SyntheticModel.save), which then defines the model (no synth key may be given)",
    )
    buffer_size: int = Field(
        100_000, gt=0, description="activations: rows held in the shuffle buffer that batches are drawn from (memory: rows x d x 4 bytes)"
    )
    skip_positions: int = Field(
        1,
        ge=0,
        description="activations: leave out the first positions of every window (position 0 of a causal model is an attention "
        "sink whose norm is ~100x the others'); they are also left clean in the downstream-loss evaluation",
    )
    max_norm_ratio: float = Field(
        10.0,
        ge=0,
        description="activations: tokens whose activation norm exceeds this many times the median norm are left out of training "
        "and evaluation and left clean in the downstream loss (massive activations of attention-sink tokens: on SmolLM2's layer 15, "
        "0.05% of tokens hold 86% of the squared norm); 0 = keep every token",
    )
    normalize: bool = Field(
        True, description="activations: scale inputs so their mean squared norm is d (the scale is stored with each SAE)"
    )
    eval_fraction: float = Field(
        0.05, gt=0, lt=1, description="activations: the last windows holding this fraction of the tokens are held out for evaluation"
    )

    def relevant(self) -> dict[str, Any]:
        """The keys that apply to this kind, with their values (what identifies the data)."""
        keys = {
            "toy": ("d", "n_features", *TOY_ONLY_KEYS),
            "tms": ("d", "n_features", *MODEL_ONLY_KEYS),
            "compute": ("d", "n_features", "embed_dim", *MODEL_ONLY_KEYS),
            "synth": ("path",) if self.path is not None else ("d", "n_features", *SYNTH_ONLY_KEYS),
            "file": ("path",),
            "activations": ("path", *ACTIVATIONS_ONLY_KEYS),
        }[self.kind]
        return {"kind": self.kind, **{k: getattr(self, k) for k in keys}, "seed": self.seed}

    @model_validator(mode="before")
    @classmethod
    def _kind_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("kind"), str) and data["kind"] in KIND_DEFAULTS:
            if data["kind"] == "synth" and data.get("path") is not None:
                return data  # the folder gives the sizes
            data = {**KIND_DEFAULTS[data["kind"]], **data}
        return data

    @model_validator(mode="after")
    def _check(self) -> SourceConfig:
        # keys of another kind are refused when set to anything but their default (so full dumps reload)
        fields = type(self).model_fields
        given = {k for k in self.model_fields_set if getattr(self, k) != fields[k].default}
        if self.kind != "toy":
            wrong = [k for k in TOY_ONLY_KEYS if k in given]
            if wrong:
                raise ValueError(f"source.{wrong[0]} applies to kind 'toy' only, not {self.kind!r}")
        if self.kind not in ("tms", "compute"):
            wrong = [k for k in (*MODEL_ONLY_KEYS, "embed_dim") if k in given]
            if wrong:
                raise ValueError(f"source.{wrong[0]} applies to kinds 'tms' and 'compute' only, not {self.kind!r}")
        if self.kind != "activations":
            wrong = [k for k in ACTIVATIONS_ONLY_KEYS if k in given]
            if wrong:
                raise ValueError(f"source.{wrong[0]} applies to kind 'activations' only, not {self.kind!r}")
        if self.kind == "tms" and "embed_dim" in given:
            raise ValueError("source.embed_dim applies to kind 'compute' only")
        self._check_synth(given)
        if self.kind == "toy" and self.mean_active > self.n_features:
            raise ValueError(f"mean_active ({self.mean_active}) is larger than n_features ({self.n_features})")
        if self.kind in ("file", "activations") and not self.path:
            raise ValueError(f"source.kind {self.kind!r} needs source.path")
        if self.kind not in ("file", "activations", "synth") and self.path is not None:
            raise ValueError(f"source.path applies to kinds 'file', 'activations' and 'synth' only, not {self.kind!r}")
        return self

    def _check_synth(self, given: set[str]) -> None:
        """Synth keys only with kind synth and without a folder; probability ranges SAELens's generators accept."""
        wrong = [k for k in SYNTH_ONLY_KEYS if k in given]
        if self.kind != "synth":
            if wrong:
                raise ValueError(f"source.{wrong[0]} applies to kind 'synth' only, not {self.kind!r}")
            return
        if self.path is not None:
            if wrong:
                raise ValueError(f"source.{wrong[0]} cannot be given with source.path: the model comes from the folder")
            if not self.path.strip():
                raise ValueError("source.path is empty")
            return
        if self.firing in ("zipfian", "random") and not self.firing_min < self.firing_max:
            raise ValueError(f"source.firing_min ({self.firing_min}) must be below source.firing_max ({self.firing_max}) for {self.firing}")
        if self.firing == "linear" and self.firing_min > self.firing_max:
            raise ValueError(f"source.firing_min ({self.firing_min}) must not exceed source.firing_max ({self.firing_max})")


# What `sae.arch` sets when a key is not given, and the keys each architecture reads besides arch, dict_size,
# decoder_bias and decoder_bias_init (knob first).
ARCH_DEFAULTS: dict[str, dict[str, Any]] = {name: spec.config_defaults for name, spec in ARCH_SPECS.items()}
ARCH_KEYS: dict[str, tuple[str, ...]] = {name: tuple(spec.defaults) for name, spec in ARCH_SPECS.items()}
_ALL_ARCH_KEYS = sorted({k for keys in ARCH_KEYS.values() for k in keys})


def _arch_field(key: str, text: str, **constraints: Any) -> Any:
    """The Field of an architecture's key: its default is that of the first architecture (in ARCH_SPECS order)
    that reads it; its description names the architectures that read it and their defaults."""
    users = {name: spec.config_defaults[key] for name, spec in ARCH_SPECS.items() if key in spec.config_defaults}
    by_value: dict[str, list[str]] = {}
    for name, value in users.items():
        by_value.setdefault(_default_text(value), []).append(name)
    if len(by_value) == 1:
        default = f"default {next(iter(by_value))}"
    else:
        default = "default " + ", ".join(f"{value} for {', '.join(names)}" for value, names in by_value.items())
    who = "" if len(users) == len(ARCH_SPECS) else ", ".join(users) + ": "
    return Field(next(iter(users.values())), description=f"{who}{text}; {default}", **constraints)


def _default_text(value: Any) -> str:
    """A default as YAML writes it: null, true, 20000, 3e-05, [0.25, 0.5, 1]."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_default_text(v) for v in value) + "]"
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return f"{value:g}" if isinstance(value, float) else str(value)


# Keys added after run ids were first published: left out of a run's id while at their default, so that
# the runs of earlier versions keep their ids (and a rerun skips them).
SAE_KEYS_NEW_IN_V2 = ("decoder_norm", "decoder_init_norm")


class SAEConfig(_Section):
    """The sparse autoencoder. Defaults: the report's SAE (ReLU, L1 on the mean, unit-norm decoder, no decoder bias).

    Each architecture has one sparsity knob (its spec's `knob` in saekit.archspec), a grid axis when given as a
    list. Keys of another architecture are refused.
    """

    arch: str = Field("relu", description="architecture: " + "; ".join(f"{n}: {s.description}" for n, s in ARCH_SPECS.items()))
    dict_size: int | list[int] = Field(1024, description="number of latents m (a list makes a grid axis)")
    l1: float | list[float] = _arch_field("l1", f"{ARCH_SPECS['relu'].knob_name} (a list makes a grid axis)")
    l1_reduction: Literal["mean", "sum"] = _arch_field(
        "l1_reduction", "mean: alpha * mean over latents and batch of |c| (the report); sum: summed over latents, mean over batch"
    )
    decoder_norm: Literal["unit", "free"] = _arch_field(
        "decoder_norm",
        "unit: decoder rows kept at unit norm (the report); free: unconstrained decoder with the L1 term "
        "weighted by each latent's decoder norm, sum_j |c_j| * ||W_d,j|| (Anthropic's 2024 update)",
    )
    decoder_init_norm: float = _arch_field(
        "decoder_init_norm",
        "norm of every decoder row at init (the encoder starts as the decoder's transpose); other than 1 only with "
        "decoder_norm: free. On the report's data (lr 2e-3, L1 0.3) a free decoder started at 0.1 reached MMCS 0.99 after "
        "0.61-0.72M samples, against 0.97-1.02M at 1 (four seeds)",
        gt=0,
    )
    k: int | list[int] = _arch_field(
        "k",
        "latents kept per sample (batchtopk: k*B per batch); a list is a grid axis. topk's default is a little above the "
        "toy data's mean of 5 active features, batchtopk's that mean",
    )
    aux_k: int | None = _arch_field("aux_k", "latents of the AuxK loss that reconstructs the residual from dead latents; null = d/2", gt=0)
    aux_coef: float = _arch_field("aux_coef", "weight of the AuxK loss (Gao et al. 2024: 1/32)", ge=0)
    dead_after: int = _arch_field(
        "dead_after",
        "a latent that has not fired for this many samples is dead and joins the AuxK loss "
        "(Gao et al. 2024: 10M tokens of a language model; raise it for real activations)",
        gt=0,
    )
    threshold_momentum: float = _arch_field(
        "threshold_momentum",
        "weight of each batch in the running mean of the smallest kept activation (the inference threshold)",
        gt=0,
        le=1,
    )
    prefix_fractions: tuple[float, ...] = _arch_field(
        "prefix_fractions",
        "the nested prefixes whose reconstruction errors the loss sums, as fractions of dict_size (increasing, "
        "ending at 1; a prefix is round(fraction x dict_size) latents, so the same fractions serve every dict_size of a "
        "grid); not a grid axis",
    )
    l0_coef: float | list[float] = _arch_field(
        "l0_coef", f"coefficient {ARCH_SPECS['jumprelu'].knob_symbol} of the L0 penalty (a list is a grid axis)"
    )
    jump_bandwidth: float = _arch_field("jump_bandwidth", "width epsilon of the rectangle kernel of the straight-through estimator", gt=0)
    jump_init_threshold: float = _arch_field("jump_init_threshold", "initial threshold theta of every latent", gt=0)
    decoder_bias: bool = _arch_field("decoder_bias", "add a decoder bias b_d (subtracted before encoding)")
    decoder_bias_init: Literal["zeros", "geometric_median"] = Field(
        "zeros",
        description="with decoder_bias: start b_d at zero, or at the geometric median of 8192 training samples "
        "(Bricken et al. 2023); real activations have a large mean that zeros would spend hundreds of steps learning",
    )

    @property
    def knob(self) -> str:
        """The config key this architecture sweeps as its sparsity knob."""
        return SPARSITY_KNOBS[self.arch]

    def relevant(self) -> dict[str, Any]:
        """The keys that apply to this architecture, with their values (what identifies the SAE);
        keys added in later versions are left out while at their default."""
        fields = type(self).model_fields
        keys = ("arch", "dict_size", *ARCH_KEYS[self.arch], "decoder_bias", "decoder_bias_init")
        return {k: getattr(self, k) for k in keys if not (k in SAE_KEYS_NEW_IN_V2 and getattr(self, k) == fields[k].default)}

    @model_validator(mode="before")
    @classmethod
    def _arch_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("arch"), str) and data["arch"] in ARCH_DEFAULTS:
            data = {**ARCH_DEFAULTS[data["arch"]], **data}
        return data

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, arch: str) -> str:
        if arch not in KNOWN_ARCHS:
            raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(KNOWN_ARCHS)}")
        return arch

    @model_validator(mode="after")
    def _check(self) -> SAEConfig:
        if self.decoder_bias_init != "zeros" and not self.decoder_bias:
            raise ValueError(f"sae.decoder_bias_init {self.decoder_bias_init!r} needs sae.decoder_bias: true")
        # keys of another architecture are refused when set to anything but their default (so full dumps reload)
        fields = type(self).model_fields
        defaults = {**{k: fields[k].default for k in _ALL_ARCH_KEYS}, **ARCH_DEFAULTS.get(self.arch, {})}
        for key in _ALL_ARCH_KEYS:
            if key in self.model_fields_set and key not in ARCH_KEYS[self.arch] and getattr(self, key) != defaults[key]:
                users = [a for a, keys in ARCH_KEYS.items() if key in keys]
                raise ValueError(f"sae.{key} applies to {', '.join(users)} only, not {self.arch!r}")
        if self.decoder_init_norm != 1 and self.decoder_norm == "unit":
            raise ValueError(f"sae.decoder_init_norm {self.decoder_init_norm:g} needs sae.decoder_norm: free (unit rows start at norm 1)")
        for size in _as_list(self.k):
            if "k" in ARCH_KEYS[self.arch] and size > _smallest_size(self.dict_size):
                raise ValueError(f"k ({size}) is larger than dict_size ({_smallest_size(self.dict_size)})")
        if "prefix_fractions" in ARCH_KEYS[self.arch]:
            for size in _as_list(self.dict_size):
                prefix_sizes(size, self.prefix_fractions)  # ValueError when a dict_size cannot hold the prefixes
        return self

    @field_validator("dict_size", "k")
    @classmethod
    def _positive_sizes(cls, v: int | list[int], info: Any) -> int | list[int]:
        for size in _as_list(v):
            if size <= 0:
                raise ValueError(f"{info.field_name} must be positive, got {size}")
        if isinstance(v, list) and not v:
            raise ValueError(f"{info.field_name} list is empty")
        return v

    @field_validator("l1", "l0_coef")
    @classmethod
    def _nonnegative_coef(cls, v: float | list[float], info: Any) -> float | list[float]:
        for a in _as_list(v):
            if a < 0 or not math.isfinite(a):
                raise ValueError(f"{info.field_name} must be a finite number >= 0, got {a}")
        if isinstance(v, list) and not v:
            raise ValueError(f"{info.field_name} list is empty")
        return v


def _smallest_size(dict_size: int | list[int]) -> int:
    return min(_as_list(dict_size))


class TrainConfig(_Section):
    """The optimisation. Adam with a constant learning rate, fresh samples every step."""

    batch_size: int = Field(256, gt=0, description="samples per step (the report: 256)")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate (the report: 1e-3)")
    lr_decay: Literal["none", "linear"] = Field(
        "none", description="none: constant lr (the report); linear: decay to 0 over the last `lr_decay_fraction` of training"
    )
    lr_decay_fraction: float = Field(0.2, gt=0, le=1, description="fraction of training over which `linear` decays the lr")
    lr_warmup: float = Field(0.0, ge=0, lt=1, description="fraction of training over which the lr rises linearly from 0; 0 = off")
    l1_warmup: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="fraction of training over which the sparsity coefficient (l1, or jumprelu's l0_coef) rises linearly "
        "from 0 (Anthropic's 2024 update: 0.05); 0 = off",
    )
    resample_every: int = Field(
        0, ge=0, description="every this many samples, latents that did not fire since the last check are resampled; 0 = never (the report)"
    )
    resample_duplicates: bool = Field(
        False, description="also resample latents whose decoder direction nearly copies another's (cosine > duplicate_cosine)"
    )
    duplicate_cosine: float = Field(0.9, gt=0, le=1, description="cosine above which two decoder directions count as copies")
    resample_until: float = Field(0.5, gt=0, le=1, description="no resampling after this fraction of training")
    samples: int = Field(3_000_000, gt=0, description="training samples per SAE")
    seed: int = Field(0, ge=0, description="init seed of the SAE (used when `seeds` is not given)")
    seeds: list[int] | None = Field(None, description="init seeds; a list is a grid axis")
    seeds_min_size: int = Field(
        0,
        ge=0,
        description="dictionaries smaller than this train only the first of `seeds` (seed consensus needs two only at the largest sizes)",
    )
    device: str = Field("auto", description="auto = CUDA when present, else CPU; or any torch device string")
    parallel: Literal["members", "data"] = Field(
        "members",
        description="under torchrun (more than one process): members = the grid's SAEs are dealt to the ranks, each rank trains "
        "its share (a sweep); data = every SAE trains on all ranks, each rank on its slice of every batch (batch_size must "
        "divide by the number of ranks), gradients averaged by DistributedDataParallel (one large SAE). Ignored in a single process",
    )
    matmul_precision: Literal["highest", "high", "medium"] = Field(
        "highest",
        description="torch.set_float32_matmul_precision during training: highest = plain float32 (default); "
        "high = TF32 on NVIDIA GPUs; medium = bfloat16 products with float32 accumulation where the hardware has them "
        "(AMX on recent Xeons). Evaluation always runs in float32.",
    )
    log_every: int = Field(100, gt=0, description="steps between rows in the metrics-over-time table")
    checkpoint_every: int = Field(1_000_000, gt=0, description="samples between checkpoints (one is always written at the end)")
    eval_samples: int = Field(100_000, gt=0, description="fresh samples of the final evaluation; a latent that never fires on them is dead")
    ce_eval_tokens: int = Field(
        4096,
        ge=0,
        description="activations from a causal language model: held-out tokens on which the model's next-token loss is measured "
        "with the layer's activations replaced by each SAE's reconstruction (0 = off)",
    )

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int] | None) -> list[int] | None:
        if v is not None:
            if not v:
                raise ValueError("seeds list is empty")
            if any(s < 0 for s in v):
                raise ValueError("seeds must be >= 0")
        return v


class Config(_Section):
    """A whole experiment: the data, the SAE(s), the training."""

    source: SourceConfig = Field(default_factory=SourceConfig)
    sae: SAEConfig = Field(default_factory=SAEConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)


# Train keys added after run ids were first published: left out of a run's id while at their default.
TRAIN_KEYS_NEW_IN_V2 = ("lr_warmup", "l1_warmup")


class RunSpec(BaseModel):
    """One SAE of a grid: the config with every grid axis fixed to one value.

    `sparsity` is the value of the architecture's sparsity knob (`knob`: l1, k or l0_coef)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: str
    dict_size: int
    sparsity: float
    seed: int

    @property
    def knob(self) -> str:
        return SPARSITY_KNOBS[self.arch]

    @property
    def knob_value(self) -> int | float:
        """The knob's value as the config holds it (an int for k)."""
        return ARCH_SPECS[self.arch].knob_number(self.sparsity)


def _as_list(v: Any) -> list:
    return list(v) if isinstance(v, list) else [v]


def expand_grid(cfg: Config) -> list[RunSpec]:
    """Every (dict_size, sparsity knob, seed) combination the config describes, in a stable order."""
    seeds = cfg.train.seeds if cfg.train.seeds is not None else [cfg.train.seed]
    knob_values = _as_list(getattr(cfg.sae, cfg.sae.knob))
    return [
        RunSpec(arch=cfg.sae.arch, dict_size=m, sparsity=float(a), seed=s)
        for m, a, s in itertools.product(_as_list(cfg.sae.dict_size), knob_values, seeds)
        if m >= cfg.train.seeds_min_size or s == seeds[0]
    ]


def format_validation_error(err: ValidationError) -> str:
    """One line naming each bad key and why."""
    parts = []
    for e in err.errors():
        loc = ".".join(_printable(p) for p in e["loc"] if p not in ("function-after[_check(), SourceConfig]",))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown config key"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "bad config: " + "; ".join(parts)


def _printable(part: object) -> str:
    """A key as it reads in a one-line message: quoted when it holds a line break or other unprintable character."""
    text = str(part)
    return text if text.isprintable() else repr(text)


def set_key(data: dict, key: str, value: Any, what: str = "--set key") -> None:
    """Set `section.key` (any depth of dotted names) in a nested dict to `value`; `what` names the key in errors."""
    path = key.split(".") if isinstance(key, str) else [""]
    if any(not p for p in path):
        raise InputError(f"bad {what} {key!r}: expected section.key, e.g. sae.l1")
    node = data
    for p in path[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise InputError(f"bad {what} {key!r}: {p!r} is not a section")
        node = child
    node[path[-1]] = value


def set_override(data: dict, key: str, raw_value: str) -> None:
    """Apply `section.key=value` to a nested dict; the value is parsed as YAML (numbers, lists, booleans)."""
    try:
        value = yaml.safe_load(raw_value)
    except Exception:  # noqa: BLE001 - YAMLError, PyYAML's constructors' ValueError, KeyError (2001-13-45, !!bool maybe), RecursionError
        value = raw_value  # not YAML: the text itself, which validation then accepts or refuses
    set_key(data, key, value)


def parse_config(data: dict) -> Config:
    """Validate a nested dict into a Config, or raise InputError with a one-line reason."""
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise InputError(format_validation_error(err)) from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (or start from the defaults when `path` is None) and apply `key=value` overrides."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise InputError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            where = getattr(err, "problem_mark", None)
            line = f" (line {where.line + 1})" if where is not None else ""
            raise InputError(f"config is not valid YAML: {p}{line}") from None
        except Exception as err:  # noqa: BLE001 - PyYAML's constructors raise ValueError, KeyError (a date 2001-13-45), RecursionError
            why = str(err).splitlines()[0] if str(err) else ""
            raise InputError(f"config is not valid YAML: {p} ({type(err).__name__}: {why})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise InputError(f"config must be a YAML mapping of sections, got {type(loaded).__name__}: {p}")
        data = loaded
    for item in overrides:
        if "=" not in item:
            raise InputError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        set_override(data, key.strip(), raw.strip())
    return parse_config(data)
