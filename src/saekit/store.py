"""The run registry: `OUT/runs.sqlite` (SQLite in WAL mode), one row per SAE plus metrics over time.

Table `runs`: run_id, arch, dict_size, the sparsity knob's name and value (`knob`: l1, k or l0_coef, the
architecture's config key; `knob_value`: its value, stored as REAL), `l1` (the knob's value when the knob is
l1, else NULL: kept so that readers of the L1 coefficient find it where they always did), seed, status
(running | done | failed), samples, seconds, the headline metrics as columns, all final metrics as JSON, the
full config as JSON, the checkpoint folder, and an error message.
Table `history`: (run_id, samples, name, value) rows logged during training.

Stores written before the knob columns existed kept every architecture's knob value in `l1`; opening one
rebuilds its `runs` table in the current layout (`upgrade_runs_table`), in one transaction. Stores written before
a headline column existed get it added, empty for their runs (`add_headline_columns`).
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from pathlib import Path
from typing import Any

from saekit.archspec import ARCH_SPECS, spec_for_knob

HEADLINE = ("mse", "fvu", "l0", "dead_fraction", "mmcs", "recovered_0_9", "mcc", "f1", "absorption", "split", "shrinkage")

_RUNS_COLUMNS = f"""
    run_id TEXT PRIMARY KEY,
    arch TEXT NOT NULL,
    dict_size INTEGER NOT NULL,
    knob TEXT NOT NULL,
    knob_value REAL NOT NULL,
    l1 REAL,
    seed INTEGER NOT NULL,
    status TEXT NOT NULL,
    samples INTEGER NOT NULL DEFAULT 0,
    seconds REAL NOT NULL DEFAULT 0,
    {", ".join(f"{name} REAL" for name in HEADLINE)},
    metrics TEXT,
    config TEXT NOT NULL,
    checkpoint TEXT,
    error TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL
"""
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS runs ({_RUNS_COLUMNS});
CREATE TABLE IF NOT EXISTS history (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    samples INTEGER NOT NULL,
    name TEXT NOT NULL,
    value REAL,
    PRIMARY KEY (run_id, samples, name)
);
"""


def upgrade_runs_table(db: sqlite3.Connection) -> None:
    """Rebuild a `runs` table without the knob columns in the current layout: `knob` from the architecture,
    `knob_value` from the old `l1` column (which held every architecture's knob value), `l1` kept only where
    the knob is l1. One transaction; a store being upgraded by another process is waited for, not upgraded twice."""
    if not _lacks_knob_columns(db):
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        if _lacks_knob_columns(db):  # another process may have upgraded it while we waited for the lock
            cursor = db.execute("SELECT * FROM runs")
            names = [c[0] for c in cursor.description]
            rows = [dict(zip(names, r)) for r in cursor]
            db.execute("DROP TABLE runs")
            db.execute(f"CREATE TABLE runs ({_RUNS_COLUMNS})")
            for row in rows:
                knob = ARCH_SPECS[row["arch"]].knob if row["arch"] in ARCH_SPECS else "l1"
                row.update(knob=knob, knob_value=row["l1"], l1=row["l1"] if knob == "l1" else None)
                db.execute(f"INSERT INTO runs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", tuple(row.values()))
        db.commit()
    except BaseException:
        db.rollback()
        raise


def add_headline_columns(db: sqlite3.Connection) -> None:
    """Add to an existing `runs` table the HEADLINE columns it lacks (NULL for its rows; their metrics JSON keeps
    whatever was measured then). One transaction; a store being upgraded by another process is waited for."""
    if not _missing_headline(db):
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        for name in _missing_headline(db):  # another process may have added some while we waited for the lock
            db.execute(f"ALTER TABLE runs ADD COLUMN {name} REAL")
        db.commit()
    except BaseException:
        db.rollback()
        raise


def _missing_headline(db: sqlite3.Connection) -> list[str]:
    columns = {r[1] for r in db.execute("PRAGMA table_info(runs)")}
    return [name for name in HEADLINE if columns and name not in columns]


def _lacks_knob_columns(db: sqlite3.Connection) -> bool:
    columns = {r[1] for r in db.execute("PRAGMA table_info(runs)")}
    return bool(columns) and "knob" not in columns


class RunStore:
    """A handle on `OUT/runs.sqlite` (or another file of OUT: `filename`); creates the folder and tables on first use.

    Under torchrun each rank of a sweep writes its own `OUT/runs.rank{r}.sqlite` (`rank_filename`), which
    rank 0 merges into `OUT/runs.sqlite` at the end (`merge_rank_stores`)."""

    FILENAME = "runs.sqlite"

    def __init__(self, out_dir: str | Path, filename: str | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / (filename or self.FILENAME)
        self.db = sqlite3.connect(self.path, timeout=30.0)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        upgrade_runs_table(self.db)
        add_headline_columns(self.db)
        with self.db:
            self.db.executescript(_SCHEMA)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing ----------------------------------------------------------------------------

    def start_run(
        self,
        run_id: str,
        *,
        arch: str,
        dict_size: int,
        knob: str,
        knob_value: float,
        seed: int,
        config: dict[str, Any],
        checkpoint: str,
    ) -> None:
        """Register a run as `running` (or mark an existing one running again, keeping its progress).
        `knob`: the config key of the architecture's sparsity knob (l1, k, l0_coef); `knob_value`: its value."""
        now = time.time()
        l1 = knob_value if knob == "l1" else None
        with self.db:
            self.db.execute(
                """INSERT INTO runs (run_id, arch, dict_size, knob, knob_value, l1, seed, status, config, checkpoint, created, updated)
                   VALUES (?, ?, ?, ?, ?, ?, ?, 'running', ?, ?, ?, ?)
                   ON CONFLICT(run_id) DO UPDATE SET status='running', error=NULL, updated=excluded.updated""",
                (run_id, arch, dict_size, knob, knob_value, l1, seed, json.dumps(config, sort_keys=True), checkpoint, now, now),
            )

    def log_history(self, run_id: str, samples: int, values: dict[str, float]) -> None:
        self.log_history_many([(run_id, samples, values)])

    def log_history_many(self, rows: list[tuple[str, int, dict[str, float]]]) -> None:
        """Several (run_id, samples, {name: value}) rows in one transaction."""
        with self.db:
            self.db.executemany(
                "INSERT OR REPLACE INTO history (run_id, samples, name, value) VALUES (?, ?, ?, ?)",
                [(run_id, samples, name, float(v)) for run_id, samples, values in rows for name, v in values.items()],
            )

    def record_progress(self, run_id: str, samples: int, seconds: float) -> None:
        with self.db:
            self.db.execute("UPDATE runs SET samples=?, seconds=?, updated=? WHERE run_id=?", (samples, seconds, time.time(), run_id))

    def finish_run(self, run_id: str, *, samples: int, seconds: float, metrics: dict[str, float]) -> None:
        self.finish_runs([(run_id, samples, seconds, metrics)])

    def finish_runs(self, rows: list[tuple[str, int, float, dict[str, Any]]]) -> None:
        """Mark several (run_id, samples, seconds, metrics) runs done in one transaction: all or none."""
        cols = ", ".join(f"{name}=?" for name in HEADLINE)
        now = time.time()
        with self.db:
            self.db.executemany(
                f"UPDATE runs SET status='done', samples=?, seconds=?, {cols}, metrics=?, updated=? WHERE run_id=?",
                [
                    (samples, seconds, *[metrics.get(name) for name in HEADLINE], json.dumps(metrics, sort_keys=True), now, run_id)
                    for run_id, samples, seconds, metrics in rows
                ],
            )

    def fail_run(self, run_id: str, error: str) -> None:
        with self.db:
            self.db.execute("UPDATE runs SET status='failed', error=?, updated=? WHERE run_id=?", (error, time.time(), run_id))

    # -- reading ----------------------------------------------------------------------------

    def get(self, run_id: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT * FROM runs WHERE run_id=?", (run_id,)).fetchone()
        return _row_dict(row) if row is not None else None

    def runs(self, status: str | None = None) -> list[dict[str, Any]]:
        query, args = "SELECT * FROM runs", ()
        if status is not None:
            query, args = query + " WHERE status=?", (status,)
        return [_row_dict(r) for r in self.db.execute(query + " ORDER BY dict_size, knob_value, seed, run_id", args)]

    def history(self, run_id: str) -> list[dict[str, Any]]:
        """Rows {samples, name: value, ...} in order of samples."""
        rows: dict[int, dict[str, Any]] = {}
        for r in self.db.execute("SELECT samples, name, value FROM history WHERE run_id=? ORDER BY samples", (run_id,)):
            rows.setdefault(r["samples"], {"samples": r["samples"]})[r["name"]] = r["value"]
        return list(rows.values())


RANK_PATTERN = "runs.rank*.sqlite"


def rank_filename(rank: int) -> str:
    """The store file rank `rank` of a distributed sweep writes: runs.rank{rank}.sqlite."""
    return f"runs.rank{rank}.sqlite"


def rank_store_paths(out_dir: str | Path) -> list[Path]:
    """The rank files in `out_dir` (of this sweep, or left by an interrupted one of any world size), in rank order."""

    def rank_of(p: Path) -> int:
        middle = p.name[len("runs.rank") : -len(".sqlite")]
        return int(middle) if middle.isdigit() else -1

    return sorted((p for p in Path(out_dir).glob(RANK_PATTERN) if rank_of(p) >= 0), key=rank_of)


def done_run_ids(out_dir: str | Path) -> set[str]:
    """Runs marked done in OUT/runs.sqlite or in any rank file of OUT (read without writing)."""
    done: set[str] = set()
    for path in [Path(out_dir) / RunStore.FILENAME, *rank_store_paths(out_dir)]:
        if path.is_file():
            db = sqlite3.connect(path, timeout=30.0)
            try:
                if db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='runs'").fetchone():
                    done.update(r[0] for r in db.execute("SELECT run_id FROM runs WHERE status='done'"))
            finally:
                db.close()
    return done


def _precedence(row: sqlite3.Row | dict[str, Any]) -> tuple[bool, float]:
    """Which of two rows of one run to keep: a done row over any other, then the more recently updated."""
    return (row["status"] == "done", float(row["updated"]))


def merge_rank_stores(out_dir: str | Path, paths: list[Path] | None = None) -> int:
    """Merge rank files (default: every `runs.rank*.sqlite` of OUT) into OUT/runs.sqlite in one transaction,
    then delete them. Returns how many run rows were written.

    Of the rows of one run (in OUT/runs.sqlite and the rank files), a done one wins over any other, then
    the most recently updated; history rows of the winning file replace, the others only fill gaps. The rank
    files are removed only after the transaction committed: a crash before leaves everything in place."""
    paths = rank_store_paths(out_dir) if paths is None else paths
    paths = [p for p in paths if p.is_file()]
    if not paths:
        return 0
    loaded: list[tuple[list[sqlite3.Row], list[sqlite3.Row]]] = []  # (runs, history) of each file
    for path in paths:
        db = sqlite3.connect(path, timeout=30.0)
        db.row_factory = sqlite3.Row
        try:
            upgrade_runs_table(db)  # a rank file left by an earlier version
            add_headline_columns(db)
            runs = list(db.execute("SELECT * FROM runs"))
            loaded.append((runs, list(db.execute("SELECT run_id, samples, name, value FROM history"))))
        finally:
            db.close()
    with RunStore(out_dir) as main:
        best = {r["run_id"]: (_precedence(r), -1) for r in main.db.execute("SELECT run_id, status, updated FROM runs")}
        for i, (runs, _) in enumerate(loaded):  # -1 = the row already in OUT/runs.sqlite
            for r in runs:
                if r["run_id"] not in best or _precedence(r) > best[r["run_id"]][0]:
                    best[r["run_id"]] = (_precedence(r), i)
        written = 0
        with main.db:
            for i, (runs, history) in enumerate(loaded):
                winners = {r["run_id"] for r in runs if best[r["run_id"]][1] == i}
                for r in runs:
                    if r["run_id"] in winners:
                        cols = ", ".join(r.keys())
                        main.db.execute(f"INSERT OR REPLACE INTO runs ({cols}) VALUES ({', '.join('?' * len(r))})", tuple(r))
                        written += 1
                # the winner's history replaces; a losing copy of a run only fills sample counts the winner lacks
                for verb, keep in (("IGNORE", False), ("REPLACE", True)):
                    main.db.executemany(
                        f"INSERT OR {verb} INTO history (run_id, samples, name, value) VALUES (?, ?, ?, ?)",
                        [tuple(h) for h in history if (h["run_id"] in winners) == keep],
                    )
    for path in paths:
        for extra in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            extra.unlink(missing_ok=True)
    return written


def _row_dict(row: sqlite3.Row) -> dict[str, Any]:
    d = dict(row)
    d["knob_value"] = spec_for_knob(d["knob"]).knob_number(d["knob_value"])  # an int for k
    d["config"] = json.loads(d["config"])
    d["metrics"] = json.loads(d["metrics"]) if d["metrics"] else None
    return d


def finite(v: Any) -> float | None:
    """`v` as a float, or None when missing or not finite."""
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def run_value(row: dict[str, Any], key: str) -> float | None:
    """A run's metric as a finite float: the row's own column, else its `metrics` dict (where non-headline metrics live)."""
    v = finite(row.get(key))
    return v if v is not None else finite((row.get("metrics") or {}).get(key))
