"""saekit's own checkpoint folders (cfg.json + sae.safetensors), loaded so the SAE acts on raw activations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from saekit.errors import InputError
from saekit.io import fold_input_scale, load_sae, read_cfg
from saekit.sae import SparseAutoencoder


def input_scale_of(cfg: dict[str, Any], where: Path) -> float:
    """cfg.json's input_scale (the SAE saw activations times it; absent = 1); InputError unless a positive number."""
    scale = cfg.get("input_scale", 1.0)
    if scale is None:
        return 1.0
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not scale > 0 or scale == float("inf"):
        raise InputError(f"{where}: input_scale must be a positive number, got {scale!r}")
    return float(scale)


def load_run(folder: str | Path) -> tuple[SparseAutoencoder, dict[str, Any], dict[str, Any]]:
    """(The checkpoint's single SAE rewritten to act on raw activations, its cfg.json, the trained SAE's init kwargs).

    A run trained on activations times s (cfg.json input_scale) comes back with s folded into its weights
    (`saekit.io.fold_input_scale`), so its codes of raw x are the trained SAE's codes of s x and its
    reconstruction is the trained one divided by s; its decoder rows then have norm 1/s, so an architecture
    with a decoder_norm option is rebuilt with decoder_norm 'free'.
    """
    folder = Path(folder)
    cfg = read_cfg(folder)
    scale = input_scale_of(cfg, folder / "cfg.json")
    sae = load_sae(folder)
    if sae.n_members != 1:
        raise InputError(f"{folder}: holds {sae.n_members} SAEs; expected one (a finished run's folder, OUT/runs/RUN_ID)")
    trained = sae.init_kwargs()
    if scale == 1.0:
        return sae, cfg, trained
    kwargs = dict(trained)
    if kwargs.get("decoder_norm") == "unit":
        kwargs["decoder_norm"] = "free"
    rescaled = type(sae)(**kwargs)
    rescaled.load_state_dict(fold_input_scale(dict(sae.state_dict()), scale))
    return rescaled, cfg, trained
