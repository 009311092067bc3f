"""One saekit command at a time per output folder (saekit.outlock): a second process is refused in one line naming the
first, or waits for it with --wait; a killed holder leaves nothing locked; nested holds in one process are free."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from saekit.config import load_config
from saekit.errors import InputError
from saekit.outlock import LOCK_NAME, hold_out_dir, holder
from saekit.train.run import run_config
from test_cli import TINY, saekit, with_sets

HOLD = """
import sys
from saekit.outlock import hold_out_dir
with hold_out_dir(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.readline()
"""


class Holder:
    """A separate process holding OUT until `release()` (or `kill()`)."""

    def __init__(self, out: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout.readline().strip() == "held"

    def release(self) -> None:
        self.proc.communicate("\n", timeout=60)
        assert self.proc.returncode == 0

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=60)


@pytest.mark.parametrize(
    "command",
    [
        ["train", *with_sets(*TINY), "--no-progress"],
        ["reproduce", "--preset", "grid", *with_sets(*TINY), "--no-progress"],
        ["compare", "--archs", "topk", *with_sets(*[s for s in TINY if not s.startswith("sae.l1")]), "--no-progress"],
    ],
    ids=["train", "reproduce", "compare"],
)
def test_a_second_process_on_a_busy_out_is_refused_in_one_line(tmp_path: Path, command: list[str]) -> None:
    out = tmp_path / "out"
    held = Holder(out)
    try:
        assert holder(out)["pid"] == held.proc.pid
        r = saekit(*command, "--out", str(out))
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
        assert f"is in use by another saekit process (pid {held.proc.pid}" in lines[0] and "--wait" in lines[0]
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing trained, nothing written
    finally:
        held.release()
    assert not out.exists()  # the holder created OUT for its lock alone and removed it again
    r = saekit(*command, "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert (out / "runs.sqlite").is_file() or (out / "compare.json").is_file()
    assert not (out / LOCK_NAME).exists()


def test_wait_trains_once_the_holder_is_done(tmp_path: Path) -> None:
    out = tmp_path / "out"
    held = Holder(out)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    waiter = subprocess.Popen(
        [sys.executable, "-m", "saekit.cli", "train", *with_sets(*TINY), "--no-progress", "--json", "--wait", "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    said: list[str] = []
    waiting = threading.Event()

    def read_stderr() -> None:
        for line in waiter.stderr:
            said.append(line)
            if "waiting for" in line:
                waiting.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        assert waiting.wait(timeout=120), said
        assert waiter.poll() is None and not (out / "runs.sqlite").exists()
        held.release()
        stdout = waiter.stdout.read()
        assert waiter.wait(timeout=300) == 0, said
    finally:
        if waiter.poll() is None:
            waiter.kill()
    reader.join(timeout=30)
    assert f"pid {held.proc.pid}" in "".join(said)
    assert '"status": "done"' in stdout and (out / "runs.sqlite").is_file()


def test_a_killed_holder_leaves_out_free(tmp_path: Path) -> None:
    out = tmp_path / "out"
    Holder(out).kill()  # SIGKILL: no cleanup ran, the lock file stays behind, the kernel dropped the lock
    assert (out / LOCK_NAME).exists()
    r = saekit("train", *with_sets(*TINY), "--no-progress", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert not (out / LOCK_NAME).exists()


def test_holds_nest_in_one_process_and_run_config_refuses_a_busy_out(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = load_config(None, TINY)
    with hold_out_dir(out), hold_out_dir(out):  # nested: free
        results, errors = run_config(cfg, out, progress=False)  # and run_config inside this process's own hold
    assert errors == [] and [r["status"] for r in results] == ["done"]
    assert not (out / LOCK_NAME).exists() and (out / "runs.sqlite").is_file()
    held = Holder(tmp_path / "busy")
    try:
        with pytest.raises(InputError, match=f"pid {held.proc.pid}"):
            run_config(cfg, tmp_path / "busy", progress=False)
    finally:
        held.release()


def test_a_failure_inside_a_hold_removes_the_folder_it_created(tmp_path: Path) -> None:
    out = tmp_path / "new"
    with pytest.raises(RuntimeError), hold_out_dir(out):
        assert (out / LOCK_NAME).exists()
        raise RuntimeError("boom")
    assert not out.exists()
    (tmp_path / "kept").mkdir()
    with hold_out_dir(tmp_path / "kept"):
        pass
    assert (tmp_path / "kept").is_dir() and not any((tmp_path / "kept").iterdir())
