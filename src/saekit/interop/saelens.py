"""SAELens folders: cfg.json + sae_weights.safetensors (+ optional sparsity.safetensors).

Layout as SAELens 6 writes it (`SAE.save_model`, `TrainingSAE.save_inference_model`) and reads it
(`SAE.load_from_disk`): tensors W_enc (d_in, d_sae), W_dec (d_sae, d_in), b_dec (d_in), and per
architecture b_enc (d_sae) (standard, topk, jumprelu), threshold (d_sae) (jumprelu), b_gate, r_mag,
b_mag (d_sae) (gated), topk_threshold () (batchtopk and matryoshka_batchtopk training checkpoints). cfg.json
holds d_in, d_sae, architecture, apply_b_dec_to_input (b_dec subtracted from the input before encoding),
normalize_activations, dtype, metadata; topk adds k and rescale_acts_by_decoder_norm; matryoshka_batchtopk
adds matryoshka_widths (the nested prefixes' widths, increasing; SAELens appends d_sae when the list does not
end there). Configs written before SAELens 6 lack `architecture` (standard, or topk through activation_fn = "topk").

Architectures: saekit relu <-> standard, topk <-> topk, jumprelu <-> jumprelu, gated <-> gated; saekit
batchtopk and matryoshka are written as SAELens writes its own BatchTopK and Matryoshka BatchTopK SAEs for
inference, a jumprelu whose every latent has the batch threshold, with metadata training_architecture and
training_architecture_details (matryoshka: matryoshka_widths and k); SAELens training checkpoints
(batchtopk, matryoshka_batchtopk) are read as saekit batchtopk and matryoshka.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from saekit import __version__
from saekit.atomic import atomic_save_tensors, atomic_write_bytes, replace_together
from saekit.errors import InputError
from saekit.interop.weights import ForeignSAE
from saekit.io import fold_input_scale
from saekit.sae import SparseAutoencoder

CFG_NAME, WEIGHTS_NAME, SPARSITY_NAME = "cfg.json", "sae_weights.safetensors", "sparsity.safetensors"
SCALER_NAME = "activation_scaler.json"  # SAELens training checkpoints: the activation scaling factor
# The cfg.json layout written here is SAELens 6's; SAELens reads configs without this version as pre-6 ones.
LAYOUT_VERSION = "6.0.0"
TO_SAEKIT = {
    "standard": "relu",
    "topk": "topk",
    "jumprelu": "jumprelu",
    "gated": "gated",
    "batchtopk": "batchtopk",
    "matryoshka_batchtopk": "matryoshka",
}
FROM_SAEKIT = {
    "relu": "standard",
    "topk": "topk",
    "batchtopk": "jumprelu",
    "jumprelu": "jumprelu",
    "gated": "gated",
    "matryoshka": "jumprelu",
}
# saekit architectures SAELens writes as a jumprelu for inference, and the name of the SAELens training architecture
# (metadata training_architecture) they come from.
THRESHOLD_ARCHS = {"batchtopk": "batchtopk", "matryoshka": "matryoshka_batchtopk"}


# -- reading ------------------------------------------------------------------------------------


def read_saelens(folder: Path) -> ForeignSAE:
    """The SAE in a SAELens folder, acting on raw activations; InputError on anything saekit cannot represent."""
    cfg_path, weights_path = folder / CFG_NAME, folder / WEIGHTS_NAME
    cfg = _read_json_object(cfg_path)
    metadata = cfg.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise InputError(f"{cfg_path}: metadata must be an object, got {type(metadata).__name__}")
    version = cfg.get("sae_lens_version") or metadata.get("sae_lens_version")
    theirs = _architecture(cfg, cfg_path, pre_6=not version)
    if theirs not in TO_SAEKIT:
        known = ", ".join(sorted(TO_SAEKIT))
        raise InputError(f"{cfg_path}: SAELens architecture {theirs!r} has no saekit counterpart (saekit reads {known})")
    d_in, d_sae = _positive_int(cfg, "d_in", cfg_path), _positive_int(cfg, "d_sae", cfg_path)
    tensors = _read_tensors(weights_path)
    _drop_unit_scaling_factor(tensors, weights_path)
    if "W_enc" in tensors and tuple(tensors["W_enc"].shape) != (d_in, d_sae):
        raise InputError(f"{weights_path}: W_enc has shape {tuple(tensors['W_enc'].shape)}, cfg.json says ({d_in}, {d_sae})")
    arch = TO_SAEKIT[theirs]
    hyper: dict[str, Any] = {}
    if theirs == "jumprelu" and "log_threshold" in tensors and "threshold" not in tensors:
        tensors["threshold"] = tensors.pop("log_threshold").float().exp()  # older SAELens JumpReLU checkpoints
    if theirs in ("batchtopk", "matryoshka_batchtopk") and "topk_threshold" in tensors:
        tensors["threshold"] = tensors.pop("topk_threshold").reshape(())
    if theirs in ("topk", "batchtopk", "matryoshka_batchtopk"):
        hyper["k"] = [_k(cfg, d_sae, cfg_path)]
        if cfg.get("rescale_acts_by_decoder_norm", False):
            tensors = _fold_decoder_norms(tensors)
    if theirs == "matryoshka_batchtopk":
        hyper["prefix_fractions"] = [w / d_sae for w in _matryoshka_widths(cfg, d_sae, cfg_path)]
    arch, hyper = _saekit_hints(cfg, arch, hyper, tensors)
    scale = _input_scale(cfg, folder, cfg_path)
    if scale != 1.0:
        tensors = fold_input_scale(tensors, scale)
    source = {
        "format": "saelens",
        "architecture": theirs,
        "path": str(folder.resolve()),
        "sae_lens_version": version,
        **{k: cfg[k] for k in ("apply_b_dec_to_input", "normalize_activations", "reshape_activations") if k in cfg},
        **{k: v for k, v in metadata.items() if k in ("model_name", "hook_name", "hook_head_index")},
    }
    return ForeignSAE(arch, tensors, b_dec_on_input=bool(cfg.get("apply_b_dec_to_input", True)), hyper=hyper, source=source)


def _read_json_object(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(f"not a SAELens SAE: {path} is missing")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: malformed JSON ({str(err).splitlines()[0]})") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{path}: expected a JSON object")
    return cfg


def _architecture(cfg: dict[str, Any], where: Path, pre_6: bool) -> str:
    """SAELens's architecture name; configs before SAELens 6 have none (standard, or topk by activation_fn)."""
    if "architecture" in cfg:
        arch = cfg["architecture"]
        if not isinstance(arch, str):
            raise InputError(f"{where}: architecture must be a string, got {arch!r}")
        return arch
    activation = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
    if activation == "topk":
        return "topk"
    if activation not in ("relu", None) and pre_6:
        raise InputError(f"{where}: activation_fn {activation!r} has no saekit counterpart (saekit reads relu and topk)")
    return "standard"


def _positive_int(cfg: dict[str, Any], key: str, where: Path) -> int:
    value = cfg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InputError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def _k(cfg: dict[str, Any], d_sae: int, where: Path) -> int:
    kwargs = cfg.get("activation_fn_kwargs")
    k = cfg.get("k", kwargs.get("k") if isinstance(kwargs, dict) else None)
    if isinstance(k, float) and k.is_integer():
        k = int(k)  # SAELens's BatchTopK configs declare k a float (a mean per sample): 40.0 is k = 40
    if not isinstance(k, int) or isinstance(k, bool) or not 0 < k <= d_sae:
        raise InputError(f"{where}: k must be an integer in 1..d_sae ({d_sae}), got {k!r}")
    return k


def _matryoshka_widths(cfg: dict[str, Any], d_sae: int, where: Path) -> list[int]:
    """matryoshka_widths: positive integers, increasing, at most d_sae; d_sae appended when the list does not end
    there (as SAELens does)."""
    widths = cfg.get("matryoshka_widths")
    if (
        not isinstance(widths, list)
        or not widths
        or any(not isinstance(w, int) or isinstance(w, bool) or not 0 < w <= d_sae for w in widths)
        or any(b <= a for a, b in zip(widths, widths[1:]))
    ):
        raise InputError(f"{where}: matryoshka_widths must be increasing integers in 1..d_sae ({d_sae}), got {widths!r}")
    return widths if widths[-1] == d_sae else [*widths, d_sae]


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise InputError(f"not a SAELens SAE: {path} is missing")
    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for truncated or foreign files
        raise InputError(f"{path}: unreadable safetensors file ({type(err).__name__})") from None
    return {name: t.float() if t.is_floating_point() else t for name, t in tensors.items()}


def _drop_unit_scaling_factor(tensors: dict[str, torch.Tensor], where: Path) -> None:
    """Older SAELens files may hold a per-latent `scaling_factor` (a fine-tuning scale of the codes): all ones
    is the same as none; anything else saekit cannot represent."""
    for name in ("scaling_factor", "finetuning_scaling_factor"):
        if name in tensors:
            factor = tensors.pop(name)
            if not torch.equal(factor, torch.ones_like(factor)):
                raise InputError(f"{where}: a fine-tuning {name} other than ones has no saekit counterpart")


def _fold_decoder_norms(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SAELens TopK with rescale_acts_by_decoder_norm ranks pre * ||W_dec_j|| and decodes c / ||W_dec_j||:
    the same SAE as W_enc * n, b_enc * n, W_dec / n with no rescaling (SAELens's own fold)."""
    if "W_dec" not in tensors or "W_enc" not in tensors or "b_enc" not in tensors:
        return tensors  # missing tensors are reported by build_sae
    out = dict(tensors)
    norms = tensors["W_dec"].float().norm(dim=1).clamp_min(1e-8)  # (m,)
    out["W_enc"] = tensors["W_enc"].float() * norms
    out["b_enc"] = tensors["b_enc"].float() * norms
    out["W_dec"] = tensors["W_dec"].float() / norms[:, None]
    return out


def _saekit_hints(cfg: dict[str, Any], arch: str, hyper: dict[str, Any], tensors: dict[str, torch.Tensor]) -> tuple[str, dict[str, Any]]:
    """A folder written by `export_saelens` records the saekit SAE's init kwargs in metadata['saekit']: use them
    (seeds, sparsity knob, training options), and read a jumprelu with one shared threshold back as batchtopk or
    matryoshka."""
    hints = (cfg.get("metadata") or {}).get("saekit")  # metadata is an object (read_saelens checked)
    if not isinstance(hints, dict) or not isinstance(hints.get("init_kwargs"), dict):
        return arch, hyper
    wanted = hints.get("arch")
    if not isinstance(wanted, str):  # not a hint saekit wrote (the metadata is free-form JSON)
        return arch, hyper
    if wanted in THRESHOLD_ARCHS and arch == "jumprelu" and "threshold" in tensors and tensors["threshold"].numel() > 0:
        threshold = tensors["threshold"].float()
        if not torch.all(threshold == threshold[0]):
            return arch, hyper
        tensors["threshold"] = threshold[0].reshape(())
        arch = wanted
    if wanted != arch:
        return arch, hyper
    kwargs = {k: v for k, v in hints["init_kwargs"].items() if k not in ("d", "dict_size")}
    return arch, {**kwargs, **hyper}


def _input_scale(cfg: dict[str, Any], folder: Path, where: Path) -> float:
    """1 when the weights act on raw activations; SAELens's normalize_activations = expected_average_only_in
    means they act on activations times a scaling factor, which only a training checkpoint's
    activation_scaler.json records. Per-sample normalisations (layer_norm, constant_norm_rescale) and whitening
    are not an SAE of saekit's form."""
    mode = cfg.get("normalize_activations", "none")
    if mode in ("none", None, False):
        return 1.0
    if mode not in ("expected_average_only_in", True):
        raise InputError(f"{where}: normalize_activations {mode!r} has no saekit counterpart (saekit reads 'none')")
    scaler = folder / SCALER_NAME
    factor = None
    if scaler.is_file():
        try:
            data = json.loads(scaler.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InputError(f"{scaler}: malformed JSON") from None
        if isinstance(data, dict) and not data.get("has_whitening", False):
            factor = data.get("scaling_factor")
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not 0 < factor < math.inf:
        raise InputError(
            f"{where}: normalize_activations is 'expected_average_only_in' and the folder holds no scaling factor; "
            "fold it in SAELens first (sae.fold_activation_norm_scaling_factor(s), then save)"
        )
    return float(factor)


# -- writing ------------------------------------------------------------------------------------


def saelens_tensors(sae: SparseAutoencoder) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
    """(SAELens architecture, its tensors, its architecture-specific cfg keys) for a saekit SAE with one member."""
    if sae.arch not in FROM_SAEKIT:
        raise InputError(f"SAELens has no counterpart of saekit's {sae.arch!r} architecture")
    if sae.n_members != 1:
        raise InputError(f"expected one SAE, got an ensemble of {sae.n_members}")
    state = {name: t.detach()[0].float().cpu() for name, t in sae.state_dict().items()}
    d, m = sae.d, sae.dict_size
    out = {"W_enc": state["W_enc"], "W_dec": state["W_dec"], "b_dec": state.get("b_dec", torch.zeros(d))}
    extra: dict[str, Any] = {}
    if sae.arch == "gated":
        out.update(b_gate=state["b_gate"], r_mag=state["r_mag"], b_mag=state["b_mag"])
    else:
        out["b_enc"] = state["b_enc"]
    if sae.arch == "topk":
        extra = {"k": int(sae.k_values[0]), "rescale_acts_by_decoder_norm": False}
    elif sae.arch == "jumprelu":
        out["threshold"] = state["log_threshold"].exp()
    elif sae.arch in THRESHOLD_ARCHS:
        # saekit: a * (a > t), a = ReLU(pre); SAELens JumpReLU: ReLU(pre) * (pre > t). Equal for t >= 0; a
        # threshold not yet set (t < 0) keeps every positive activation, as t = 0 does.
        out["threshold"] = torch.full((m,), max(float(state["threshold"]), 0.0))
    return FROM_SAEKIT[sae.arch], out, extra


def saelens_metadata(sae: SparseAutoencoder) -> dict[str, Any]:
    """What SAELens records in cfg.json's metadata when it saves a training architecture for inference:
    training_architecture and, for matryoshka, training_architecture_details with matryoshka_widths and k."""
    if sae.arch not in THRESHOLD_ARCHS:
        return {}
    details = {"k": int(sae.k_values[0]), "rescale_acts_by_decoder_norm": False}
    if sae.arch == "matryoshka":
        details["matryoshka_widths"] = list(sae.prefix_sizes)
    return {"training_architecture": THRESHOLD_ARCHS[sae.arch], "training_architecture_details": details}


def write_saelens(
    sae: SparseAutoencoder,
    out_dir: Path,
    *,
    metadata: dict[str, Any] | None = None,
    log_feature_density: torch.Tensor | None = None,
) -> Path:
    """Write `sae` (one member, acting on raw activations) as a SAELens folder: sae_weights.safetensors,
    cfg.json and sparsity.safetensors ('sparsity': log10 feature density (m,)) when given, all written in
    full before any replaces a file of a previous export."""
    theirs, tensors, extra = saelens_tensors(sae)
    cfg = {
        "architecture": theirs,
        "d_in": sae.d,
        "d_sae": sae.dict_size,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        **extra,
        "metadata": {"sae_lens_version": LAYOUT_VERSION, "saekit_version": __version__, **saelens_metadata(sae), **(metadata or {})},
    }
    writes = {out_dir / WEIGHTS_NAME: lambda path: atomic_save_tensors(tensors, path)}
    if log_feature_density is not None:
        writes[out_dir / SPARSITY_NAME] = lambda path: atomic_save_tensors({"sparsity": log_feature_density.float().cpu()}, path)
    writes[out_dir / CFG_NAME] = lambda path: atomic_write_bytes(path, json.dumps(cfg, indent=2).encode())
    replace_together(writes)  # a failed write (disk full) leaves a previous export whole, not a mix of two
    return out_dir
