"""Save and load SAEs: a folder with `cfg.json` and `sae.safetensors` (never pickle), written atomically.

`cfg.json` records the architecture and shapes, the full experiment config,
the samples seen, and the SHA-256 of each tensor file, which `load` checks so
that a truncated or altered file is refused. A checkpoint may also hold
`optimizer.safetensors` (Adam's state) to resume training.

Rewriting a checkpoint replaces several files, so it goes through cfg.json: the new tensor files are
written next to the old ones as `.NAME.next`, then cfg.json (naming their hashes) replaces the old one
(the commit), then each `.NAME.next` is renamed to NAME. A failure (disk full) before the commit leaves
the previous checkpoint as it was; a kill after it leaves a folder whose cfg.json's hashes are found in
NAME or `.NAME.next`, which `load` reads and the next save settles.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from saekit.atomic import atomic_save_tensors, atomic_write_bytes, reported_as, sha256_of_file, staged_path
from saekit.config import SPARSITY_KNOBS
from saekit.errors import InputError
from saekit.sae import ARCHITECTURES, SparseAutoencoder

CFG_NAME, WEIGHTS_NAME, OPTIMIZER_NAME = "cfg.json", "sae.safetensors", "optimizer.safetensors"
LATENTS_NAME = "latents.safetensors"  # per-latent statistics of the final evaluation (fire_counts)
FORMAT_VERSION = 1


def _optimizer_tensors(sae: SparseAutoencoder, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in sae.named_parameters()}
    out = {}
    for p, st in optimizer.state.items():
        for key, value in st.items():
            out[f"{names[id(p)]}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return out


def save_checkpoint(
    folder: str | Path,
    sae: SparseAutoencoder,
    *,
    samples: int,
    config: dict[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    extra: dict[str, Any] | None = None,
    latent_stats: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `folder/sae.safetensors` (+ optimizer state, latent statistics) and `folder/cfg.json`.

    The tensor files are staged first and cfg.json is the commit (see the module's docstring): whatever
    happens, the folder holds either the previous checkpoint or this one, never a mix.
    """
    folder = Path(folder)
    _settle(folder)
    files = {WEIGHTS_NAME: dict(sae.state_dict())}
    if optimizer is not None:
        files[OPTIMIZER_NAME] = _optimizer_tensors(sae, optimizer)
    if latent_stats is not None:
        files[LATENTS_NAME] = latent_stats
    hashes: dict[str, str] = {}
    cfg = {
        "format_version": FORMAT_VERSION,
        "arch": sae.arch,
        **sae.init_kwargs(),
        "samples": samples,
        "sha256": hashes,
        "config": config or {},
        **(extra or {}),
    }
    try:
        for name, tensors in files.items():
            hashes[name] = _stage(tensors, folder, name)
        atomic_write_bytes(folder / CFG_NAME, json.dumps(cfg, indent=2).encode())  # the commit
    except BaseException:
        with contextlib.suppress(OSError):  # (if this fails too, the next save settles the folder)
            _settle(folder)  # staged files go, unless cfg.json was committed and names them (then they are renamed)
        raise
    for name in files:
        os.replace(_next(folder, name), folder / name)
    return folder


def _stage(tensors: dict[str, torch.Tensor], folder: Path, name: str) -> str:
    """Write `folder/.name.next`; returns its SHA-256. A failed write names `folder/name` (what the user knows)."""
    with reported_as(folder / name):
        return atomic_save_tensors(tensors, _next(folder, name))


def _next(folder: Path, name: str) -> Path:
    """Where a rewrite stages the new `name` until cfg.json names it."""
    return staged_path(folder / name)


def _settle(folder: Path) -> None:
    """Finish a rewrite a kill interrupted after its commit (rename each `.NAME.next` cfg.json names), and
    drop staged files of one interrupted before it and temporary files, so that a new rewrite may stage its own."""
    if not folder.is_dir():
        return
    for tmp in folder.glob(".*.tmp"):  # temporary files of atomic writes a kill interrupted
        tmp.unlink(missing_ok=True)
    staged = sorted(folder.glob(".*.next"))
    if not staged:
        return
    try:
        hashes = read_cfg(folder)["sha256"]
    except InputError:
        hashes = {}
    for path in staged:
        name = path.name[1 : -len(".next")]
        if hashes.get(name) is not None and sha256_of_file(path) == hashes[name]:
            os.replace(path, folder / name)
        else:
            path.unlink(missing_ok=True)


def read_cfg(folder: str | Path) -> dict[str, Any]:
    """The checkpoint's cfg.json as a dict; InputError if missing or malformed."""
    path = Path(folder) / CFG_NAME
    if not path.is_file():
        raise InputError(f"not a saekit checkpoint: {path} is missing")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: malformed JSON ({err})") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{path}: expected a JSON object")
    for key in ("arch", "d", "dict_size", "seeds", "sha256"):
        if key not in cfg:
            raise InputError(f"{path}: missing key {key!r}")
    if not isinstance(cfg["arch"], str) or cfg["arch"] not in ARCHITECTURES:
        raise InputError(f"{path}: unknown architecture {cfg['arch']!r}")
    knob = SPARSITY_KNOBS[cfg["arch"]]
    if knob not in cfg:
        raise InputError(f"{path}: missing key {knob!r}")
    for key in ("d", "dict_size"):
        if not _is_int(cfg[key]) or cfg[key] <= 0:
            raise InputError(f"{path}: {key} must be a positive integer, got {cfg[key]!r}")
    if not isinstance(cfg["seeds"], list) or not cfg["seeds"] or not all(_is_int(s) for s in cfg["seeds"]):
        raise InputError(f"{path}: seeds must be a non-empty list of integers")
    if not isinstance(cfg[knob], list) or len(cfg[knob]) != len(cfg["seeds"]) or not all(_is_number(a) for a in cfg[knob]):
        raise InputError(f"{path}: {knob} must be a list of numbers, one per seed")
    if not isinstance(cfg["sha256"], dict):
        raise InputError(f"{path}: sha256 must be an object of file name -> hash")
    if cfg.get("l1_reduction", "mean") not in ("mean", "sum"):
        raise InputError(f"{path}: l1_reduction must be 'mean' or 'sum'")
    return cfg


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _load_checked(folder: Path, name: str, cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of `folder/name` whose SHA-256 is the one cfg.json records (or of the staged `.name.next`
    of a rewrite killed after its commit); InputError naming the file otherwise."""
    path = folder / name
    if not path.is_file():
        raise InputError(f"checkpoint file missing: {path}")
    expected = cfg["sha256"].get(name)
    if not isinstance(expected, str):
        raise InputError(f"{folder / CFG_NAME}: no checksum recorded for {name}")
    if sha256_of_file(path) != expected:
        staged = _next(folder, name)
        if not (staged.is_file() and sha256_of_file(staged) == expected):
            raise InputError(f"checkpoint file corrupt (checksum mismatch): {path}")
        path = staged
    try:
        return load_file(str(path))
    except Exception as err:
        raise InputError(f"checkpoint file unreadable: {path} ({type(err).__name__})") from None


def load_sae(folder: str | Path, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Rebuild an SAE from a checkpoint folder, checking every file against its stored checksum."""
    folder = Path(folder)
    cfg = read_cfg(folder)
    arch = ARCHITECTURES[cfg["arch"]]
    accepted = [name for name in inspect.signature(arch.__init__).parameters if name not in ("self", "device")]
    tensors = _load_checked(folder, WEIGHTS_NAME, cfg)
    # Before building (which allocates what cfg.json says): the decoder must be the size cfg.json says, so an
    # absurd d, dict_size or seed list is refused here instead of allocated.
    want = (len(cfg["seeds"]), cfg["dict_size"], cfg["d"])
    got = tuple(tensors["W_dec"].shape) if "W_dec" in tensors else None
    if got != want:
        raise InputError(f"{folder / WEIGHTS_NAME}: tensors do not match cfg.json (W_dec {got}, cfg.json (seeds, dict_size, d) {want})")
    try:
        sae = arch(**{name: cfg[name] for name in accepted if name in cfg})
    except (TypeError, ValueError, RuntimeError) as err:
        raise InputError(f"{folder / CFG_NAME}: bad values ({str(err).splitlines()[0]})") from None
    expected = sae.state_dict()
    for name, t in tensors.items():
        if name in expected and t.dtype != expected[name].dtype:
            raise InputError(f"{folder / WEIGHTS_NAME}: tensors do not match cfg.json ({name} is {t.dtype}, not {expected[name].dtype})")
    try:
        sae.load_state_dict(tensors)
    except RuntimeError as err:
        raise InputError(f"{folder / WEIGHTS_NAME}: tensors do not match cfg.json ({str(err).splitlines()[0]})") from None
    return sae.to(device)


def load_optimizer_state(folder: str | Path, sae: SparseAutoencoder, optimizer: torch.optim.Optimizer) -> None:
    """Restore Adam's state saved by `save_checkpoint` into `optimizer` (built over `sae`'s parameters)."""
    folder = Path(folder)
    tensors = _load_checked(folder, OPTIMIZER_NAME, read_cfg(folder))
    for name, p in sae.named_parameters():
        prefix = name + "."
        state = {key.removeprefix(prefix): v.to(p.device) for key, v in tensors.items() if key.startswith(prefix)}
        for key, v in state.items():
            if key != "step" and v.shape != p.shape:
                raise InputError(f"{folder / OPTIMIZER_NAME}: {name}.{key} has shape {tuple(v.shape)}, the SAE has {tuple(p.shape)}")
        if state:
            optimizer.state[p] = state


def load_latent_stats(folder: str | Path) -> dict[str, torch.Tensor] | None:
    """The per-latent statistics saved with a finished run (e.g. 'fire_counts' (m,)), or None if absent."""
    folder = Path(folder)
    cfg = read_cfg(folder)
    if LATENTS_NAME not in cfg["sha256"]:
        return None
    return _load_checked(folder, LATENTS_NAME, cfg)


def fold_input_scale(tensors: dict[str, torch.Tensor], input_scale: float) -> dict[str, torch.Tensor]:
    """Weights of an SAE trained on x * s rewritten to act on raw x with the same codes.

    c = ReLU(W_enc^T (s x - b_dec) + b_enc) = ReLU((s W_enc)^T (x - b_dec / s) + b_enc), and the raw
    reconstruction is x_hat / s = (W_dec / s) c + b_dec / s. So W_enc -> s W_enc, W_dec -> W_dec / s,
    b_dec -> b_dec / s; b_enc is unchanged. (The decoder rows are then no longer unit norm.)
    """
    out = dict(tensors)
    if "W_enc" in out:
        out["W_enc"] = out["W_enc"] * input_scale
    for name in ("W_dec", "b_dec"):
        if name in out:
            out[name] = out[name] / input_scale
    return out
