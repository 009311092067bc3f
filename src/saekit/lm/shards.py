"""The on-disk format of extracted activations: a folder of safetensors shards and a manifest.

DIR/manifest.json          what was extracted, and the list of finished shards with their SHA-256
DIR/shard_00000.safetensors  `activations` (rows, d) float16|float32, `token_ids` (rows,) int32

Rows are whole windows: global row g is position g % window of window g // window. The manifest is
rewritten atomically after every shard, so an interrupted run loses at most the shard in progress.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from saekit import __version__
from saekit.atomic import atomic_save_tensors, atomic_write_bytes, sha256_of_file
from saekit.errors import InputError

FORMAT = "saekit-activations"
VERSION = 1
MANIFEST = "manifest.json"
DTYPES = {"float16": torch.float16, "float32": torch.float32}
REQUIRED_KEYS = (
    "format", "version", "model", "model_name", "model_class", "causal", "layer", "site", "d", "window", "dtype",
    "text", "tokens_requested", "tokens", "windows", "complete", "shards", "created", "saekit_version",
)  # fmt: skip


def shard_name(index: int) -> str:
    """File name of shard `index`: shard_00000.safetensors, ..."""
    return f"shard_{index:05d}.safetensors"


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of an activations folder; InputError (one line) when missing, malformed or of another format."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise InputError(f"no activations manifest: {path} not found")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: malformed manifest ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InputError(f"{path}: not a saekit activations manifest (format is not {FORMAT!r})")
    if manifest.get("version") != VERSION:
        raise InputError(f"{path}: unsupported activations format version {manifest.get('version')!r} (expected {VERSION})")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise InputError(f"{path}: manifest lacks keys {missing}")
    _check_manifest_values(manifest, path)
    return manifest


def _check_manifest_values(m: dict[str, Any], path: Path) -> None:
    ints = ("layer", "d", "window", "tokens", "windows", "tokens_requested")
    bad = [k for k in ints if not isinstance(m[k], int) or isinstance(m[k], bool) or m[k] < 0]
    if bad or m["d"] < 1 or m["window"] < 1:
        raise InputError(f"{path}: manifest has bad values for {bad or ['d', 'window']}")
    if m["dtype"] not in DTYPES:
        raise InputError(f"{path}: manifest dtype {m['dtype']!r} is not one of {sorted(DTYPES)}")
    shards = m["shards"]
    ok = isinstance(shards, list) and all(
        isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("rows"), int) and isinstance(s.get("sha256"), str)
        for s in shards
    )
    if not ok:
        raise InputError(f"{path}: manifest 'shards' must be a list of {{file, rows, sha256}}")
    if any("/" in s["file"] or "\\" in s["file"] or s["file"].startswith(".") for s in shards):
        raise InputError(f"{path}: manifest names a shard outside its folder")
    total = sum(s["rows"] for s in shards)
    if total != m["tokens"]:
        raise InputError(f"{path}: manifest says {m['tokens']} tokens but its shards hold {total} rows")
    if any(s["rows"] % m["window"] for s in shards):
        raise InputError(f"{path}: a shard's rows are not whole windows of {m['window']}")


class ShardReader:
    """Random access to the rows of an activations folder, reading only the requested rows from disk.

    Each shard's SHA-256 is checked the first time the shard is opened.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.d: int = self.manifest["d"]
        self.window: int = self.manifest["window"]
        self.n_rows: int = self.manifest["tokens"]
        self.dtype: str = self.manifest["dtype"]
        self._shards: list[dict[str, Any]] = self.manifest["shards"]
        self._starts = [0]
        for s in self._shards:
            self._starts.append(self._starts[-1] + s["rows"])
        self._verified: set[int] = set()

    def __len__(self) -> int:
        return self.n_rows

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Activations of global rows [start, stop) as float32 (stop - start, d)."""
        parts = [p.float() for p in self._gather("activations", start, stop)]
        if not parts:
            return torch.empty(0, self.d)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def token_ids(self, start: int, stop: int) -> torch.Tensor:
        """Token ids of global rows [start, stop) as int64 (stop - start,)."""
        parts = [p.long() for p in self._gather("token_ids", start, stop)]
        if not parts:
            return torch.empty(0, dtype=torch.long)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _gather(self, name: str, start: int, stop: int) -> list[torch.Tensor]:
        if not (0 <= start <= stop <= self.n_rows):
            raise InputError(f"rows [{start}, {stop}) out of range for {self.folder} with {self.n_rows} rows")
        parts = []
        i = self._shard_of(start)
        while start < stop:
            lo, hi = self._starts[i], self._starts[i + 1]
            end = min(stop, hi)
            parts.append(self._read_shard(i, name, start - lo, end - lo))
            start = end
            i += 1
        return parts

    def _shard_of(self, row: int) -> int:
        lo, hi = 0, len(self._shards) - 1
        while lo < hi:  # last shard whose start <= row
            mid = (lo + hi + 1) // 2
            if self._starts[mid] <= row:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _read_shard(self, i: int, name: str, a: int, b: int) -> torch.Tensor:
        shard = self._shards[i]
        path = self.folder / shard["file"]
        if i not in self._verified:
            self._verify(i, path)
        try:
            with safe_open(str(path), framework="pt") as f:
                return f.get_slice(name)[a:b]
        except Exception as err:  # the file changed since it was verified
            raise InputError(f"{path}: cannot read shard ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None

    def _verify(self, i: int, path: Path) -> None:
        verify_shard(path, self._shards[i], self.d, self.dtype)
        self._verified.add(i)


def verify_shard(path: Path, shard: dict[str, Any], d: int, dtype: str) -> None:
    """Refuse (one line) a shard that is missing, fails its SHA-256, or does not hold (rows, d) of `dtype`."""
    if not path.is_file():
        raise InputError(f"shard missing: {path}")
    if sha256_of_file(path) != shard["sha256"]:
        raise InputError(f"checksum mismatch: {path} is not the file the manifest lists (corrupt or replaced)")
    try:
        with safe_open(str(path), framework="pt") as f:
            acts, toks = f.get_slice("activations"), f.get_slice("token_ids")
            a_shape, a_dtype, t_shape = acts.get_shape(), acts.get_dtype(), toks.get_shape()
    except Exception as err:
        raise InputError(f"{path}: unreadable shard ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    want = {"float16": "F16", "float32": "F32"}[dtype]
    if list(a_shape) != [shard["rows"], d] or list(t_shape) != [shard["rows"]] or a_dtype != want:
        raise InputError(f"{path}: shard holds activations {a_shape} {a_dtype}, manifest says ({shard['rows']}, {d}) {want}")


class ShardWriter:
    """Buffers rows and writes full shards atomically, rewriting the manifest after each.

    meta: the manifest's descriptive keys (model, model_name, model_class, causal, layer, site, d, window,
    dtype, text, tokens_requested). existing: a previous manifest of the same extraction to continue;
    its shards are kept, and a last shard shorter than `shard_rows` is read back into the buffer so that
    the continued run writes the same shards as an uninterrupted one.
    """

    def __init__(self, folder: str | Path, meta: dict[str, Any], shard_rows: int, existing: dict[str, Any] | None = None) -> None:
        self.folder = Path(folder)
        self.d: int = int(meta["d"])
        self.window: int = int(meta["window"])
        if meta["dtype"] not in DTYPES:
            raise InputError(f"dtype must be one of {sorted(DTYPES)}, got {meta['dtype']!r}")
        self.torch_dtype = DTYPES[meta["dtype"]]
        self.shard_rows = max(1, shard_rows // self.window) * self.window
        self.folder.mkdir(parents=True, exist_ok=True)
        for pattern in (".shard_*.tmp", f".{MANIFEST}.*.tmp"):  # left by a killed run
            for tmp in self.folder.glob(pattern):
                tmp.unlink(missing_ok=True)
        self.manifest: dict[str, Any] = {"format": FORMAT, "version": VERSION, **meta}
        self.manifest.update(
            tokens=0, windows=0, complete=False, shards=[], saekit_version=__version__,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )  # fmt: skip
        self._acts = torch.empty(self.shard_rows, self.d, dtype=self.torch_dtype)
        self._toks = torch.empty(self.shard_rows, dtype=torch.int32)
        self._fill = 0
        if existing is not None:
            self._continue(existing)
        self._write_manifest()

    def _continue(self, existing: dict[str, Any]) -> None:
        shards = list(existing["shards"])
        self.manifest["created"] = existing.get("created", self.manifest["created"])
        if shards and shards[-1]["rows"] < self.shard_rows:
            last = shards.pop()
            verify_shard(self.folder / last["file"], last, self.d, self.manifest["dtype"])
            with safe_open(str(self.folder / last["file"]), framework="pt") as f:
                n = last["rows"]
                self._acts[:n] = f.get_tensor("activations")
                self._toks[:n] = f.get_tensor("token_ids")
                self._fill = n
        if any(s["rows"] != self.shard_rows for s in shards):
            raise InputError(f"{self.folder}: existing shards were written with another shard size; use a new --out folder")
        self.manifest["shards"] = shards
        self.manifest["tokens"] = sum(s["rows"] for s in shards)
        self.manifest["windows"] = self.manifest["tokens"] // self.window

    @property
    def rows(self) -> int:
        """Rows accepted so far: on disk plus buffered."""
        return self.manifest["tokens"] + self._fill

    @property
    def windows(self) -> int:
        """Whole windows accepted so far."""
        return self.rows // self.window

    def append(self, acts: torch.Tensor, token_ids: torch.Tensor) -> None:
        """Add rows: acts (n, d), token_ids (n,), n a multiple of the window; full shards are written at once."""
        n = acts.shape[0]
        if acts.ndim != 2 or acts.shape[1] != self.d or token_ids.shape != (n,) or n % self.window:
            raise ValueError(f"append expects (n, {self.d}) and (n,) with n a multiple of {self.window}, got {tuple(acts.shape)}")
        done = 0
        while done < n:
            take = min(n - done, self.shard_rows - self._fill)
            self._acts[self._fill : self._fill + take].copy_(acts[done : done + take])
            self._toks[self._fill : self._fill + take].copy_(token_ids[done : done + take])
            self._fill += take
            done += take
            if self._fill == self.shard_rows:
                self._flush()

    def _flush(self) -> None:
        if self._fill == 0:
            return
        shards = self.manifest["shards"]
        name = shard_name(len(shards))
        tensors = {"activations": self._acts[: self._fill], "token_ids": self._toks[: self._fill]}
        digest = atomic_save_tensors(tensors, self.folder / name, metadata={"format": FORMAT})
        os.chmod(self.folder / name, 0o644)  # the temporary file was private; shards are meant to be shared
        shards.append({"file": name, "rows": self._fill, "sha256": digest})
        self.manifest["tokens"] += self._fill
        self.manifest["windows"] = self.manifest["tokens"] // self.window
        self._fill = 0
        self._write_manifest()

    def close(self, complete: bool) -> dict[str, Any]:
        """Write the buffered rows as a last (shorter) shard and the final manifest; returns the manifest."""
        self._flush()
        self.manifest["complete"] = bool(complete)
        self._write_manifest()
        return self.manifest

    def _write_manifest(self) -> None:
        data = json.dumps(self.manifest, indent=2).encode() + b"\n"
        atomic_write_bytes(self.folder / MANIFEST, data)
