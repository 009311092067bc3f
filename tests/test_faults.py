"""Fault tests: saekit fails safe when it is killed, when the disk fills up, when a checkpoint rots and
when a file from outside is malformed or hostile.

Each fault is injected as low as Python reaches (a real SIGKILL; the write or the safetensors writer failing as
on a full disk; bytes flipped or cut off on disk; files built byte by byte) and each test checks what the user
sees (DESIGN.md: exit 2 and one line for bad input, 1 and one line for anything else, never a traceback) and what
is left on disk (the previous checkpoint or file whole and loadable, no temporary files, runs.sqlite sound with
its earlier rows unchanged). Every test fails if the protection it checks is taken out.

The sweeps are tiny (d = 16, 32 true features, dictionaries of 32 and 64, 12,800 samples) so each test takes
seconds; they run in this process through `saekit.cli.main` (so that injected faults reach them) except where a
process must die.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import io
import json
import os
import pickle
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import saekit
import saekit.train.run as run_module
from kill import kill_at_first_checkpoint
from saekit import atomic
from saekit.cli import main as cli_main
from saekit.errors import InputError
from saekit.io import load_optimizer_state, load_sae, read_cfg, save_checkpoint
from saekit.sae import ARCHITECTURES, ReluSAE
from saekit.store import RunStore

BASE = [
    "source.d=16",
    "source.n_features=32",
    "source.mean_active=3",
    "sae.l1=[0.1,0.3]",
    "train.batch_size=64",
    "train.samples=12800",
    "train.checkpoint_every=3200",
    "train.eval_samples=4096",
    "train.log_every=25",
    "train.lr=3e-3",
]
SMALL = [*BASE, "sae.dict_size=32"]  # a first sweep: two SAEs of 32 latents
LARGE = [*SMALL[:-1], "sae.dict_size=[32,64]"]  # the same plus two of 64: the 32s are done, the 64s train
CHECKPOINT, SAMPLES = 3200, 12800
ENOSPC_TEXT = "no space left on device"


def _sets(items: list[str]) -> list[str]:
    return [a for s in items for a in ("--set", s)]


def _saekit(*args: object) -> tuple[int, str, str]:
    """`saekit ARGS` in this process (so that faults patched in reach it): (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["saekit", *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli_main()
                code = 0
            except SystemExit as exited:
                code = exited.code
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


def _train(out: Path, sets: list[str]) -> tuple[int, str, str]:
    return _saekit("train", *_sets(sets), "--out", out, "--json", "--no-progress")


def _error_line(code: int, stderr: str, want: int) -> str:
    """The one line of a refusal: exit code `want`, one line on stderr, no traceback."""
    assert code == want, stderr
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("saekit: error: "), stderr
    return lines[0]


def _files(folder: Path) -> dict[str, str]:
    """Every file under `folder`: relative path -> SHA-256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _strays(folder: Path) -> list[str]:
    """Temporary or staged files left under `folder` (atomic writes' .tmp, checkpoint rewrites' .next)."""
    return sorted(str(p) for p in folder.rglob("*") if p.name.endswith((".tmp", ".next")))


def _store(out: Path) -> dict[str, dict]:
    """The store's rows, after checking that runs.sqlite is sound and that every finished run's checkpoint loads."""
    with contextlib.closing(sqlite3.connect(out / "runs.sqlite")) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    with RunStore(out) as store:
        rows = {r["run_id"]: r for r in store.runs()}
    for rid, r in rows.items():
        if r["status"] == "done":
            assert r["checkpoint"] == str(out / "runs" / rid)
            assert read_cfg(r["checkpoint"])["run_id"] == rid
            load_sae(r["checkpoint"])
    return rows


def _copy_out(src: Path, dest: Path) -> Path:
    """A copy of an output folder whose store points at the copy's run folders. (The store keeps each run's
    checkpoint path as it was when the run started, so a copied folder's rows name the original's files.)"""
    shutil.copytree(src, dest)
    with contextlib.closing(sqlite3.connect(dest / "runs.sqlite")) as db, db:
        for (rid,) in db.execute("SELECT run_id FROM runs").fetchall():
            db.execute("UPDATE runs SET checkpoint=? WHERE run_id=?", (str(dest / "runs" / rid), rid))
    return dest


def _ensemble(out: Path) -> Path:
    """The one unfinished ensemble's checkpoint folder."""
    folders = [p for p in (out / "ensembles").iterdir() if p.is_dir()]
    assert len(folders) == 1, folders
    return folders[0]


def _assert_checkpoint_whole(folder: Path, samples: int) -> None:
    """The checkpoint in `folder` is the one written at `samples`, every file matches cfg.json, and it resumes."""
    cfg = read_cfg(folder)
    assert cfg["samples"] == samples
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "optimizer.safetensors", "sae.safetensors"]
    for name, digest in cfg["sha256"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name
    sae = load_sae(folder)
    load_optimizer_state(folder, sae, torch.optim.Adam(sae.parameters()))


class _Stop(BaseException):
    """Stands for the process dying just after a checkpoint (a BaseException: nothing on the way catches it)."""


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Template output folders, copied by the tests that change them:
    finished: SMALL trained; interrupted: finished + LARGE stopped after the 64s' first checkpoint (3,200 samples);
    whole: LARGE trained uninterrupted from finished (the reference of a resumed run)."""
    root = tmp_path_factory.mktemp("sweeps")
    finished, interrupted, whole = root / "finished", root / "interrupted", root / "whole"
    code, _, err = _train(finished, SMALL)
    assert code == 0, err
    _copy_out(finished, interrupted)
    _copy_out(finished, whole)
    real = run_module.save_checkpoint

    def stop_after_the_first_ensemble_checkpoint(folder, *args, **kwargs):
        real(folder, *args, **kwargs)
        if Path(folder).parent.name == "ensembles":
            raise _Stop

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_module, "save_checkpoint", stop_after_the_first_ensemble_checkpoint)
        with pytest.raises(_Stop):
            _train(interrupted, LARGE)
    code, _, err = _train(whole, LARGE)
    assert code == 0, err
    return {"finished": finished, "interrupted": interrupted, "whole": whole}


def _copy(sweeps: dict[str, Path], name: str, tmp_path: Path) -> Path:
    return _copy_out(sweeps[name], tmp_path / name)


def _finished_runs(rows: dict[str, dict]) -> dict[str, dict]:
    return {rid: r for rid, r in rows.items() if r["dict_size"] == 32}


# ---------------------------------------------------------------- SIGKILL


def _popen_train(out: Path, sets: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "saekit.cli", "train", *_sets(sets), "--out", str(out), "--json", "--no-progress"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> list[dict]:
    try:
        stdout, stderr = proc.communicate(timeout=300)  # a bound on a hang (busy shared cores), not a timing assertion
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=60)
        pytest.fail(f"`saekit train` did not finish within 300 s (killed): {proc.args}")
    assert proc.returncode == 0, stderr
    return json.loads(stdout)


def test_sigkill_mid_sweep_resumes_and_leaves_finished_runs_untouched(sweeps: dict[str, Path], tmp_path: Path) -> None:
    """A sweep killed (SIGKILL, from outside) once its unfinished ensemble has a checkpoint, in an OUT whose 32s
    finished earlier; the same command again resumes the 64s, finishes them, and leaves the 32s as they were.

    The resumed 64s must equal the same sweep run without the kill (the `whole` template): from the checkpoint's
    step on, the resumed run sees the same batches with the same weights and Adam state (float32 in safetensors).
    Measured on this toy sweep: a correct resume is bit-identical, also across thread counts (this test's processes
    use one thread, the template two), with metrics within 1.4e-17 (float64 accumulation order); a resume without
    Adam's state moves W_dec by 0.15-0.2 and a resume one batch off by 2.4e-3 (MSE by 2.2e-5). So the tolerance is
    1e-6 on weights and 1e-9 on metrics."""
    out = _copy(sweeps, "finished", tmp_path)
    before_rows, before_files = _store(out), _files(out / "runs")
    large = [s if s != f"train.checkpoint_every={CHECKPOINT}" else "train.checkpoint_every=1600" for s in LARGE]  # not in run ids
    # The trigger is the 64s' first checkpoint (1,600 of 12,800 samples): after it the victim still trains 7/8 of its
    # steps, evaluates and saves, so the kill lands mid-sweep unless this process stands still for all of that.
    victim = _popen_train(out, large)
    kill_at_first_checkpoint(victim, out, within=240)
    # Killed: the checkpoint loads; the finished runs, their files and their rows are as they were.
    folder = _ensemble(out)
    at_kill = read_cfg(folder)["samples"]
    assert 0 < at_kill < SAMPLES
    load_sae(folder)
    assert _files(out / "runs") == before_files
    after_kill = _store(out)
    assert _finished_runs(after_kill) == before_rows
    assert {r["status"] for rid, r in after_kill.items() if rid not in before_rows} == {"running"}
    # Again: resumes from the checkpoint and finishes.
    rows = {r["run_id"]: r for r in _finish(_popen_train(out, large))}
    new = sorted(rows.keys() - before_rows.keys())
    assert len(rows) == 4 and len(new) == 2 and {r["status"] for r in rows.values()} == {"done"}
    assert [rows[rid]["resumed_from_samples"] for rid in new] == [at_kill, at_kill]
    assert _finished_runs(_store(out)) == before_rows
    assert {path: h for path, h in _files(out / "runs").items() if path in before_files} == before_files
    assert not _strays(out) and not any((out / "ensembles").iterdir())
    _assert_equal_to_uninterrupted(out, sweeps["whole"], rows, new)


def _assert_equal_to_uninterrupted(out: Path, whole_out: Path, rows: dict[str, dict], run_ids: list[str]) -> None:
    """The runs `run_ids` of `out` equal those of the uninterrupted sweep `whole_out` (tolerances: see the SIGKILL test)."""
    whole = _store(whole_out)
    for rid in run_ids:
        for key in ("mse", "fvu", "l0", "mmcs", "recovered_0_9", "dead_fraction"):
            assert rows[rid][key] == pytest.approx(whole[rid]["metrics"][key], rel=0, abs=1e-9), key
        resumed, uninterrupted = load_sae(out / "runs" / rid), load_sae(whole_out / "runs" / rid)
        torch.testing.assert_close(resumed.W_dec, uninterrupted.W_dec, atol=1e-6, rtol=0)
        torch.testing.assert_close(resumed.W_enc, uninterrupted.W_enc, atol=1e-6, rtol=0)


# A process that dies (SIGKILL, by its own hand) at a chosen point inside the 64s' second checkpoint: after its
# AFTER-th file rename into the checkpoint folder. saekit.io.save_checkpoint is wrapped before saekit.train.run
# imports it, to know which call is the second; os.replace, to count.
_KILL_INSIDE_A_CHECKPOINT = """
import os, signal, sys
from pathlib import Path
import saekit.io

after, calls, renames = int(sys.argv[1]), [0], [0]
real_save, real_replace = saekit.io.save_checkpoint, os.replace

def save_checkpoint(folder, *args, **kwargs):
    if Path(folder).parent.name == "ensembles":
        calls[0] += 1
    return real_save(folder, *args, **kwargs)

def replace(src, dst):
    real_replace(src, dst)
    if calls[0] == 2 and Path(dst).parent.parent.name == "ensembles":
        renames[0] += 1
        if renames[0] == after:
            os.kill(os.getpid(), signal.SIGKILL)

saekit.io.save_checkpoint, os.replace = save_checkpoint, replace
from saekit.cli import main
sys.argv = ["saekit", *sys.argv[2:]]
main()
"""


@pytest.mark.parametrize(
    ("after", "resumes_from"),
    [
        (1, CHECKPOINT),  # the new weights written, nothing else: the previous checkpoint must still be whole
        (3, 2 * CHECKPOINT),  # weights and Adam's state written and cfg.json replaced (the commit), nothing renamed
        (4, 2 * CHECKPOINT),  # ... and one file renamed into place, not the other
    ],
)
def test_kill_inside_a_checkpoint_rewrite_resumes(sweeps: dict[str, Path], tmp_path: Path, after: int, resumes_from: int) -> None:
    """Rewriting a checkpoint replaces several files; a kill between two of them must leave a checkpoint that
    resumes: the previous one before cfg.json names the new files, the new one after."""
    out = _copy(sweeps, "finished", tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["train", *_sets(LARGE), "--out", str(out), "--json", "--no-progress"]
    proc = subprocess.run([sys.executable, "-c", _KILL_INSIDE_A_CHECKPOINT, str(after), *args], env=env, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    folder = _ensemble(out)
    assert read_cfg(folder)["samples"] == resumes_from
    load_sae(folder)
    code, stdout, err = _train(out, LARGE)
    assert code == 0, err
    rows = {r["run_id"]: r for r in json.loads(stdout)}
    assert {r["status"] for r in rows.values()} == {"done"}
    assert sorted(r["resumed_from_samples"] for r in rows.values() if r["dict_size"] == 64) == [resumes_from] * 2
    assert not _strays(out)
    _assert_equal_to_uninterrupted(out, sweeps["whole"], rows, [rid for rid, r in rows.items() if r["dict_size"] == 64])


# ---------------------------------------------------------------- disk full


class FullDisk:
    """Writes of the files whose path contains every string of `victim` fail as on a full disk, from the
    `nth` such write on. (Paths as written: a checkpoint's or an export's files are first written as `.NAME.next`.)

    Patched into saekit.atomic, the only module that writes files: safetensors' writer gets half of the file
    out and raises what it raises when the disk is full (SafetensorError '... (os error 28)', seen with a real
    write limit); a plain write (cfg.json, report.html) gets half of its bytes out and raises OSError(ENOSPC).
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *victim: str, nth: int = 1) -> None:
        self.victim, self.nth, self.seen, self.target = victim, nth, 0, None
        real_temporary, real_save = atomic._temporary, atomic.save_file

        def temporary(path: Path):
            self.target = path  # the file the next write is for
            return real_temporary(path)

        def save_file(tensors, filename, metadata=None):
            if self._hit():
                data = _serialized(tensors, metadata)
                Path(filename).write_bytes(data[: len(data) // 2])
                raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
            return real_save(tensors, filename, metadata=metadata)

        monkeypatch.setattr(atomic, "_temporary", temporary)
        monkeypatch.setattr(atomic, "save_file", save_file)
        monkeypatch.setattr(atomic, "os", _OsProxy(os, self))

    def _hit(self) -> bool:
        if self.target is None or not all(v in str(self.target) for v in self.victim):
            return False
        self.seen += 1
        return self.seen >= self.nth


def _serialized(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata=metadata)


class _OsProxy:
    """The os module as saekit.atomic sees it under FullDisk: fdopen gives files whose write fails."""

    def __init__(self, real, disk: FullDisk) -> None:
        self._real, self._disk = real, disk

    def __getattr__(self, name: str):
        return getattr(self._real, name)

    def fdopen(self, fd: int, *args, **kwargs):
        f = self._real.fdopen(fd, *args, **kwargs)
        return _FullFile(f) if self._disk._hit() else f


class _FullFile:
    def __init__(self, f) -> None:
        self._f = f

    def __getattr__(self, name: str):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()

    def write(self, data: bytes) -> int:
        self._f.write(data[: len(data) // 2])
        self._f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_at_a_training_checkpoint_keeps_the_previous_one(sweeps: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    """The disk fills while the 64s' second checkpoint writes Adam's state (after their new weights were written):
    exit 1 with one line naming the file and the reason, the first checkpoint whole and resumable, no temporary
    files, runs.sqlite sound with the finished runs' rows unchanged; once there is space, the same command resumes."""
    out = _copy(sweeps, "interrupted", tmp_path)  # the 64s have a checkpoint at 3,200 samples
    before_rows, before_files = _finished_runs(_store(out)), _files(out / "runs")
    FullDisk(monkeypatch, "optimizer.safetensors")  # the 64s' next checkpoint (6,400) writes its weights, then this
    code, _, err = _train(out, LARGE)
    folder = _ensemble(out)
    assert _error_line(code, err, 1) == f"saekit: error: {folder / 'optimizer.safetensors'}: {ENOSPC_TEXT}"
    _assert_checkpoint_whole(folder, CHECKPOINT)
    assert not _strays(out)
    rows = _store(out)
    assert _finished_runs(rows) == before_rows and _files(out / "runs") == before_files
    running = [r for rid, r in rows.items() if rid not in before_rows]
    assert {r["status"] for r in running} == {"running"} and all(r["samples"] <= CHECKPOINT for r in running)  # not past the disk
    monkeypatch.undo()
    code, stdout, err = _train(out, LARGE)
    assert code == 0, err
    resumed = [r["resumed_from_samples"] for r in json.loads(stdout) if r["run_id"] not in before_rows]
    assert resumed == [CHECKPOINT, CHECKPOINT]


def test_disk_full_at_the_final_save_keeps_the_last_checkpoint(sweeps: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    """The disk fills while the first finished 64 writes its cfg.json (a plain write, after its tensor files):
    exit 1 naming it, nothing of it left in its run folder, the ensemble's last checkpoint whole, and the same
    command then finishes without training again."""
    out = _copy(sweeps, "interrupted", tmp_path)
    before_rows = _finished_runs(_store(out))
    FullDisk(monkeypatch, str(out / "runs"), "cfg.json")  # the 32s are done: only the 64s write there
    code, _, err = _train(out, LARGE)
    line = _error_line(code, err, 1)
    assert line.startswith(f"saekit: error: {out / 'runs'}{os.sep}") and line.endswith(f"{os.sep}cfg.json: {ENOSPC_TEXT}")
    _assert_checkpoint_whole(_ensemble(out), SAMPLES)
    new = [p for p in (out / "runs").iterdir() if p.name not in before_rows]
    assert all(not any(p.iterdir()) for p in new), "a half-saved run folder holds files"
    assert not _strays(out)
    assert _finished_runs(_store(out)) == before_rows
    monkeypatch.undo()
    code, stdout, err = _train(out, LARGE)
    assert code == 0, err
    assert [r["resumed_from_samples"] for r in json.loads(stdout) if r["run_id"] not in before_rows] == [SAMPLES, SAMPLES]


@pytest.mark.parametrize("victim", ["cfg.json", "sae_weights.safetensors", "sparsity.safetensors"])
def test_disk_full_during_export_keeps_the_previous_export(sweeps: dict[str, Path], tmp_path: Path, monkeypatch, victim: str) -> None:
    """`saekit export` of one run over an earlier export of another: whichever file the disk fills on, exit 1
    naming it, and the earlier export as it was (not the new weights beside the old cfg.json)."""
    out = sweeps["finished"]
    first, second = sorted((out / "runs").iterdir())
    dest = tmp_path / "exported"
    code, _, err = _saekit("export", first, dest, "--format", "saelens")
    assert code == 0, err
    before = _files(dest)
    FullDisk(monkeypatch, str(dest), victim)
    code, _, err = _saekit("export", second, dest, "--format", "saelens")
    assert _error_line(code, err, 1) == f"saekit: error: {dest / victim}: {ENOSPC_TEXT}"
    assert _files(dest) == before and not _strays(dest)
    assert json.loads((dest / "cfg.json").read_text())["metadata"]["saekit"]["run_id"] == first.name
    saekit.load(dest)


def test_disk_full_during_report_keeps_the_previous_report(sweeps: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    out = _copy(sweeps, "finished", tmp_path)
    code, _, err = _saekit("report", out)
    assert code == 0, err
    before = (out / "report.html").read_bytes()
    FullDisk(monkeypatch, "report.html")
    code, _, err = _saekit("report", out)
    assert _error_line(code, err, 1) == f"saekit: error: {out / 'report.html'}: {ENOSPC_TEXT}"
    assert (out / "report.html").read_bytes() == before and not _strays(out)


def _saekit_with_a_file_size_limit(args: list[object], limit: int) -> subprocess.CompletedProcess:
    """`saekit ARGS` in a process that may not write any file past `limit` bytes: the kernel fails such writes with
    EFBIG (Python ignores SIGXFSZ), a real failure of the real writers (safetensors' Rust writer, SQLite, Python's)."""
    import resource

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "saekit.cli", *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size)


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE and EFBIG as on Linux")
def test_a_real_write_failure_in_safetensors_writer_is_named(sweeps: dict[str, Path], tmp_path: Path) -> None:
    """No fake: safetensors' own writer hits the limit writing the export's weights (a 4,000-byte limit; the file
    is ~4,600 bytes). The message it raises ('... (os error 27)') becomes the file's name and reason, exit 1; the
    earlier export stays as it was."""
    first, second = sorted((sweeps["finished"] / "runs").iterdir())
    dest = tmp_path / "exported"
    code, _, err = _saekit("export", first, dest, "--format", "saelens")
    assert code == 0, err
    assert (dest / "sae_weights.safetensors").stat().st_size > 4000
    before = _files(dest)
    done = _saekit_with_a_file_size_limit(["export", second, dest, "--format", "saelens"], 4000)
    assert _error_line(done.returncode, done.stderr, 1) == f"saekit: error: {dest / 'sae_weights.safetensors'}: file too large"
    assert _files(dest) == before and not _strays(dest)


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE and EFBIG as on Linux")
def test_a_real_write_failure_in_the_run_store_leaves_it_sound(sweeps: dict[str, Path], tmp_path: Path) -> None:
    """No fake: SQLite cannot grow runs.sqlite's write-ahead log past the limit when the 64s are registered. Exit 1
    with one line naming the store; the database still opens, passes its integrity check, and the finished runs'
    rows and files are as they were; with the limit gone the same command trains."""
    out = _copy(sweeps, "finished", tmp_path)
    before_rows, before_files = _store(out), _files(out / "runs")
    done = _saekit_with_a_file_size_limit(["train", *_sets(LARGE), "--out", out, "--json", "--no-progress"], 2000)
    assert _error_line(done.returncode, done.stderr, 1).startswith("saekit: error: runs.sqlite: ")
    assert _store(out) == before_rows and _files(out / "runs") == before_files
    code, stdout, err = _train(out, LARGE)
    assert code == 0, err
    assert {r["status"] for r in json.loads(stdout)} == {"done"}


def test_the_cli_names_the_run_store_as_the_store_does() -> None:
    from saekit.cli import RUN_STORE_NAME

    assert RUN_STORE_NAME == RunStore.FILENAME


def test_disk_full_when_creating_the_temporary_file(tmp_path: Path, monkeypatch) -> None:
    """No room even for the temporary file's entry: the error names the file to write, not a temporary name."""

    def mkstemp(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / ".cfg.json.x1y2.tmp"))

    monkeypatch.setattr(atomic.tempfile, "mkstemp", mkstemp)
    with pytest.raises(OSError) as err:
        atomic.atomic_write_bytes(tmp_path / "cfg.json", b"{}")
    assert (err.value.errno, err.value.filename) == (errno.ENOSPC, str(tmp_path / "cfg.json"))


# ---------------------------------------------------------------- corrupt checkpoints


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) * 2 // 3])
    else:  # one bit flipped in the tensor data (the header still parses)
        flipped = bytearray(data)
        flipped[-5] ^= 0x10
        path.write_bytes(bytes(flipped))


@pytest.mark.parametrize("how", ["truncated", "bit-flipped"])
def test_corrupt_run_weights_are_refused_by_export_and_report(sweeps: dict[str, Path], tmp_path: Path, how: str) -> None:
    """(The report reads the weights of a sweep of two sizes, to compare them.)"""
    out = _copy(sweeps, "whole", tmp_path)
    run = sorted((out / "runs").iterdir())[0]
    _damage(run / "sae.safetensors", how)
    code, _, err = _saekit("export", run, tmp_path / "sl", "--format", "saelens")
    assert _error_line(code, err, 2) == f"saekit: error: checkpoint file corrupt (checksum mismatch): {run / 'sae.safetensors'}"
    assert not (tmp_path / "sl").exists()
    code, _, err = _saekit("report", out)
    assert _error_line(code, err, 2) == f"saekit: error: checkpoint file corrupt (checksum mismatch): {run / 'sae.safetensors'}"
    assert not (out / "report.html").exists()


@pytest.mark.parametrize("how", ["truncated", "bit-flipped"])
@pytest.mark.parametrize("name", ["sae.safetensors", "optimizer.safetensors"])
def test_corrupt_checkpoint_is_refused_on_resume(sweeps: dict[str, Path], tmp_path: Path, name: str, how: str) -> None:
    """A damaged file of the checkpoint training would resume from: exit 2 naming it, nothing trained or written."""
    out = _copy(sweeps, "interrupted", tmp_path)
    _damage(_ensemble(out) / name, how)
    rows, files = _store(out), _files(out)
    code, _, err = _train(out, LARGE)
    assert _error_line(code, err, 2) == f"saekit: error: checkpoint file corrupt (checksum mismatch): {_ensemble(out) / name}"
    assert _store(out) == rows
    assert {k: v for k, v in _files(out).items() if not k.startswith("runs.sqlite")} == {
        k: v for k, v in files.items() if not k.startswith("runs.sqlite")
    }


# ---------------------------------------------------------------- malformed files from outside


def _saekit_folder(folder: Path, arch: str = "relu") -> Path:
    """A one-SAE saekit checkpoint (d = 4, 6 latents) as `saekit import` and `saekit.load` read it."""
    knob = {
        "relu": {"l1": [0.1]},
        "topk": {"k": [2]},
        "batchtopk": {"k": [2]},
        "jumprelu": {"l0_coef": [0.01]},
        "gated": {"l1": [0.1]},
        "matryoshka": {"k": [2]},
    }
    sae = ARCHITECTURES[arch](d=4, dict_size=6, seeds=[0], **knob[arch])
    return save_checkpoint(folder, sae, samples=0, extra={"run_id": folder.name})


def _rewrite_cfg(folder: Path, change) -> None:
    cfg = json.loads((folder / "cfg.json").read_text())
    change(cfg)
    (folder / "cfg.json").write_text(json.dumps(cfg))


def _bless(folder: Path, name: str = "sae.safetensors") -> None:
    """Record the file's current SHA-256 in cfg.json, as a crafted folder would, so the checksum passes."""
    digest = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    _rewrite_cfg(folder, lambda cfg: cfg["sha256"].__setitem__(name, digest))


def _refused_by_load_and_import(folder: Path, tmp_path: Path, match: str) -> str:
    """saekit.load raises InputError (one line, matching); `saekit import` exits 2 with that line, writes nothing."""
    with pytest.raises(InputError, match=match) as refused:
        saekit.load(folder)
    message = str(refused.value)
    assert "\n" not in message
    dest = tmp_path / "imported"
    code, _, err = _saekit("import", folder, "--out", dest)
    assert _error_line(code, err, 2) == f"saekit: error: {message}"
    assert not dest.exists()
    return message


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ('{"arch": "relu", "d": 4,', "malformed JSON"),
        ("[1, 2]", "without saekit's keys"),  # not recognisably saekit's (detect_format)
        (lambda c: c.__setitem__("d", "4"), "d must be a positive integer"),
        (lambda c: c.__setitem__("dict_size", -6), "dict_size must be a positive integer"),
        (lambda c: c.__setitem__("seeds", "0"), "seeds must be a non-empty list"),
        (lambda c: c.__setitem__("l1", 0.1), "l1 must be a list of numbers, one per seed"),
        (lambda c: c.pop("dict_size"), "missing key 'dict_size'"),
        (lambda c: c.pop("sha256"), "without saekit's keys"),
        (lambda c: c["sha256"].pop("sae.safetensors"), "no checksum recorded for sae.safetensors"),
        (lambda c: c.__setitem__("arch", "transcoder"), "unknown architecture 'transcoder'"),
        (lambda c: c.__setitem__("arch", ["relu"]), r"unknown architecture \['relu'\]"),
        (lambda c: c.__setitem__("l1_reduction", "max"), "l1_reduction must be 'mean' or 'sum'"),
        (lambda c: c.__setitem__("input_scale", -1), "input_scale must be a positive number"),
        (lambda c: c.update(d=2**40, dict_size=2**40), "tensors do not match cfg.json"),  # 2^80 floats asked for
        (lambda c: c.update(seeds=[0] * 100_000, l1=[0.1] * 100_000), "tensors do not match cfg.json"),
        (lambda c: c.update(seeds=[2**70]), "tensors do not match|bad values"),
    ],
)
def test_malformed_saekit_cfg_json_is_refused(tmp_path: Path, change, match: str) -> None:
    folder = _saekit_folder(tmp_path / "sae")
    if isinstance(change, str):
        (folder / "cfg.json").write_text(change)
    else:
        _rewrite_cfg(folder, change)
    _refused_by_load_and_import(folder, tmp_path, match)


def test_absurd_shapes_in_cfg_json_are_never_allocated(tmp_path: Path, monkeypatch) -> None:
    """d and dict_size of 50,000 would be two 10 GB matrices initialised before the 1 KB weights file is read:
    the weights' shape is checked against cfg.json before the SAE is built, so the constructor never sees them."""
    folder = _saekit_folder(tmp_path / "sae")
    _rewrite_cfg(folder, lambda c: c.update(d=50_000, dict_size=50_000))

    @functools.wraps(ReluSAE.__init__)
    def constructor(self, *args, **kwargs):
        raise AssertionError("the SAE of cfg.json's absurd shape was being built")  # (not built: 20 GB)

    monkeypatch.setattr(ReluSAE, "__init__", constructor)
    with pytest.raises(InputError, match=r"\(W_dec \(1, 6, 4\), cfg.json \(seeds, dict_size, d\) \(1, 50000, 50000\)\)"):
        saekit.load(folder)


def _tensor_file(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors file by hand: 8-byte little-endian header length, JSON header, data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


_F32_2x2 = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
MALFORMED_SAFETENSORS = {
    "empty": b"",
    "garbage header": _tensor_file(b"\x00\xff\xfe not json at all"),
    "header not an object": _tensor_file(b"[1, 2, 3]"),
    "header longer than the file": _tensor_file({"W_enc": _F32_2x2}, bytes(16), length=2**40),
    "offsets past the end": _tensor_file({"W_enc": {"dtype": "F32", "shape": [2000, 2], "data_offsets": [0, 16000]}}, bytes(16)),
    "shape larger than its bytes": _tensor_file({"W_enc": {"dtype": "F32", "shape": [2**31, 2**31], "data_offsets": [0, 16]}}, bytes(16)),
    "unknown dtype": _tensor_file({"W_enc": {"dtype": "F99", "shape": [2, 2], "data_offsets": [0, 16]}}, bytes(16)),
    "a pickle": pickle.dumps({"W_enc": [[1.0, 0.0], [0.0, 1.0]]}),
}


@pytest.mark.parametrize("case", list(MALFORMED_SAFETENSORS))
def test_malformed_saekit_safetensors_is_refused(tmp_path: Path, case: str) -> None:
    """Even with cfg.json's checksum made to match (a crafted folder), the parser's refusal is one line."""
    folder = _saekit_folder(tmp_path / "sae")
    (folder / "sae.safetensors").write_bytes(MALFORMED_SAFETENSORS[case])
    _bless(folder)
    _refused_by_load_and_import(folder, tmp_path, "checkpoint file unreadable: .*sae.safetensors")


def _saelens_folder(folder: Path, weights: bytes | None = None, cfg: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    cfg = cfg or {"architecture": "standard", "d_in": 2, "d_sae": 2, "dtype": "float32", "metadata": {"sae_lens_version": "6.5.0"}}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    if weights is None:
        tensors = {"W_enc": torch.eye(2), "b_enc": torch.zeros(2), "W_dec": torch.eye(2).clone(), "b_dec": torch.zeros(2)}
        save_file(tensors, str(folder / "sae_weights.safetensors"))
    else:
        (folder / "sae_weights.safetensors").write_bytes(weights)
    return folder


@pytest.mark.parametrize("case", list(MALFORMED_SAFETENSORS))
def test_malformed_saelens_safetensors_is_refused(tmp_path: Path, case: str) -> None:
    folder = _saelens_folder(tmp_path / "sl", MALFORMED_SAFETENSORS[case])
    _refused_by_load_and_import(folder, tmp_path, "sae_weights.safetensors: unreadable safetensors file")


@pytest.mark.parametrize(
    ("dtype", "folder_kind"),
    [(torch.int32, "saekit"), (torch.float64, "saekit"), (torch.float16, "saekit"), (torch.int32, "saelens")],
)
def test_tensors_of_the_wrong_dtype_are_refused(tmp_path: Path, dtype: torch.dtype, folder_kind: str) -> None:
    """A well-formed file whose W_dec is not what the format holds (saekit: the SAE's float32; SAELens: floats)
    is refused instead of silently converted."""
    if folder_kind == "saekit":
        folder = _saekit_folder(tmp_path / "sae")
        tensors = load_file(str(folder / "sae.safetensors"))
        tensors["W_dec"] = (tensors["W_dec"] * 10).to(dtype)
        save_file(tensors, str(folder / "sae.safetensors"))
        _bless(folder)
        _refused_by_load_and_import(folder, tmp_path, f"tensors do not match cfg.json \\(W_dec is {dtype}, not torch.float32\\)")
    else:
        folder = _saelens_folder(tmp_path / "sl")
        tensors = load_file(str(folder / "sae_weights.safetensors"))
        tensors["W_dec"] = tensors["W_dec"].to(dtype)
        save_file(tensors, str(folder / "sae_weights.safetensors"))
        _refused_by_load_and_import(folder, tmp_path, "W_dec must hold floating-point numbers")


class _Payload:
    """Unpickling this runs exec, which writes `marker`: the sign that code ran."""

    marker = ""

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def _dl_files(folder: Path) -> None:
    (folder / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder"}}))


@pytest.mark.parametrize(
    "where",
    [
        "ae.pt: the whole file a pickle",
        "ae.pt: torch's legacy (non-zip) format",
        "ae.pt: the state dict itself the payload",
        "dictionary_learning config.json",
        "saekit sae.safetensors",
        "saekit cfg.json",
        "SAELens sae_weights.safetensors",
        "SAELens cfg.json",
    ],
)
def test_a_pickle_payload_never_runs(tmp_path: Path, where: str) -> None:
    """A pickle whose loading would run code, under each name the loaders open: refused in one line (exit 2 from
    `saekit import`), and the marker file it would write never appears."""
    marker = tmp_path / "code-ran"
    _Payload.marker = str(marker)
    payload = pickle.dumps(_Payload())
    pickle.loads(payload)  # the payload is live: unpickling it runs the code (which saekit must never do)
    assert marker.read_text() == "ran"
    marker.unlink()
    folder = tmp_path / "sae"
    state = {"encoder.weight": torch.zeros(3, 2), "encoder.bias": torch.zeros(3), "decoder.weight": torch.zeros(2, 3), "bias": _Payload()}
    if where.startswith("ae.pt") or where.startswith("dictionary_learning"):
        folder.mkdir()
        _dl_files(folder)
        if where == "ae.pt: the whole file a pickle":
            (folder / "ae.pt").write_bytes(payload)
        elif where == "ae.pt: torch's legacy (non-zip) format":
            torch.save(state, folder / "ae.pt", _use_new_zipfile_serialization=False)
        elif where == "ae.pt: the state dict itself the payload":
            torch.save(_Payload(), folder / "ae.pt")
        else:
            torch.save({k: v for k, v in state.items() if k != "bias"} | {"bias": torch.zeros(2)}, folder / "ae.pt")
            (folder / "config.json").write_bytes(payload)
    elif where.startswith("saekit"):
        _saekit_folder(folder)
        name = "sae.safetensors" if "safetensors" in where else "cfg.json"
        (folder / name).write_bytes(payload)
        if name == "sae.safetensors":
            _bless(folder)
    else:
        _saelens_folder(folder)
        (folder / ("sae_weights.safetensors" if "safetensors" in where else "cfg.json")).write_bytes(payload)
    _refused_by_load_and_import(folder, tmp_path, ".")
    assert not marker.exists(), "loading ran code from the file"


# Random JSON put in place of the keys of a valid cfg.json: loading must give an SAE or refuse in one line (an
# InputError), whatever the value. Hypothesis found AttributeError escaping for a SAELens `metadata` or
# `activation_fn_kwargs` that is not an object, and TypeError for a dictionary_learning `dict_class` that is a list.
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def _mutate(data: st.DataObject, cfg: dict, keys: list[str]) -> dict:
    """cfg with some of `keys` ('a/b': key b of object a) given random JSON values or removed."""
    cfg = json.loads(json.dumps(cfg))
    for key in data.draw(st.lists(st.sampled_from(keys), min_size=1, max_size=3, unique=True)):
        *parents, last = key.split("/")
        node = cfg
        for p in parents:
            node = node.setdefault(p, {}) if isinstance(node, dict) else {}
        if not isinstance(node, dict):
            continue
        if data.draw(st.booleans()):
            node.pop(last, None)
        else:
            node[last] = data.draw(JSON_VALUES)
    return cfg


def _loads_or_refuses(folder: Path) -> None:
    try:
        saekit.load(folder)
    except InputError as err:
        assert "\n" not in str(err) and str(err)


_COUNTER = [0]


def _fresh(tmp_path: Path) -> Path:
    _COUNTER[0] += 1
    return tmp_path / f"case{_COUNTER[0]}"


# No deadline and no too_slow health check: both time the examples, and this machine's cores are shared.
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(data=st.data(), arch=st.sampled_from(["relu", "topk", "jumprelu", "matryoshka"]))
def test_saekit_cfg_json_with_random_values_loads_or_refuses(tmp_path: Path, data: st.DataObject, arch: str) -> None:
    folder = _saekit_folder(_fresh(tmp_path), arch)
    cfg = json.loads((folder / "cfg.json").read_text())
    keys = [k for k in cfg if k != "config"] + ["sha256/sae.safetensors"]
    (folder / "cfg.json").write_text(json.dumps(_mutate(data, cfg, keys)))
    _loads_or_refuses(folder)


@pytest.mark.parametrize("arch_hint", [[], {}, 3, None])
def test_saelens_metadata_with_a_saekit_arch_that_is_not_a_name_loads(tmp_path: Path, arch_hint: object) -> None:
    # Found by the fuzz test below: metadata.saekit.arch = [] (a list) raised TypeError (unhashable) while looking the
    # name up; a hint that is not a string is not one saekit wrote, and the folder loads as its own architecture.
    cfg = {"architecture": "standard", "d_in": 2, "d_sae": 2, "dtype": "float32", "metadata": {"sae_lens_version": "6.5.0"}}
    cfg["metadata"]["saekit"] = {"init_kwargs": {}, "arch": arch_hint}
    assert saekit.load(_saelens_folder(_fresh(tmp_path), cfg=cfg)).arch == "relu"


SAELENS_KEYS = [  # the keys that hold objects first: hypothesis draws early entries of a list more often
    "metadata", "activation_fn_kwargs", "metadata/saekit", "metadata/saekit/init_kwargs", "metadata/saekit/arch",
    "architecture", "d_in", "d_sae", "dtype", "apply_b_dec_to_input", "normalize_activations", "k", "activation_fn",
    "rescale_acts_by_decoder_norm", "sae_lens_version", "metadata/sae_lens_version", "metadata/hook_name",
]  # fmt: skip


@settings(FUZZ, max_examples=100)
@given(data=st.data(), architecture=st.sampled_from(["standard", "topk", "jumprelu"]))
def test_saelens_cfg_json_with_random_values_loads_or_refuses(tmp_path: Path, data: st.DataObject, architecture: str) -> None:
    cfg = {"architecture": architecture, "d_in": 2, "d_sae": 2, "dtype": "float32", "k": 1, "metadata": {"sae_lens_version": "6.5.0"}}
    folder = _saelens_folder(_fresh(tmp_path), cfg=_mutate(data, cfg, SAELENS_KEYS))
    if architecture == "jumprelu":
        tensors = load_file(str(folder / "sae_weights.safetensors"))
        save_file({**tensors, "threshold": torch.full((2,), 0.1)}, str(folder / "sae_weights.safetensors"))
    _loads_or_refuses(folder)


@FUZZ
@given(data=st.data())
def test_dictionary_learning_config_with_random_values_loads_or_refuses(tmp_path: Path, data: st.DataObject) -> None:
    folder = _fresh(tmp_path)
    folder.mkdir()
    torch.save({"encoder.weight": torch.eye(2), "encoder.bias": torch.zeros(2), "decoder.weight": torch.eye(2), "bias": torch.zeros(2)},
               folder / "ae.pt")  # fmt: skip
    config = {"trainer": {"dict_class": "AutoEncoder", "activation_dim": 2, "dict_size": 2, "k": 1}, "buffer": {}}
    keys = ["trainer", "trainer/dict_class", "trainer/activation_dim", "trainer/dict_size", "trainer/k", "trainer/lm_name", "buffer"]
    (folder / "config.json").write_text(json.dumps(_mutate(data, config, keys)))
    _loads_or_refuses(folder)


@pytest.mark.parametrize(
    ("fmt", "edit", "match"),
    [
        ("saelens", {"metadata": ["sae_lens_version"]}, "metadata must be an object, got list"),
        ("saelens", {"metadata": True}, "metadata must be an object, got bool"),
        ("saelens", {"architecture": "topk", "k": None, "activation_fn_kwargs": [3]}, "k must be an integer in 1..d_sae"),
        ("dictionary_learning", {"dict_class": ["AutoEncoder"]}, r"class \['AutoEncoder'\] has no saekit counterpart"),
        ("dictionary_learning", {"dict_class": {"name": "AutoEncoder"}}, "has no saekit counterpart"),
    ],
)
def test_wrong_types_the_fuzzers_found_are_refused(tmp_path: Path, fmt: str, edit: dict, match: str) -> None:
    """The cases above in which hypothesis found an AttributeError or TypeError escaping (exit 1, not 2)."""
    if fmt == "saelens":
        cfg = {"architecture": "standard", "d_in": 2, "d_sae": 2, "metadata": {"sae_lens_version": "6.5.0"}}
        folder = _saelens_folder(tmp_path / "sl", cfg={k: v for k, v in {**cfg, **edit}.items() if v is not None})
    else:
        folder = tmp_path / "dl"
        folder.mkdir()
        torch.save({"encoder.weight": torch.eye(2), "encoder.bias": torch.zeros(2), "decoder.weight": torch.eye(2), "bias": torch.zeros(2)},
                   folder / "ae.pt")  # fmt: skip
        (folder / "config.json").write_text(json.dumps({"trainer": edit}))
    _refused_by_load_and_import(folder, tmp_path, match)
