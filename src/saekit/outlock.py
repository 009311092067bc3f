"""One saekit command at a time per output folder.

`hold_out_dir(OUT)` takes an exclusive `flock` on OUT/.saekit-lock for the duration of a command (train, reproduce,
compare), and writes the holder's pid, command line and start time into it. A second process on the same OUT is
refused in one line naming the holder (InputError, exit code 2), or waits for it with `wait=True`. The kernel
drops the lock when its process dies, so a killed run never leaves OUT locked; the file is removed on release, and
an OUT the lock alone created is removed again when it is still empty. Nested holds in one process are free.
Where `fcntl` is missing (Windows) nothing is locked.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from saekit.errors import InputError

try:
    import fcntl
except ImportError:  # pragma: no cover - not on the platforms CI runs
    fcntl = None

LOCK_NAME = ".saekit-lock"
_held: dict[Path, int] = {}  # folder -> nesting depth of this process's holds


@contextmanager
def hold_out_dir(out: str | os.PathLike, *, wait: bool = False) -> Iterator[None]:
    """Hold OUT for this process (see the module docstring); `wait` blocks until another holder is done."""
    folder = Path(out).resolve()
    if fcntl is None or folder in _held:
        _held[folder] = _held.get(folder, 0) + 1
        try:
            yield
        finally:
            _release_nested(folder)
        return
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"cannot create output folder {out}: {err.strerror or err}") from None
    try:
        fd = _acquire(folder / LOCK_NAME, wait)
    except BaseException:
        _remove_if_empty(folder, created)
        raise
    _held[folder] = 1
    try:
        yield
    finally:
        del _held[folder]
        _unlink(folder / LOCK_NAME)
        os.close(fd)
        _remove_if_empty(folder, created)


def holder(out: str | os.PathLike) -> dict | None:
    """What OUT/.saekit-lock says about its holder ({pid, command, started}), or None when unreadable."""
    try:
        data = json.loads((Path(out) / LOCK_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _acquire(path: Path, wait: bool) -> int:
    """An open, flock-ed descriptor of `path`, the holder's record written in it. Retries when the file was
    removed or replaced between open and lock (its releasing holder unlinks it)."""
    told = False
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)  # a releasing holder may have removed the folder it created
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                os.close(fd)
                busy = f"{path.parent} is in use by {_describe(holder(path.parent))}"
                raise InputError(f"{busy}; wait for it (--wait) or choose another --out") from None
            if not told:
                print(f"saekit: waiting for {_describe(holder(path.parent))} to finish with {path.parent}", file=sys.stderr, flush=True)
                told = True
            fcntl.flock(fd, fcntl.LOCK_EX)
        if _same_file(fd, path):
            record = {"pid": os.getpid(), "command": " ".join(sys.argv)[:300], "started": time.strftime("%Y-%m-%d %H:%M:%S")}
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(record).encode())
            return fd
        os.close(fd)


def _describe(record: dict | None) -> str:
    """'another saekit process (pid 12, `saekit train ...`, since 2026-12-06 21:00:00)' from a lock record."""
    if not record:
        return "another saekit process"
    command = f", `{record['command']}`" if record.get("command") else ""
    since = f", since {record['started']}" if record.get("started") else ""
    return f"another saekit process (pid {record.get('pid')}{command}{since})"


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == path.stat().st_ino
    except FileNotFoundError:
        return False


def _release_nested(folder: Path) -> None:
    _held[folder] -= 1
    if _held[folder] == 0:
        del _held[folder]


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _remove_if_empty(folder: Path, created: bool) -> None:
    if created:
        try:
            folder.rmdir()
        except OSError:
            pass
