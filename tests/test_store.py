"""The SQLite run registry."""

from __future__ import annotations

import sqlite3

import pytest

from saekit.store import HEADLINE, RunStore

CONFIG = {"sae": {"dict_size": 16, "l1": [0.1, 0.2]}, "train": {"lr": 0.001, "seeds": [1, 2]}}


def _start(store: RunStore, run_id: str = "r1", dict_size: int = 16, l1: float = 0.1, seed: int = 0) -> None:
    store.start_run(
        run_id, arch="relu", dict_size=dict_size, knob="l1", knob_value=l1, seed=seed, config=CONFIG, checkpoint=f"ckpt/{run_id}"
    )


def test_file_location_and_wal(tmp_path):
    """The database is OUT/runs.sqlite (folder created) in WAL mode."""
    out = tmp_path / "out" / "nested"
    with RunStore(out) as store:
        assert store.path == out / "runs.sqlite"
    assert (out / "runs.sqlite").is_file()
    db = sqlite3.connect(out / "runs.sqlite")
    try:
        # WAL is persistent in the file, so a fresh connection sees it
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        db.close()


def test_get_unknown_is_none(tmp_path):
    """get() of a run that was never started."""
    with RunStore(tmp_path) as store:
        assert store.get("nope") is None
        assert store.runs() == []


def test_start_run(tmp_path):
    """A started run is 'running' with its identity, zero progress and no metrics."""
    with RunStore(tmp_path) as store:
        _start(store, dict_size=32, l1=0.25, seed=3)
        run = store.get("r1")
    assert run["status"] == "running"
    assert (run["arch"], run["dict_size"], run["l1"], run["seed"]) == ("relu", 32, 0.25, 3)
    assert (run["knob"], run["knob_value"]) == ("l1", 0.25)
    assert run["samples"] == 0 and run["seconds"] == 0
    assert run["checkpoint"] == "ckpt/r1"
    assert run["metrics"] is None
    assert run["error"] is None


def test_config_round_trips_as_dict(tmp_path):
    """The config comes back as the same nested dict."""
    with RunStore(tmp_path) as store:
        _start(store)
        assert store.get("r1")["config"] == CONFIG


def test_history_ordered_by_samples(tmp_path):
    """Rows come back sorted by samples, one dict per sample count with every logged name."""
    with RunStore(tmp_path) as store:
        _start(store)
        _start(store, "other")
        # logged out of order on purpose
        store.log_history("r1", 200, {"loss": 0.5, "l0": 3})
        store.log_history("r1", 100, {"loss": 1.5, "l0": 7})
        store.log_history("other", 150, {"loss": 9.0})
        hist = store.history("r1")
    assert hist == [
        {"samples": 100, "loss": 1.5, "l0": 7.0},
        {"samples": 200, "loss": 0.5, "l0": 3.0},
    ]


def test_history_relogging_replaces(tmp_path):
    """Logging the same (samples, name) again replaces the value."""
    with RunStore(tmp_path) as store:
        _start(store)
        store.log_history("r1", 100, {"loss": 1.0})
        store.log_history("r1", 100, {"loss": 2.0})
        assert store.history("r1") == [{"samples": 100, "loss": 2.0}]


def test_record_progress(tmp_path):
    """Progress updates samples and seconds."""
    with RunStore(tmp_path) as store:
        _start(store)
        store.record_progress("r1", 4096, 1.5)
        run = store.get("r1")
    assert (run["samples"], run["seconds"], run["status"]) == (4096, 1.5, "running")


def test_finish_run(tmp_path):
    """finish_run stores status, progress, headline columns and the full metrics as JSON."""
    metrics = {"mse": 0.01, "fvu": 0.05, "l0": 4.5, "dead_fraction": 0.125, "mmcs": 0.93, "recovered_0_9": 0.75, "extra": 2.0}
    with RunStore(tmp_path) as store:
        _start(store)
        store.finish_run("r1", samples=1000, seconds=2.5, metrics=metrics)
        run = store.get("r1")
    assert run["status"] == "done"
    assert (run["samples"], run["seconds"]) == (1000, 2.5)
    for name in ("mse", "fvu", "l0", "dead_fraction", "mmcs", "recovered_0_9"):
        assert run[name] == pytest.approx(metrics[name])
    assert set(HEADLINE) == {"mse", "fvu", "l0", "dead_fraction", "mmcs", "recovered_0_9", "mcc", "f1", "absorption", "split", "shrinkage"}
    assert run["metrics"] == metrics


def test_finish_run_missing_headline_is_null(tmp_path):
    """A headline metric absent from the metrics dict is stored as NULL."""
    with RunStore(tmp_path) as store:
        _start(store)
        store.finish_run("r1", samples=10, seconds=1.0, metrics={"mse": 0.5})
        run = store.get("r1")
    assert run["mse"] == 0.5
    assert run["mmcs"] is None


def test_fail_run(tmp_path):
    """fail_run sets status 'failed' and the error message."""
    with RunStore(tmp_path) as store:
        _start(store)
        store.fail_run("r1", "RuntimeError: boom")
        run = store.get("r1")
    assert run["status"] == "failed"
    assert run["error"] == "RuntimeError: boom"


def test_runs_filter_by_status(tmp_path):
    """runs(status=...) returns only the runs in that state, ordered by dict_size, l1, seed."""
    with RunStore(tmp_path) as store:
        _start(store, "big", dict_size=64)
        _start(store, "small_b", dict_size=16, l1=0.2)
        _start(store, "small_a", dict_size=16, l1=0.1)
        _start(store, "failed", dict_size=8)
        for run_id in ("big", "small_b", "small_a"):
            store.finish_run(run_id, samples=1, seconds=1.0, metrics={})
        store.fail_run("failed", "x")
        done = [r["run_id"] for r in store.runs(status="done")]
        failed = [r["run_id"] for r in store.runs(status="failed")]
        everything = [r["run_id"] for r in store.runs()]
    # order: (16, 0.1), (16, 0.2), (64, 0.1)
    assert done == ["small_a", "small_b", "big"]
    assert failed == ["failed"]
    # all four, dict_size 8 first
    assert everything == ["failed", "small_a", "small_b", "big"]


def test_restart_failed_run(tmp_path):
    """start_run on a failed run sets it running again, clears the error and keeps created and progress."""
    with RunStore(tmp_path) as store:
        _start(store)
        created = store.get("r1")["created"]
        store.record_progress("r1", 500, 3.0)
        store.fail_run("r1", "boom")
        _start(store)
        run = store.get("r1")
    assert run["status"] == "running"
    assert run["error"] is None
    assert run["created"] == created
    assert run["updated"] >= created
    assert run["samples"] == 500


def test_reopen_persists(tmp_path):
    """A second RunStore on the same folder sees the first one's rows."""
    with RunStore(tmp_path) as store:
        _start(store)
        store.log_history("r1", 10, {"loss": 1.0})
    with RunStore(tmp_path) as store:
        assert store.get("r1")["status"] == "running"
        assert store.history("r1") == [{"samples": 10, "loss": 1.0}]


# `runs` as store.py created it before the columns mcc, f1, absorption, split and shrinkage (the knob columns existed).
RUNS_BEFORE_TRUTH_COLUMNS = """
CREATE TABLE runs (
    run_id TEXT PRIMARY KEY, arch TEXT NOT NULL, dict_size INTEGER NOT NULL, knob TEXT NOT NULL, knob_value REAL NOT NULL,
    l1 REAL, seed INTEGER NOT NULL, status TEXT NOT NULL, samples INTEGER NOT NULL DEFAULT 0, seconds REAL NOT NULL DEFAULT 0,
    mse REAL, fvu REAL, l0 REAL, dead_fraction REAL, mmcs REAL, recovered_0_9 REAL,
    metrics TEXT, config TEXT NOT NULL, checkpoint TEXT, error TEXT, created REAL NOT NULL, updated REAL NOT NULL
);
"""


def test_a_store_without_the_newer_headline_columns_gains_them_on_open(tmp_path):
    """The old run keeps its values and reads NULL in the new columns; a run finished afterwards fills them."""
    db = sqlite3.connect(tmp_path / "runs.sqlite")
    db.executescript(RUNS_BEFORE_TRUTH_COLUMNS)
    db.execute(
        "INSERT INTO runs (run_id, arch, dict_size, knob, knob_value, l1, seed, status, mmcs, metrics, config, created, updated)"
        " VALUES ('old', 'relu', 16, 'l1', 0.1, 0.1, 0, 'done', 0.9, '{\"mmcs\": 0.9}', '{}', 1.0, 1.0)"
    )
    db.commit()
    db.close()
    with RunStore(tmp_path) as store:
        old = store.get("old")
        assert (old["mmcs"], old["mcc"], old["split"], old["metrics"]) == (0.9, None, None, {"mmcs": 0.9})
        _start(store, "new")
        store.finish_run("new", samples=10, seconds=1.0, metrics={"mcc": 0.8, "f1": 0.5, "split": 2, "shrinkage": 0.9})
        assert [store.get("new")[k] for k in ("mcc", "f1", "split", "shrinkage", "absorption")] == [0.8, 0.5, 2, 0.9, None]
    with RunStore(tmp_path) as store:  # opened again: nothing left to add
        columns = [r[1] for r in store.db.execute("PRAGMA table_info(runs)")]
    assert all(columns.count(name) == 1 for name in HEADLINE)
