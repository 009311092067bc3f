"""The sparsity knob stored under its own name: stores of the previous layout still load, and `saekit train --json`
prints what it printed before the knob columns existed."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from saekit.analysis import estimate, heuristics, load_sweep
from saekit.config import load_config
from saekit.pipeline import analyse_and_report
from saekit.store import RunStore, merge_rank_stores
from saekit.train.run import result_row, run_config

# The previous layout of `runs`, as store.py created it (HEADLINE written out): every architecture's knob value in `l1`.
OLD_RUNS_TABLE = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    arch TEXT NOT NULL,
    dict_size INTEGER NOT NULL,
    l1 REAL NOT NULL,
    seed INTEGER NOT NULL,
    status TEXT NOT NULL,
    samples INTEGER NOT NULL DEFAULT 0,
    seconds REAL NOT NULL DEFAULT 0,
    mse REAL, fvu REAL, l0 REAL, dead_fraction REAL, mmcs REAL, recovered_0_9 REAL,
    metrics TEXT,
    config TEXT NOT NULL,
    checkpoint TEXT,
    error TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS history (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    samples INTEGER NOT NULL,
    name TEXT NOT NULL,
    value REAL,
    PRIMARY KEY (run_id, samples, name)
);
"""
# The previous start_run's INSERT and finish_runs' UPDATE.
OLD_START = """INSERT INTO runs (run_id, arch, dict_size, l1, seed, status, config, checkpoint, created, updated)
               VALUES (?, ?, ?, ?, ?, 'running', ?, ?, ?, ?)"""
OLD_FINISH = """UPDATE runs SET status='done', samples=?, seconds=?, mse=?, fvu=?, l0=?, dead_fraction=?, mmcs=?, recovered_0_9=?,
                metrics=?, updated=? WHERE run_id=?"""


def _old_store(path: Path) -> None:
    """A relu run and a TopK run (k = 8) written by the previous code."""
    db = sqlite3.connect(path)
    db.executescript(OLD_RUNS_TABLE)
    metrics = {"mse": 0.01, "fvu": 0.1, "l0": 5.0, "dead_fraction": 0.0, "mmcs": 0.9, "recovered_0_9": 0.8}
    for run_id, arch, value in (("relu-m64-l1_0.3-s0-aaaaaaaa", "relu", 0.3), ("topk-m64-k_8-s0-bbbbbbbb", "topk", 8.0)):
        db.execute(OLD_START, (run_id, arch, 64, value, 0, json.dumps({"sae": {"arch": arch}}), f"runs/{run_id}", 1.0, 1.0))
        db.execute(OLD_FINISH, (4096, 2.5, *metrics.values(), json.dumps(metrics), 2.0, run_id))
    db.commit()
    db.close()


def test_a_store_of_the_previous_layout_is_upgraded_on_open(tmp_path: Path) -> None:
    """Opening it moves the knob value under the knob's name; `l1` stays only for the L1 architecture, and the
    rows print as `saekit train --json` printed them before."""
    _old_store(tmp_path / "runs.sqlite")
    with RunStore(tmp_path) as store:
        relu, topk = store.runs()
        columns = [r[1] for r in store.db.execute("PRAGMA table_info(runs)")]
    assert {"knob", "knob_value", "l1"} <= set(columns)
    assert (relu["knob"], relu["knob_value"], relu["l1"]) == ("l1", 0.3, 0.3)
    assert (topk["knob"], topk["knob_value"], topk["l1"]) == ("k", 8, None) and isinstance(topk["knob_value"], int)
    assert topk["metrics"]["l0"] == 5.0 and topk["status"] == "done" and topk["checkpoint"] == "runs/topk-m64-k_8-s0-bbbbbbbb"
    row = result_row(topk)
    assert (row["l1"], row["k"], row["sparsity_knob"]) == (None, 8, "k") and list(row)[:10] == [
        *("run_id", "arch", "dict_size", "l1", "seed", "samples", "seconds", "status", "k", "sparsity_knob")
    ]
    assert result_row(relu)["l1"] == 0.3 and "k" not in result_row(relu)
    with RunStore(tmp_path) as store:  # a second open finds it upgraded and leaves it alone
        assert [r["knob_value"] for r in store.runs()] == [0.3, 8]


def test_a_rank_file_of_the_previous_layout_merges(tmp_path: Path) -> None:
    """A rank file left by an interrupted distributed sweep of the previous version merges into the current layout."""
    _old_store(tmp_path / "runs.rank0.sqlite")
    assert merge_rank_stores(tmp_path) == 2 and not (tmp_path / "runs.rank0.sqlite").exists()
    with RunStore(tmp_path) as store:
        assert [(r["knob"], r["knob_value"], r["l1"]) for r in store.runs()] == [("l1", 0.3, 0.3), ("k", 8, None)]


def _to_previous_layout(out: Path) -> None:
    """Rewrite OUT/runs.sqlite in the previous layout (the knob's value in `l1`, no knob columns)."""
    db = sqlite3.connect(out / "runs.sqlite")
    db.row_factory = sqlite3.Row
    runs = [dict(r) for r in db.execute("SELECT * FROM runs")]
    history = [tuple(r) for r in db.execute("SELECT run_id, samples, name, value FROM history")]
    db.executescript("DROP TABLE runs; DROP TABLE history;" + OLD_RUNS_TABLE)
    old_columns = {c[1] for c in db.execute("PRAGMA table_info(runs)")}
    for r in runs:
        r["l1"] = r.pop("knob_value")
        r = {k: v for k, v in r.items() if k in old_columns}  # the knob and the later headline columns did not exist
        db.execute(f"INSERT INTO runs ({', '.join(r)}) VALUES ({', '.join('?' * len(r))})", tuple(r.values()))
    db.executemany("INSERT INTO history VALUES (?, ?, ?, ?)", history)
    db.commit()
    db.close()


SMALL = ["source.d=16", "source.n_features=24", "source.mean_active=2", "train.samples=20000", "train.eval_samples=4000"]


@pytest.mark.parametrize(("arch", "knob", "values"), [("relu", "l1", [0.1, 0.3]), ("topk", "k", [2, 3])])
def test_report_and_estimate_read_a_store_of_the_previous_layout(tmp_path: Path, arch: str, knob: str, values: list) -> None:
    """A sweep whose store has the previous layout: `saekit estimate` and `saekit report` (the library functions they
    call) read its knob values as what they are (k an integer of the grid, not an L1 coefficient)."""
    grid = [f"sae.arch={arch}", f"sae.{knob}={values}", "sae.dict_size=[24,48]", "train.seeds=[0,1]"]
    run_config(load_config(None, [*SMALL, *grid]), tmp_path, progress=False)
    _to_previous_layout(tmp_path)
    sweep = load_sweep(tmp_path)
    assert sweep.knob == knob and sweep.knob_values == values
    result = estimate(sweep, heuristics(sweep))
    assert result["knob"] == knob and result[knob] in values and type(result[knob]) is type(values[0])
    assert result["l1"] == (result[knob] if knob == "l1" else None)
    assert f"at {sweep.spec.knob_name} = {result[knob]:g}" in result["summary"]
    result, page = analyse_and_report(tmp_path)
    text = page.read_text()
    assert f"sparsity losses vs {sweep.spec.knob_name}" in text and f"For each {sweep.spec.knob_name}," in text
    assert ("α" in text) == (knob == "l1")


# `saekit train --json` of three tiny sweeps as printed by the code before the knob columns (commit c115e62, CPU).
TINY = [
    *("source.d=8", "source.n_features=12", "source.mean_active=2", "sae.dict_size=16", "train.samples=2048"),
    *("train.batch_size=128", "train.eval_samples=1024", "train.log_every=4", "train.checkpoint_every=2048"),
]
METRIC_KEYS = [
    *("dead_fraction", "dense_fraction", "ensemble_id", "ensemble_size", "eval_samples", "eval_seconds", "fvu", "input_scale"),
    *("l0", "l1_loss", "mmcs", "mmcs_dict", "mse", "n_true_features", "reconstruction_loss", "recovered_0_9"),
    *("recovered_0_9_matched", "resumed_from_samples", "samples_to_mmcs_0_95", "sparsity_loss"),
]
# Keys added since, printed after all of the above in this order (the toy source has no parent features: no absorption).
LATER_KEYS = ["shrinkage", "mcc", "uniqueness", "precision", "recall", "f1", "split"]
BEFORE = {
    "relu": [
        {"run_id": "relu-m16-l1_0.1-s0-474cf66b", "l1": 0.1, "sparsity_knob": "l1", "mse": 0.0402387248593532,
         "fvu": 0.5274864007978692, "l0": 7.4072265625, "mmcs": 0.6518815025462782},
    ],
    "topk": [
        {"run_id": "topk-m16-k_2-s0-3b02f498", "l1": None, "k": 2, "sparsity_knob": "k", "mse": 0.037816414101003525,
         "fvu": 0.49573251227376935, "l0": 1.9990234375, "mmcs": 0.6610654663423577},
        {"run_id": "topk-m16-k_3-s0-1b5050d9", "l1": None, "k": 3, "sparsity_knob": "k", "mse": 0.03565104822962446,
         "fvu": 0.4673468948394041, "l0": 2.8779296875, "mmcs": 0.6598921208112599},
    ],
    "jumprelu": [
        {"run_id": "jumprelu-m16-l0_coef_0.001-s0-eb2b5c45", "l1": None, "l0_coef": 0.001, "sparsity_knob": "l0_coef",
         "mse": 0.03870956159593439, "fvu": 0.5074407152332179, "l0": 5.9228515625, "mmcs": 0.6520986894512796},
    ],
}  # fmt: skip
KNOB_SETS = {"relu": "sae.l1=0.1", "topk": "sae.k=[2,3]", "jumprelu": "sae.l0_coef=0.001"}


@pytest.mark.parametrize("arch", list(BEFORE))
def test_train_json_prints_the_same_fields_and_values(tmp_path: Path, arch: str) -> None:
    """Same keys in the same order, same run ids (the config hash), same knob fields and metrics."""
    sets = [a for s in [*TINY, f"sae.arch={arch}", KNOB_SETS[arch]] for a in ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "saekit.cli", "train", *sets, "--out", str(tmp_path), "--json", "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert len(rows) == len(BEFORE[arch])
    for row, before in zip(rows, BEFORE[arch]):
        knob = before["sparsity_knob"]
        extra = [] if knob == "l1" else [knob]
        head = ["run_id", "arch", "dict_size", "l1", "seed", "samples", "seconds", "status", *extra, "sparsity_knob"]
        assert list(row) == [*head, *METRIC_KEYS, "checkpoint", *LATER_KEYS]
        for key, value in before.items():
            assert row[key] == (pytest.approx(value, rel=1e-6) if isinstance(value, float) else value), key
        assert type(row[knob]) is type(before[knob])
        assert (row["arch"], row["dict_size"], row["seed"], row["samples"], row["dead_fraction"]) == (arch, 16, 0, 2048, 0.0)
