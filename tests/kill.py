"""Killing a `saekit train` subprocess mid-sweep, for the resume tests."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path


def kill_at_first_checkpoint(proc: subprocess.Popen, out: Path, within: float, poll: float = 0.005, settle: float = 0.0) -> None:
    """SIGKILL `proc` once OUT/ensembles holds a checkpoint (waiting `settle` s more), and wait for it to die.

    The wait is bounded by `within` seconds (a bound, not a timing assertion) and fails with a message; the process is
    never left running, whatever happens."""
    try:
        deadline = time.monotonic() + within
        while proc.poll() is None and not list((out / "ensembles").glob("*/cfg.json")):
            assert time.monotonic() < deadline, f"the sweep wrote no ensemble checkpoint within {within:g} s"
            time.sleep(poll)
        time.sleep(settle)
        assert proc.poll() is None, "the sweep ended before it could be killed; make it longer"
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
