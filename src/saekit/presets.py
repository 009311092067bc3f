"""Sweep presets for `saekit reproduce`: the grid is chosen from the width of the data actually given.

`quick` is not a grid: it runs the adaptive feature-count search (`saekit.count`) on the data these overrides
describe (`search_config`). The grids below are `grid`, `paper` and `synth`.

The width d is read from the data (saekit.sources.data_shape: a file's header, an activations folder's
manifest, a generated source's config), never from the config's defaults. The true feature count is unknown
to a real user, so `grid`'s dictionary sizes run geometrically from d/2 to 8·d and its L1 values
geometrically from the recommended default up; two init seeds are trained at the largest size for the
seed-consensus count. `paper` is the report's full grid instead, sized from the true feature count G; where
the data does not know G (a file without ground truth, activations) it assumes G = 2·d, the ratio of the
report's toy data. `synth` is the `grid` preset on SynthSAEBench-shaped data (`source.kind: synth` with its defaults,
4096 features in 256 dimensions, unless other source keys are given).
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any

from saekit.config import Config, SourceConfig, set_override

if TYPE_CHECKING:
    from saekit.sources.shape import DataShape

PRESETS = ("quick", "grid", "paper", "synth", "lm")

# The grid preset, named quick until the adaptive search took that name (calibrated on toy data, see docs/results.md,
# "The fixed grid on toy data"): sizes d/2 .. 8 d, a second init seed
# at the two largest sizes (the seed-consensus count needs two seeds where the dictionary has room for twice the
# features, so the grid counts up to about 4 d features; the count at 4 d beside the one at 8 d shows whether it still
# grows with size, which makes it a lower bound). 16 d would not fit in 10 minutes on 2 CPU cores at d = 256;
# `--set sae.dict_size=[...]` or the paper preset go further.
QUICK_MAX_SIZE_PER_D = 8
QUICK_SEEDS_FROM_PER_D = 4
QUICK_L1 = [0.3, 0.6, 1.2, 2.4]
QUICK_SAMPLES = 1_000_000
QUICK_LR = 3e-3
# Source kinds whose data is built without an offset (sums of non-negative codes times directions, no bias term).
# For every other kind (files, language-model activations, synth models with a dictionary bias) the sweep presets
# give the SAE a decoder bias started at the data's geometric median, so an offset in the data is not spent on latents:
# a user need not know whether the data is centred, biased or neither.
NO_OFFSET_KINDS = ("toy", "tms", "compute")
OFFSET_SAE = {"decoder_bias": True, "decoder_bias_init": "geometric_median"}
# QUICK_L1 was calibrated on those in-house sources, whose samples have an RMS norm about their mean near TOY_RMS
# (the report's data: 5 active features on unit directions, E[c^2] = 1/3 each). The L1 term grows with the data's
# scale and the MSE with its square, so for any other data the grid's values are multiplied by the data's centred
# RMS norm over TOY_RMS (SynthSAEBench-shaped data, with values near 5, is about 7 times the toy data's scale).
TOY_RMS = math.sqrt(5.0 / 3.0)
SCALE_SAMPLES = 8192
# The report's grid: alpha = 10^(k/4), k = -8..8; sizes G/4 .. 32 G by factors of 2.
PAPER_L1 = [10 ** (k / 4) for k in range(-8, 9)]
PAPER_SAMPLES = 3_000_000
# G for grids when the data does not know it (a file without ground truth, activations): the toy data's ratio
# of features to width, the source defaults' n_features / d (the report's 512 features in 256 dimensions: 2).
TOY_FEATURES_PER_D = SourceConfig.model_fields["n_features"].default // SourceConfig.model_fields["d"].default


# The lm preset (docs/guides/language-models.md): SmolLM2's middle residual stream, 2M tokens of stdlib text
# (docstrings, then source code: the docstrings alone hold about 0.5M tokens), one epoch per SAE.
LM_DEFAULTS: dict[str, Any] = {
    "model": "smollm2",
    "layer": None,  # None: the middle block, n_layers // 2
    "site": "resid",
    "text": "stdlib,stdlib-code",
    "tokens": 2_000_000,
    "window": 128,
    "dtype": "float16",
}
# Sizes d, 2d, 4d and L1 values around where, on SmolLM2's layer-15 residual stream, a 4d dictionary's L0 falls
# through 64 (docs/guides/language-models.md, "The lm preset": at batch 256 after 250k samples, L1 6 gave L0 52 and FVU 0.16, L1 8 gave
# L0 32 and FVU 0.19); under the report's L1-on-the-mean convention smaller dictionaries are sparser at the same
# value. Batch 256 (the report's): at batch 1024 the same samples gave FVU 0.33 at L0 74 (4x fewer Adam steps).
LM_SIZES_PER_D = [1, 2, 4]
LM_L1 = [4.0, 6.0, 8.0, 11.0]
LM_SAMPLES = 1_000_000  # per SAE (about half an epoch of 2M tokens): 16 SAEs train in about half an hour on 2 CPU cores
LM_TRAIN = {"batch_size": 256, "lr": 1e-3, "lr_decay": "linear", "matmul_precision": "medium"}


def split_lm_overrides(overrides: list[str]) -> tuple[dict[str, Any], list[str]]:
    """`lm.KEY=VALUE` overrides (the extraction: model, layer, site, text, tokens, window, dtype) and the rest."""
    from saekit.errors import InputError

    lm: dict[str, Any] = dict(LM_DEFAULTS)
    rest = []
    for item in overrides:
        key, _, raw = item.partition("=")
        key = key.strip()
        if key.startswith("lm."):
            name = key.removeprefix("lm.")
            if name not in LM_DEFAULTS:
                raise InputError(f"unknown key {key!r}; lm keys: {', '.join(LM_DEFAULTS)}")
            data: dict[str, Any] = {}
            set_override(data, name, raw.strip())
            lm[name] = data[name]
        else:
            rest.append(item)
    for name in ("tokens", "window"):
        if not isinstance(lm[name], int) or isinstance(lm[name], bool) or lm[name] <= 0:
            raise InputError(f"lm.{name} must be a positive integer, got {lm[name]!r}")
    if lm["layer"] is not None and (not isinstance(lm["layer"], int) or lm["layer"] < 0):
        raise InputError(f"lm.layer must be a non-negative integer, got {lm['layer']!r}")
    return lm, rest


def lm_config(activations: str, d: int, train_rows: int, overrides: list[str] = ()) -> Config:
    """The lm preset's sweep on an activations folder of width d: sizes d, 2d, 4d x four L1 values, a second init
    seed at the largest size, LM_SAMPLES training rows per SAE (or all of them, if fewer); `overrides` (not lm.*)
    apply on top."""
    from saekit.config import parse_config

    data = overrides_dict(overrides)
    sae = {"dict_size": [k * d for k in LM_SIZES_PER_D], "l1": LM_L1, **OFFSET_SAE, **data.get("sae", {})}
    largest = max(sae["dict_size"]) if isinstance(sae["dict_size"], list) and sae["dict_size"] else sae["dict_size"]
    merged = {
        "source": {"kind": "activations", "path": activations, "d": d, **data.get("source", {})},
        "sae": sae,
        "train": {**LM_TRAIN, "samples": min(train_rows, LM_SAMPLES), "seeds": [0, 1], "seeds_min_size": largest, **data.get("train", {})},
    }
    merged.update({k: v for k, v in data.items() if k not in ("source", "sae", "train")})
    return parse_config(merged)


def overrides_dict(overrides: list[str]) -> dict[str, Any]:
    """`section.key=value` overrides as the nested dict they describe (values parsed as YAML)."""
    data: dict[str, Any] = {}
    for item in overrides:
        key, _, raw = item.partition("=")
        set_override(data, key.strip(), raw.strip())
    return data


def geometric_sizes(lo: float, hi: float) -> list[int]:
    """Powers-of-two multiples of lo up to hi: e.g. d/2 .. 16 d."""
    n = int(math.floor(math.log2(hi / lo) + 1e-9)) + 1
    return [max(1, int(round(lo * 2**i))) for i in range(n)]


def grid_features(shape: DataShape) -> tuple[int, bool]:
    """(G to size grids by, whether it was assumed): the data's own G, else TOY_FEATURES_PER_D * d."""
    if shape.n_features is not None:
        return shape.n_features, False
    return TOY_FEATURES_PER_D * shape.d, True


def data_scale(source: SourceConfig) -> float:
    """The centred RMS norm of the data relative to the toy data's (1 for the in-house offset-free sources, whose
    scale the presets were calibrated on): sqrt(mean ||x - mean(x)||^2) over SCALE_SAMPLES samples / TOY_RMS."""
    if source.kind in NO_OFFSET_KINDS:
        return 1.0
    return _measured_scale(source.model_dump_json(exclude_unset=True), _file_stamp(source.path))


def _file_stamp(path: Any) -> tuple[int, int] | None:
    """(mtime in ns, size) of the file or folder a source reads, so a rewritten file is measured again."""
    from pathlib import Path

    try:
        st = Path(path).stat() if path is not None else None
    except OSError:
        return None
    return None if st is None else (st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=8)
def _measured_scale(source_json: str, stamp: tuple[int, int] | None) -> float:
    """`data_scale` of the source config serialised as `source_json` (cached per file stamp: the preset and its
    description both ask)."""
    from saekit.sources import Stream, make_source

    source = SourceConfig.model_validate_json(source_json)
    x = make_source(source).batch(SCALE_SAMPLES, 0, Stream.BIAS_INIT).double()
    return float((x - x.mean(dim=0)).pow(2).sum(dim=1).mean().sqrt()) / TOY_RMS


def preset_grid(preset: str, shape: DataShape, scale: float = 1.0) -> dict[str, dict[str, Any]]:
    """The sae and train keys a sweep preset sets for data of this shape and scale (`data_scale`), before overrides."""
    if preset in ("grid", "synth"):
        d = shape.d
        l1 = QUICK_L1 if scale == 1.0 else [float(f"{a * scale:.3g}") for a in QUICK_L1]
        return {
            "sae": {"dict_size": geometric_sizes(d / 2, QUICK_MAX_SIZE_PER_D * d), "l1": l1},
            "train": {"samples": QUICK_SAMPLES, "lr": QUICK_LR, "seeds": [0, 1], "seeds_min_size": QUICK_SEEDS_FROM_PER_D * d},
        }
    g, _ = grid_features(shape)
    return {
        "sae": {"dict_size": geometric_sizes(g / 4, 32 * g), "l1": PAPER_L1},
        "train": {"samples": PAPER_SAMPLES, "seeds": [0, 1], "seeds_min_size": 8 * g},
    }


def preset_config(preset: str, overrides: list[str] = ()) -> Config:
    """The Config of a sweep preset (grid, paper, synth) after `key=value` overrides (source.* keys change the data; any
    key may be set). The grid follows the data's width (`data_shape`); an explicit source.d that differs from a
    file's or folder's width is refused (InputError)."""
    from saekit.config import parse_config
    from saekit.errors import InputError
    from saekit.sources.shape import data_shape

    if preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    if preset == "quick":
        raise InputError("the quick preset is the adaptive search, not a grid: saekit.presets.search_config builds its config")
    if preset == "lm":
        raise InputError("the lm preset extracts activations first: saekit.pipeline.reproduce_lm builds its config")
    data = overrides_dict(overrides)
    if preset == "synth":
        data["source"] = synth_source(data.get("source", {}))
    source = parse_config({"source": data.get("source", {})}).source
    shape = data_shape(source)
    given_l1 = "l1" in data.get("sae", {}) or data.get("sae", {}).get("arch", "relu") != "relu"
    grid = preset_grid(preset, shape, 1.0 if preset == "paper" or given_l1 else data_scale(source))
    wants_bias = source.kind not in NO_OFFSET_KINDS and data.get("sae", {}).get("decoder_bias") is not False
    offset = OFFSET_SAE if wants_bias else {}
    merged = {
        "source": data.get("source", {}),
        "sae": {**grid["sae"], **offset, **data.get("sae", {})},
        "train": {**grid["train"], **data.get("train", {})},
    }
    extra = set(data) - {"source", "sae", "train"}
    merged.update({k: data[k] for k in extra})
    return parse_config(merged)


def synth_source(source: dict[str, Any]) -> dict[str, Any]:
    """The synth preset's source keys: `kind: synth` unless given (another kind is refused in one line)."""
    from saekit.errors import InputError

    kind = source.get("kind", "synth")
    if kind != "synth":
        raise InputError(f"the synth preset generates SynthSAEBench-shaped data (source.kind synth), not {kind!r}; use --preset grid")
    return {**source, "kind": "synth"}


def describe(preset: str, cfg: Config) -> str:
    """One paragraph for stderr before a preset starts: the data the grid was sized from, the grid, and roughly
    how long it will take here."""
    from saekit.config import expand_grid
    from saekit.sources.shape import data_shape

    shape = data_shape(cfg.source)
    specs = expand_grid(cfg)
    latent_samples = sum(s.dict_size for s in specs) * cfg.train.samples
    # 10 d FLOPs per latent per sample; ~150 GFLOP/s is what sweeps sustained on 2 CPU cores (the grid, then called
    # quick: 24 SAEs in 6.5 min).
    minutes = 10 * shape.d * latent_samples / 150e9 / 60
    duration = "under a minute" if minutes < 1 else f"about {minutes:.0f} min" if minutes < 120 else f"about {minutes / 60:.1f} h"
    sizes = sorted({s.dict_size for s in specs})
    values = ", ".join(f"{a:.3g}" for a in sorted({s.sparsity for s in specs}))
    bias = "the SAEs have a decoder bias started at the data's geometric median; " if cfg.sae.decoder_bias else ""
    if preset in ("grid", "synth") and cfg.source.kind not in NO_OFFSET_KINDS and cfg.sae.arch == "relu":
        bias += f"the data's centred RMS norm is {data_scale(cfg.source):.2f} x the toy data's, and the L1 values follow it; "
    return (
        f"saekit reproduce --preset {preset}: {len(specs)} SAEs, sizes {sizes}, {cfg.sae.knob} values [{values}], "
        f"seeds {cfg.train.seeds} (both from size {cfg.train.seeds_min_size}), {cfg.train.samples:,} samples each; "
        f"{_grid_basis(preset, shape)}; {bias}"
        f"training alone takes {duration} at 150 GFLOP/s (2 CPU cores; far less on a GPU)."
    )


def _grid_basis(preset: str, shape: DataShape) -> str:
    """What the preset sized its grid from: the data's width, and for paper its true feature count G."""
    basis = f"the grid follows the data's width d = {shape.d} (from the {shape.origin})"
    if preset != "paper":
        return basis
    g, assumed = grid_features(shape)
    if not assumed:
        return f"{basis} and its {g} true features"
    return (
        f"{basis}; the data does not say how many true features it has, so the grid assumes G = {TOY_FEATURES_PER_D}·d = {g}, "
        f"the ratio of the report's toy data (512 features in 256 dimensions)"
    )


def search_config(overrides: list[str] = ()) -> Config:
    """The quick preset's config: the data the `key=value` overrides describe (the report's toy data by default) and
    the adaptive search's recipe (`saekit.count.COUNT_TRAIN`), overrides on top."""
    from saekit.count import count_config

    return count_config(None, overrides)
