"""SAEs to and from other libraries' files: SAELens (read and write) and dictionary_learning (read).

`load(path)` reads a saekit run folder, a SAELens folder or a dictionary_learning folder (told apart by
their files) into a saekit SAE with one member that acts on raw activations. `import_sae` writes what
`load` returns as a saekit checkpoint folder; `export_saelens` writes a saekit run as a SAELens folder.
Weights are safetensors, except dictionary_learning's ae.pt, which is unpickled with weights_only=True only.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from saekit.errors import InputError
from saekit.interop import dictionary_learning, saelens
from saekit.interop.native import load_run
from saekit.interop.weights import ForeignSAE, build_sae
from saekit.io import CFG_NAME, WEIGHTS_NAME, load_latent_stats, save_checkpoint
from saekit.sae import SparseAutoencoder

FORMATS = ("saekit", "saelens", "dictionary_learning")
EXPORT_FORMATS = ("saelens",)
_FILE_NAMES = {CFG_NAME, WEIGHTS_NAME, saelens.WEIGHTS_NAME, dictionary_learning.WEIGHTS_NAME, dictionary_learning.CONFIG_NAME}


def detect_format(path: str | Path) -> tuple[str, Path]:
    """(format, folder) of the SAE at `path` (a folder, or one of its files); InputError when it is none of FORMATS."""
    path = Path(path)
    if path.is_file() and path.name in _FILE_NAMES:
        path = path.parent
    if not path.exists():
        raise InputError(f"no such file or folder: {path}")
    if not path.is_dir():
        raise InputError(f"{path}: expected an SAE folder (saekit, SAELens or dictionary_learning)")
    if (path / dictionary_learning.WEIGHTS_NAME).is_file():
        return "dictionary_learning", path
    if (path / saelens.WEIGHTS_NAME).is_file():
        return "saelens", path
    if (path / WEIGHTS_NAME).is_file() and (path / CFG_NAME).is_file():
        if _is_saekit_cfg(path / CFG_NAME):
            return "saekit", path
        raise InputError(f"{path}: cfg.json + sae.safetensors without saekit's keys (a sparsify SAE?); saekit reads saekit, SAELens "
                         "and dictionary_learning folders")  # fmt: skip
    if (path / "runs.sqlite").is_file() or (path / "runs").is_dir():
        raise InputError(f"{path}: a saekit output folder; pass one run's folder, {path / 'runs' / 'RUN_ID'}")
    raise InputError(
        f"{path}: no SAE found (expected cfg.json + sae.safetensors, cfg.json + sae_weights.safetensors, or ae.pt + config.json)"
    )


def _is_saekit_cfg(path: Path) -> bool:
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return True  # let saekit's own reader name the problem
    return isinstance(cfg, dict) and "arch" in cfg and "sha256" in cfg


def read_foreign(path: str | Path) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """(SAE acting on raw activations, where it came from) for any of FORMATS."""
    fmt, folder = detect_format(path)
    if fmt == "saekit":
        sae, cfg, _ = load_run(folder)
        return sae, {
            "format": "saekit",
            "path": str(folder.resolve()),
            "run_id": cfg.get("run_id"),
            "input_scale": cfg.get("input_scale", 1.0),
        }
    foreign: ForeignSAE = saelens.read_saelens(folder) if fmt == "saelens" else dictionary_learning.read_dictionary_learning(folder)
    return build_sae(foreign, str(folder)), foreign.source


def load(path: str | Path, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """A saekit SAE (one member) from a saekit run folder, a SAELens folder or a dictionary_learning folder.

    The SAE acts on raw activations: `sae.encode(x)` (x: (B, d)) gives codes (1, B, m) equal to the source's,
    `sae.decode(c)` its reconstruction. A saekit run trained on scaled activations (cfg.json input_scale s) comes
    back with s folded into its weights. Bad, corrupt or unknown files raise InputError with a one-line reason.
    """
    return read_foreign(path)[0].to(device)


def import_sae(path: str | Path, out: str | Path, *, activations: str | Path | None = None) -> dict[str, Any]:
    """Write the SAE at `path` (any of FORMATS) as a saekit checkpoint folder `out` (cfg.json + sae.safetensors).

    `activations`: a folder written by `saekit activations` that the SAE reads (recorded as the run's source, so
    that `saekit dashboard` can use it; its width must be the SAE's). Returns a summary (arch, d, dict_size, source).
    """
    out = Path(out)
    sae, source = read_foreign(path)
    _check_out_folder(out, Path(path), writes="saekit")
    config: dict[str, Any] = {}
    if activations is not None:
        config = {"source": {"kind": "activations", "path": str(Path(activations).resolve())}, "sae": {"arch": sae.arch}}
        _check_activations(Path(activations), sae.d)
    save_checkpoint(out, sae, samples=0, config=config, extra={"run_id": out.name, "input_scale": 1.0, "imported": source})
    return {"out": str(out), "arch": sae.arch, "d": sae.d, "dict_size": sae.dict_size, **sae.init_kwargs(), "source": source}


def export_saelens(run_folder: str | Path, out_dir: str | Path) -> Path:
    """Write the saekit run in `run_folder` as a SAELens folder `out_dir` (cfg.json + sae_weights.safetensors, and
    sparsity.safetensors from the run's final evaluation when it has one). The input scale is folded in, so the
    SAELens SAE acts on raw activations; the saekit SAE's init kwargs are kept in cfg.json's metadata['saekit']."""
    run_folder, out_dir = Path(run_folder), Path(out_dir)
    fmt, folder = detect_format(run_folder)
    if fmt != "saekit":
        raise InputError(f"{run_folder}: not a saekit run folder (it holds a {fmt} SAE)")
    sae, cfg, trained = load_run(folder)
    _check_out_folder(out_dir, folder, writes="saelens")
    metadata = {
        "saekit": {
            "arch": sae.arch,
            "init_kwargs": trained,
            "run_id": cfg.get("run_id", folder.name),
            "input_scale_folded": cfg.get("input_scale", 1.0),
            "norm_threshold": cfg.get("norm_threshold"),  # raw-scale norm above which tokens were left out of training
        }
    }
    return saelens.write_saelens(sae, out_dir, metadata=metadata, log_feature_density=_log_density(folder))


def _log_density(folder: Path) -> torch.Tensor | None:
    """log10 of each latent's firing frequency in the run's final evaluation (+1e-10, as SAELens), or None."""
    stats = load_latent_stats(folder)
    if not stats or "fire_counts" not in stats or "eval_samples" not in stats:
        return None
    n = float(stats["eval_samples"])
    if not n > 0 or not math.isfinite(n):
        return None
    counts = stats["fire_counts"].double().reshape(-1)
    return torch.log10(counts / n + 1e-10).float()


def _check_out_folder(out: Path, source: Path, writes: str) -> None:
    """Refuse to write into the source's folder, over a file, or over an SAE of another kind: `writes` is
    'saekit' (may replace an earlier import) or 'saelens' (may replace a SAELens folder)."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    src = source if source.is_dir() else source.parent
    if out.resolve() == src.resolve():
        raise InputError(f"{out}: is the source folder itself; choose another output folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if (out / dictionary_learning.WEIGHTS_NAME).exists():
        raise InputError(f"{out}: holds a dictionary_learning SAE; choose an empty folder")
    if writes == "saelens" and (out / CFG_NAME).exists() and not (out / saelens.WEIGHTS_NAME).exists():
        raise InputError(f"{out}: holds a cfg.json that is not a SAELens SAE's; choose an empty folder")
    if writes == "saekit" and (out / saelens.WEIGHTS_NAME).exists():
        raise InputError(f"{out}: holds a SAELens SAE; choose an empty folder")
    if writes == "saekit" and (out / CFG_NAME).exists() and not _is_imported(out / CFG_NAME):
        raise InputError(f"{out}: holds a saekit checkpoint that was not imported; choose an empty folder")


def _is_imported(path: Path) -> bool:
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(cfg, dict) and "imported" in cfg


def _check_activations(folder: Path, d: int) -> None:
    from saekit.lm.shards import read_manifest

    manifest = read_manifest(folder)
    if manifest.get("d") != d:
        raise InputError(f"{folder}: activations of width {manifest.get('d')!r}, the SAE reads width {d}")


__all__ = ["EXPORT_FORMATS", "FORMATS", "detect_format", "export_saelens", "import_sae", "load", "read_foreign"]
