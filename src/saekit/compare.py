"""`saekit compare`: every architecture on the same ground-truth data at a matched L0, in one table.

TopK, BatchTopK and Matryoshka take the target L0 as their k. The architectures with a penalty (relu, jumprelu,
gated) cannot be told an L0, so each trains a small grid of coefficients around its default as one
ensemble, and the member whose L0 is nearest the target (in log ratio) stands for it; the JSON keeps
the whole grid. Every architecture sees the same data stream (same source config and seed) and the
same training budget. The table: MMCS, recovered fraction, FVU, L0, dead fraction, the samples
after which MMCS first reached 0.95 (measured every `train.log_every` steps), and SynthSAEBench's scores:
MCC, mean F1 of the latents as feature detectors, absorption (when the data has parent features), split
count and shrinkage (`saekit.metrics.truth_window`; a dash where the source gives no true codes).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from saekit.archspec import ARCH_SPECS
from saekit.atomic import atomic_write_bytes
from saekit.config import KNOWN_ARCHS, SPARSITY_KNOBS, Config, load_config
from saekit.errors import InputError
from saekit.outlock import hold_out_dir
from saekit.presets import NO_OFFSET_KINDS, OFFSET_SAE, TOY_FEATURES_PER_D, data_scale, grid_features, overrides_dict, synth_source

# Coefficients tried for a penalty architecture: its default times these factors.
PENALTY_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)
# The dictionary size when sae.dict_size is not given: this many latents per true feature G (the report's data:
# 2 x 512 = 1024). Where the data does not know G it is taken as 2 d (saekit.presets.grid_features).
SIZE_PER_FEATURE = 2
# Presets: `toy` is the report's data (the config defaults); `synth` is SynthSAEBench-shaped data (source.kind synth,
# whose defaults are SynthSAEBench-16k's settings at 4096 features in 256 dimensions). SynthSAEBench trains 4096
# latents for its 16,384 features, so the synth preset's dictionary has G/4 latents (1024 at the defaults).
PRESETS = ("toy", "synth")
SYNTH_LATENTS_PER_FEATURE = 0.25
COLUMNS = ("arch", "knob", "value", "l0", "mmcs", "recovered_0_9", "fvu", "dead_fraction", "samples_to_mmcs_0_95", "seconds")
TRUTH_COLUMNS = ("mcc", "f1", "absorption", "split", "shrinkage")  # after COLUMNS; absorption only where the run has it


def knob_grid(arch: str, target_l0: int, dict_size: int, scale: float = 1.0) -> list[int | float]:
    """The values of the architecture's sparsity knob to train: [target_l0] for k, else the default (for data `scale`
    times the toy data's scale, `ArchSpec.scaled_defaults`) times PENALTY_FACTORS."""
    spec = ARCH_SPECS[arch]
    if spec.integer_knob:
        if target_l0 > dict_size:
            raise InputError(f"target L0 {target_l0} is larger than dict_size {dict_size}")
        return [target_l0]
    default = {**spec.defaults, **spec.scaled_defaults(scale)}[spec.knob]
    return [float(f"{default * f:.4g}") for f in PENALTY_FACTORS]


def nearest_l0(rows: list[dict[str, Any]], target_l0: float) -> dict[str, Any]:
    """The finished row whose L0 is nearest the target in log ratio (ties: the first)."""
    done = [r for r in rows if r.get("status") == "done" and r.get("l0", 0) > 0]
    if not done:
        raise InputError("no SAE of this architecture finished with any active latent")
    return min(done, key=lambda r: abs(math.log(r["l0"] / target_l0)))


def compare_config(arch: str, base: Config, target_l0: int, scale: float = 1.0) -> Config:
    """`base` with the architecture and its knob grid set; its other keys in units of the data (`ArchSpec.data_units`)
    follow the data's `scale`, and on data other than the in-house offset-free sources every architecture has a decoder
    bias started at the geometric median (as in the presets); the rest take the architecture's defaults."""
    data = base.model_dump()
    dict_size = data["sae"]["dict_size"]
    if isinstance(dict_size, list):
        raise InputError("compare trains one dictionary size; give sae.dict_size a single value")
    knob = SPARSITY_KNOBS[arch]
    offset = {} if base.source.kind in NO_OFFSET_KINDS else OFFSET_SAE  # data that may have an offset, as the presets do
    data["sae"] = {"arch": arch, "dict_size": dict_size, **offset, **ARCH_SPECS[arch].scaled_defaults(scale)}
    data["sae"][knob] = knob_grid(arch, target_l0, dict_size, scale)
    data["train"]["seeds"] = None
    return Config.model_validate(data)


def compare_base(overrides: list[str], preset: str = "toy") -> tuple[Config, str]:
    """The config `overrides` describe (the preset's data: toy defaults, or source.kind synth), with sae.dict_size,
    when not given, sized from the data (SIZE_PER_FEATURE x G; synth: SYNTH_LATENTS_PER_FEATURE x G); and one
    sentence saying where the size came from. Other sae keys are refused."""
    from saekit.sources.shape import data_shape

    if preset not in PRESETS:
        raise InputError(f"unknown compare preset {preset!r}; known: {', '.join(PRESETS)}")
    keys = [o.split("=", 1)[0].strip() for o in overrides]
    sae_keys = [k for k in keys if k.startswith("sae.") and k != "sae.dict_size"]
    if sae_keys:
        raise InputError(f"compare sets each architecture's sae keys itself; only sae.dict_size may be given, not {sae_keys[0]!r}")
    if preset == "synth":
        overrides = synth_overrides(overrides)
    base = load_config(None, overrides)
    shape = data_shape(base.source)
    if "sae.dict_size" in keys:
        return base, f"dict_size {base.sae.dict_size} as given (data width d = {shape.d}, from the {shape.origin})"
    g, assumed = grid_features(shape)
    per_feature = SYNTH_LATENTS_PER_FEATURE if preset == "synth" else SIZE_PER_FEATURE
    size = max(1, round(per_feature * g))
    base.sae.dict_size = size
    why = f"G = {g} true features"
    if assumed:
        why = f"G unknown for this data, assumed {TOY_FEATURES_PER_D}·d = {g} as in the report's toy data"
    return base, f"dict_size {size} = {per_feature:g}·G ({why}; data width d = {shape.d}, from the {shape.origin})"


def synth_overrides(overrides: list[str]) -> list[str]:
    """`overrides` with source.kind=synth first (another source kind is refused in one line)."""
    synth_source(overrides_dict(overrides).get("source", {}))
    return ["source.kind=synth", *overrides]


def default_target_l0(cfg: Config) -> int:
    """The data's own mean number of active true features, rounded (toy: mean_active; tms, compute:
    n_features x (1 - sparsity); synth: the sum of its features' firing probabilities); 8 for sources that do
    not say."""
    src = cfg.source
    if src.kind == "toy":
        return max(1, round(src.mean_active))
    if src.kind in ("tms", "compute"):
        return max(1, round(src.n_features * (1 - src.sparsity)))
    if src.kind == "synth":
        from saekit.sources import make_source

        return max(1, round(float(make_source(src).probs.sum())))
    return 8


def run_compare(
    overrides: list[str],
    out_dir: str | Path,
    *,
    archs: list[str] | None = None,
    target_l0: int | None = None,
    preset: str = "toy",
    progress: bool = True,
    max_memory: int | None = None,
    log: Any = None,
    wait: bool = False,
) -> dict[str, Any]:
    """Train every architecture (default: all) on the source and train config of `overrides` (on the preset's
    data: the toy defaults, or `synth`'s SynthSAEBench-shaped source) into OUT/ARCH/, pick each one's SAE
    nearest `target_l0` (default: `default_target_l0`), and write OUT/compare.json and OUT/compare.md.

    sae.dict_size, when not given, is sized from the data (`compare_base`).
    Returns {"target_l0", "dict_size", "rows" (one per arch, the table), "candidates" (every SAE trained), "table" (markdown)}.
    """
    say = log or (lambda text: None)
    archs = list(archs or KNOWN_ARCHS)
    unknown = [a for a in archs if a not in KNOWN_ARCHS]
    if unknown:
        raise InputError(f"unknown architecture {unknown[0]!r}; known: {', '.join(KNOWN_ARCHS)}")
    with hold_out_dir(out_dir, wait=wait):
        base, basis = compare_base(overrides, preset)
        say(f"compare: {basis}")
        target_l0 = default_target_l0(base) if target_l0 is None else target_l0
        if target_l0 <= 0:
            raise InputError(f"target L0 must be positive, got {target_l0}")
        scale = data_scale(base.source)
        if scale != 1.0:
            say(f"compare: the data's centred RMS norm is {scale:.2f} x the toy data's; the penalties and thresholds follow it")
        return _compare_archs(archs, base, target_l0, scale, Path(out_dir), progress, max_memory, say)


def _compare_archs(
    archs: list[str],
    base: Config,
    target_l0: int,
    scale: float,
    out: Path,
    progress: bool,
    max_memory: int | None,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Train each architecture into OUT/ARCH, pick its SAE nearest the target L0, write compare.json and compare.md."""
    from saekit.train.run import run_config

    rows, candidates = [], []
    for arch in archs:
        cfg = compare_config(arch, base, target_l0, scale)
        values = knob_grid(arch, target_l0, int(cfg.sae.dict_size), scale)
        say(f"compare: {arch}, {cfg.sae.knob} in {values}, {cfg.train.samples:,} samples each")
        results, errors = run_config(cfg, out / arch, progress=progress, max_memory=max_memory)
        for e in errors:
            say(f"compare: {arch}: {e}")
        candidates.extend(results)
        chosen = nearest_l0(results, target_l0)
        knob = SPARSITY_KNOBS[arch]
        rows.append(
            {"arch": arch, "knob": knob, "value": chosen[knob], **{c: chosen.get(c) for c in COLUMNS[3:]}, "run_id": chosen["run_id"]}
            | {c: chosen.get(c) for c in TRUTH_COLUMNS if c != "absorption" or c in chosen}
        )
    table = markdown_table(rows)
    doc = {"target_l0": target_l0, "dict_size": base.sae.dict_size, "data_scale": scale, "rows": rows, "candidates": candidates}
    doc["table"] = table
    atomic_write_bytes(out / "compare.json", json.dumps(doc, indent=2).encode())
    atomic_write_bytes(out / "compare.md", (table + "\n").encode())
    return doc


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The comparison as a Markdown table, one line per architecture (the absorption column when any row has it)."""
    absorption = any("absorption" in r for r in rows)
    head = "| arch | knob | MMCS | recovered (cos ≥ 0.9) | FVU | L0 | dead | samples to MMCS 0.95 | MCC | F1 |"
    head += " absorption |" * absorption + " split | shrinkage |"
    lines = [head, "|---" * head.count(" |") + "|"]
    for r in rows:
        reach = r.get("samples_to_mmcs_0_95")
        line = (
            f"| {r['arch']} | {r['knob']} = {r['value']:g} | {r['mmcs']:.3f} | {r['recovered_0_9']:.3f} | {r['fvu']:.3f} | "
            f"{r['l0']:.1f} | {r['dead_fraction']:.1%} | {'not reached' if reach is None else f'{reach / 1e6:.2f}M'} |"
        )
        cells = [_cell(r.get("mcc"), ".3f"), _cell(r.get("f1"), ".3f")]
        cells += [_cell(r.get("absorption"), ".1%")] * absorption + [_cell(r.get("split"), "d"), _cell(r.get("shrinkage"), ".3f")]
        lines.append(line + "".join(f" {c} |" for c in cells))
    return "\n".join(lines)


def _cell(value: float | int | None, spec: str) -> str:
    """A table cell: the value formatted, or a dash when it was not measured."""
    return "—" if value is None else format(value, spec)
