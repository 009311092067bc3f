"""Atomic file writes (temporary file in the same folder, fsync, rename) and file checksums.

A write that fails for a reason of the system (disk full, permissions, quota) leaves the previous file in
place and no temporary file, and raises an OSError whose errno says why and whose filename is the file that
was being written (not its temporary name), so that the CLI can say so in one line.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder, fsync, then rename."""
    fd, tmp = _temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are meant to be read by others
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        _raise_naming(err, path)
        raise


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> str:
    """Save tensors (and optional string metadata) as safetensors atomically; returns the file's SHA-256."""
    fd, tmp = _temporary(path)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        digest = sha256_of_file(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # as atomic_write_bytes: mkstemp makes 0600, results are meant to be read by others
        os.replace(tmp, path)
        return digest
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        _raise_naming(err, path)
        raise


def replace_together(writes: dict[Path, Callable[[Path], Any]]) -> None:
    """Write several files so that a failed write (disk full) replaces none of them: `writes[path](staged)`
    writes each in full as `.NAME.next` beside it (with atomic_write_bytes or atomic_save_tensors), then all
    are renamed into place. A failure names the file it was writing. (A kill during the renames may still
    leave some renamed; a reader that must never see a mix needs a commit file, as saekit.io's checkpoints.)"""
    staged = {path: staged_path(path) for path in writes}
    try:
        for path, write in writes.items():
            with reported_as(path):
                write(staged[path])
    except BaseException:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
        raise
    for path, tmp in staged.items():
        os.replace(tmp, path)


def staged_path(path: Path) -> Path:
    """Where a write of several files stages the new `path` until all are written: `.NAME.next` beside it."""
    return path.with_name(f".{path.name}.next")


@contextmanager
def reported_as(path: Path) -> Iterator[None]:
    """A system error (with an errno) inside the block names `path`, the file the user knows, instead of the
    staged file actually being written."""
    try:
        yield
    except OSError as err:
        if err.errno is None:
            raise
        raise OSError(err.errno, err.strerror, str(path)) from err


def _temporary(path: Path) -> tuple[int, str]:
    """An open temporary file next to `path` (creating its folder): (fd, name)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        _raise_naming(err, path)
        raise


def _raise_naming(err: BaseException, path: Path) -> None:
    """Re-raise a failed write of `path` as OSError(errno, strerror, path); return for anything else.

    safetensors' writer (Rust) reports I/O failures as SafetensorError("... (os error N)"), not OSError.
    """
    code = err.errno if isinstance(err, OSError) else None
    if code is None and type(err).__name__ == "SafetensorError":
        found = re.search(r"\(os error (\d+)\)", str(err))
        code = int(found.group(1)) if found else None
    if code is None:
        return
    raise OSError(code, os.strerror(code), str(path)) from err


def sha256_of_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
