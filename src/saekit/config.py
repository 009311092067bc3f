"""Typed configs (pydantic v2, unknown keys refused), YAML loading, `--set` overrides, grid expansion.

A config has three sections, each a flat model whose fields are documented
below; every default is the value we recommend for the report's toy data.
Lists in `sae.dict_size`, `sae.l1` or `train.seeds` make a grid: one SAE per
combination.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from saekit.errors import InputError

# Names of the architectures in `saekit.sae.ARCHITECTURES` (kept here so that
# configs validate without importing torch; a test keeps the two in step).
KNOWN_ARCHS = ("relu",)

# The recommended L1 coefficient for the report's toy data (d=256, G=512, 1024
# latents) with `l1_reduction: mean`, batch 256, Adam lr 1e-3: on fresh seeds it
# reached MMCS >= 0.996 with every true feature recovered at cosine 0.9 within 3M
# samples (README, "Results"). 0.1 and 1.0 were both worse (MMCS 0.986, 0.982).
# With the mean reduction the effective penalty per latent shrinks as 1/dict_size.
DEFAULT_L1 = 0.3


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_assignment=True)


# Defaults that differ by source kind, applied when the key is not given. `tms` is the setting of the
# acceptance test in issue 4 (80 features in 20 dimensions); `compute` a small MLP computing |x| of 64
# features through a 32-wide embedding with 48 hidden neurons (README, "Ground truth from trained models").
KIND_DEFAULTS: dict[str, dict[str, Any]] = {
    "tms": {"d": 20, "n_features": 80, "sparsity": 0.97, "importance_decay": 0.97},
    "compute": {"d": 48, "n_features": 64, "embed_dim": 32, "sparsity": 0.97, "importance_decay": 1.0},
}
TOY_ONLY_KEYS = ("prob_decay", "mean_active", "correlated", "magnitude_decay", "noise_std", "n_samples")
MODEL_ONLY_KEYS = ("sparsity", "importance_decay", "model_steps")  # tms and compute
ACTIVATIONS_ONLY_KEYS = ("buffer_size", "skip_positions", "max_norm_ratio", "normalize", "eval_fraction")


class SourceConfig(_Section):
    """Where activations come from. `toy` is the report's generator; `tms` and `compute` are small models
    trained in-house whose hidden activations carry known features; `file` is a tensor on disk;
    `activations` a folder of a language model's activations written by `saekit activations`."""

    kind: Literal["toy", "tms", "compute", "file", "activations"] = Field(
        "toy",
        description="toy: the report's generator; tms: a Toy Models of Superposition autoencoder's hidden layer; "
        "compute: an MLP computing |x| in superposition, its hidden layer; file: a tensor on disk; "
        "activations: a folder of activation shards written by `saekit activations`",
    )
    d: int = Field(256, gt=0, description="width of the activations the SAE reads (tms: 20, compute: 48); `file`: read from the data")
    n_features: int = Field(512, gt=0, description="G, the number of true (input) features (tms: 80, compute: 64)")
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
    seed: int = Field(0, ge=0, description="seeds the true features (or the model) and the data stream")
    n_samples: int | None = Field(
        None, gt=0, description="toy: fixed dataset of this many samples, cycled in shuffled epochs; null = fresh samples every step"
    )
    path: str | None = Field(
        None,
        description="`file`: a .safetensors (tensor 'activations', optional 'ground_truth') or .npy file of shape (N, d); "
        "`activations`: the folder `saekit activations` wrote",
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
            "file": ("path",),
            "activations": ("path", *ACTIVATIONS_ONLY_KEYS),
        }[self.kind]
        return {"kind": self.kind, **{k: getattr(self, k) for k in keys}, "seed": self.seed}

    @model_validator(mode="before")
    @classmethod
    def _kind_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("kind") in KIND_DEFAULTS:
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
        if self.kind == "toy" and self.mean_active > self.n_features:
            raise ValueError(f"mean_active ({self.mean_active}) is larger than n_features ({self.n_features})")
        if self.kind in ("file", "activations") and not self.path:
            raise ValueError(f"source.kind {self.kind!r} needs source.path")
        if self.kind not in ("file", "activations") and self.path is not None:
            raise ValueError(f"source.path applies to kinds 'file' and 'activations' only, not {self.kind!r}")
        return self


class SAEConfig(_Section):
    """The sparse autoencoder. Defaults: the report's SAE (ReLU, L1 on the mean, unit-norm decoder, no decoder bias)."""

    arch: str = Field("relu", description=f"architecture, one of {', '.join(KNOWN_ARCHS)}")
    dict_size: int | list[int] = Field(1024, description="number of latents m (a list makes a grid axis)")
    l1: float | list[float] = Field(DEFAULT_L1, description="L1 coefficient alpha (a list makes a grid axis)")
    l1_reduction: Literal["mean", "sum"] = Field(
        "mean", description="mean: alpha * mean over latents and batch of |c| (the report); sum: summed over latents, mean over batch"
    )
    decoder_bias: bool = Field(False, description="add a decoder bias b_d (subtracted before encoding); off in the report")
    decoder_bias_init: Literal["zeros", "geometric_median"] = Field(
        "zeros",
        description="with decoder_bias: start b_d at zero, or at the geometric median of 8192 training samples "
        "(Bricken et al. 2023); real activations have a large mean that zeros would spend hundreds of steps learning",
    )

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, arch: str) -> str:
        if arch not in KNOWN_ARCHS:
            raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(KNOWN_ARCHS)}")
        return arch

    @model_validator(mode="after")
    def _bias_init_needs_bias(self) -> SAEConfig:
        if self.decoder_bias_init != "zeros" and not self.decoder_bias:
            raise ValueError(f"sae.decoder_bias_init {self.decoder_bias_init!r} needs sae.decoder_bias: true")
        return self

    @field_validator("dict_size")
    @classmethod
    def _positive_sizes(cls, v: int | list[int]) -> int | list[int]:
        for size in _as_list(v):
            if size <= 0:
                raise ValueError(f"dict_size must be positive, got {size}")
        if isinstance(v, list) and not v:
            raise ValueError("dict_size list is empty")
        return v

    @field_validator("l1")
    @classmethod
    def _nonnegative_l1(cls, v: float | list[float]) -> float | list[float]:
        for a in _as_list(v):
            if a < 0 or not math.isfinite(a):
                raise ValueError(f"l1 must be a finite number >= 0, got {a}")
        if isinstance(v, list) and not v:
            raise ValueError("l1 list is empty")
        return v


class TrainConfig(_Section):
    """The optimisation. Adam with a constant learning rate, fresh samples every step."""

    batch_size: int = Field(256, gt=0, description="samples per step (the report: 256)")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate (the report: 1e-3)")
    lr_decay: Literal["none", "linear"] = Field(
        "none", description="none: constant lr (the report); linear: decay to 0 over the last `lr_decay_fraction` of training"
    )
    lr_decay_fraction: float = Field(0.2, gt=0, le=1, description="fraction of training over which `linear` decays the lr")
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


class RunSpec(BaseModel):
    """One SAE of a grid: the config with every grid axis fixed to one value."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: str
    dict_size: int
    l1: float
    seed: int


def _as_list(v: Any) -> list:
    return list(v) if isinstance(v, list) else [v]


def expand_grid(cfg: Config) -> list[RunSpec]:
    """Every (dict_size, l1, seed) combination the config describes, in a stable order."""
    seeds = cfg.train.seeds if cfg.train.seeds is not None else [cfg.train.seed]
    return [
        RunSpec(arch=cfg.sae.arch, dict_size=m, l1=float(a), seed=s)
        for m, a, s in itertools.product(_as_list(cfg.sae.dict_size), _as_list(cfg.sae.l1), seeds)
        if m >= cfg.train.seeds_min_size or s == seeds[0]
    ]


def format_validation_error(err: ValidationError) -> str:
    """One line naming each bad key and why."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if p not in ("function-after[_check(), SourceConfig]",))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown config key"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "bad config: " + "; ".join(parts)


def set_override(data: dict, key: str, raw_value: str) -> None:
    """Apply `section.key=value` to a nested dict; the value is parsed as YAML (numbers, lists, booleans)."""
    path = key.split(".")
    if any(not p for p in path):
        raise InputError(f"bad --set key {key!r}")
    try:
        value = yaml.safe_load(raw_value)
    except yaml.YAMLError:
        value = raw_value
    node = data
    for p in path[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise InputError(f"bad --set key {key!r}: {p!r} is not a section")
        node = child
    node[path[-1]] = value


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
