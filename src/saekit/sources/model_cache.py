"""A cache for the small models that `tms` and `compute` sources train: one safetensors file per config.

The file is `CACHE_DIR/<name>-<hash>.safetensors`, where the hash is over the JSON of the config that
determines the model; its metadata holds that JSON and a SHA-256 of the tensors' bytes. A file that is
unreadable, belongs to another config or fails its checksum is never used: the model is trained again
and the file replaced (atomically).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from saekit.atomic import atomic_save_tensors


def config_hash(key: dict[str, Any]) -> str:
    """First 12 hex digits of the SHA-256 of the key's canonical JSON."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, shapes and float32 bytes of the tensors, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _read(path: Path, key_json: str) -> dict[str, torch.Tensor] | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception:
        return None
    if meta.get("key") != key_json or meta.get("digest") != tensors_digest(tensors):
        return None
    return tensors


def cached_model(
    cache_dir: str | Path | None, name: str, key: dict[str, Any], build: Callable[[], dict[str, torch.Tensor]]
) -> tuple[dict[str, torch.Tensor], bool]:
    """The tensors `build()` makes for `key`, from the cache when a valid copy is there.

    Returns (tensors on the CPU, whether they came from the cache). With `cache_dir` None nothing is
    read or written.
    """
    key_json = json.dumps(key, sort_keys=True)
    path = None if cache_dir is None else Path(cache_dir) / f"{name}-{config_hash(key)}.safetensors"
    if path is not None and path.is_file():
        tensors = _read(path, key_json)
        if tensors is not None:
            return tensors, True
    tensors = {k: v.detach().cpu().contiguous() for k, v in build().items()}
    if path is not None:
        atomic_save_tensors(tensors, path, metadata={"key": key_json, "digest": tensors_digest(tensors)})
    return tensors, False
