"""The `saekit` command: the JSON contract, and bad input refused in one line with exit code 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

TINY = [
    "source.d=8",
    "source.n_features=12",
    "source.mean_active=2",
    "sae.dict_size=16",
    "sae.l1=0.1",
    "train.samples=4096",
    "train.batch_size=256",
    "train.eval_samples=2048",
    "train.log_every=4",
    "train.checkpoint_every=2048",
]


# DESIGN.md, "Contract": the fields every object of `saekit train --json` holds (with ground truth).
CONTRACT_FIELDS = (
    "run_id",
    "arch",
    "dict_size",
    "l1",
    "seed",
    "samples",
    "seconds",
    "mse",
    "fvu",
    "l0",
    "dead_fraction",
    "mmcs",
    "recovered_0_9",
)


def saekit(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "saekit.cli", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def with_sets(*sets: str) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def test_train_json_contract(tmp_path):
    out = tmp_path / "out"
    r = saekit("train", *with_sets(*TINY, "train.seeds=[0,1]"), "--out", str(out), "--json", "--no-progress")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert len(rows) == 2 and {row["seed"] for row in rows} == {0, 1}
    for row in rows:
        for key in CONTRACT_FIELDS:
            assert key in row, key
        assert row["arch"] == "relu" and row["dict_size"] == 16 and row["l1"] == 0.1 and row["samples"] == 4096
        assert 0 <= row["mmcs"] <= 1 and 0 <= row["recovered_0_9"] <= 1 and 0 <= row["dead_fraction"] <= 1
        ck = Path(row["checkpoint"])
        assert (ck / "cfg.json").is_file() and (ck / "sae.safetensors").is_file()
    assert (out / "runs.sqlite").is_file()
    # Re-running the same command finds the finished runs and does not retrain them.
    again = saekit("train", *with_sets(*TINY, "train.seeds=[0,1]"), "--out", str(out), "--json", "--no-progress")
    assert again.returncode == 0 and json.loads(again.stdout) == rows


def test_train_from_yaml_file(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "source:\n  d: 8\n  n_features: 12\n  mean_active: 2\nsae:\n  dict_size: [8, 16]\ntrain:\n  samples: 2048\n  eval_samples: 1024\n"
    )
    r = saekit("train", str(cfg), "--out", str(tmp_path / "o"), "--json", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert sorted(row["dict_size"] for row in json.loads(r.stdout)) == [8, 16]


def _write(tmp_path: Path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def _nan_file(tmp_path: Path) -> str:
    data = torch.rand(100, 8)
    data[5, 3] = float("nan")
    p = tmp_path / "acts.safetensors"
    save_file({"activations": data}, str(p))
    return str(p)


def _inf_npy(tmp_path: Path) -> str:
    data = np.random.rand(100, 8).astype(np.float32)
    data[0, 0] = np.inf
    p = tmp_path / "acts.npy"
    np.save(p, data)
    return str(p)


BAD_INPUTS = {
    "unknown key": (lambda t: with_sets("sae.colour=red"), "unknown config key"),
    "unknown section key": (lambda t: ["--set", "bogus.x=1"], "unknown config key"),
    "negative size": (lambda t: with_sets("sae.dict_size=-4"), "dict_size"),
    "zero size": (lambda t: with_sets("source.d=0"), "source.d"),
    "mean_active too large": (lambda t: with_sets("source.n_features=4", "source.mean_active=5"), "mean_active"),
    "unknown arch": (lambda t: with_sets("sae.arch=transcoder"), "unknown architecture"),
    "nan lr": (lambda t: with_sets("train.lr=nan"), "train.lr"),
    "not yaml": (lambda t: [_write(t, "bad.yaml", "sae: [1, 2\n  dict_size: {")], "YAML"),
    "missing file": (lambda t: [str(t / "nope.yaml")], "not found"),
    "nan in data": (lambda t: with_sets("source.kind=file", f"source.path={_nan_file(t)}"), "NaN"),
    "inf in npy data": (lambda t: with_sets("source.kind=file", f"source.path={_inf_npy(t)}"), "NaN/Inf"),
    "missing data file": (lambda t: with_sets("source.kind=file", f"source.path={t / 'none.npy'}"), "not found"),
    "corrupt data file": (lambda t: with_sets("source.kind=file", f"source.path={_write(t, 'x.safetensors', 'garbage')}"), "cannot read"),
    "bad --set": (lambda t: ["--set", "sae.l1"], "key=value"),
    "unknown device": (lambda t: with_sets("train.device=tpu9"), "device"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exit_2_one_line_nothing_written(tmp_path, case):
    make_args, needle = BAD_INPUTS[case]
    out = tmp_path / "out"
    r = saekit("train", *make_args(tmp_path), "--out", str(out), "--json", "--no-progress")
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert needle.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert not out.exists()


def test_diverging_run_fails_in_one_line_and_keeps_last_good_checkpoint(tmp_path):
    # lr=1e30: the first Adam step moves every weight by ~1e30, so the next loss overflows to Inf.
    out = tmp_path / "out"
    r = saekit("train", *with_sets(*TINY, "train.lr=1e30"), "--out", str(out), "--json", "--no-progress")
    assert r.returncode == 1
    assert "NaN/Inf" in r.stderr and "Traceback" not in r.stderr
    rows = json.loads(r.stdout)
    assert rows[0]["status"] == "failed"


def test_bench_json_reports_ratios():
    r = saekit("bench", "--json", "--quick", "--threads", "1")
    assert r.returncode == 0, r.stderr
    results = json.loads(r.stdout)
    ens = results["ensemble"]
    assert ens["members"] == 8 and ens["batch_size"] == 256
    # a ratio of two timings: present and positive, its size is the machine's (a busy shared one skews it)
    assert results["ensemble_speedup"] > 0
    assert results["ensemble_speedup_matmul_precision_medium"] == results["ensemble_matmul_precision_medium"]["ensemble_speedup"]
    assert results["roofline_fraction"] == results["training"]["roofline_fraction"]
    for name in ("training", "training_batch_256"):
        row = results[name]
        assert row["threads"] == 1 and row["d"] == 256 and row["dict_size"] == 1024
        for key in ("step_ms", "matmul_ms", "plain_step_ms", "data_ms", "data_correlated_ms"):
            assert row[key] > 0, key
        # The ratios are the quotients of the timings they name (not asserted against any speed target).
        assert row["roofline_fraction"] == pytest.approx(row["matmul_ms"] / row["step_ms"])
        assert row["speedup_vs_plain"] == pytest.approx(row["plain_step_ms"] / row["step_ms"])
        assert row["data_fraction_of_step"] == pytest.approx(row["data_ms"] / row["step_ms"])


def test_estimate_and_report_refuse_a_folder_without_a_sweep(tmp_path):
    for cmd in ("estimate", "report"):
        r = saekit(cmd, str(tmp_path / "nothing"))
        assert r.returncode == 2 and "no saekit run store" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_reproduce_unknown_preset_is_bad_input(tmp_path):
    r = saekit("reproduce", "--preset", "huge", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "unknown preset" in r.stderr
    assert not (tmp_path / "o").exists()


def test_sweep_over_max_memory_is_refused_with_the_figure(tmp_path):
    out = tmp_path / "out"
    r = saekit("train", *with_sets(*TINY, "sae.dict_size=[16,32]"), "--max-memory", "1K", "--out", str(out), "--json")
    assert r.returncode == 2 and "needs about" in r.stderr and "--max-memory 1.0 KiB" in r.stderr
    assert not out.exists()
    bad = saekit("train", *with_sets(*TINY), "--max-memory", "lots", "--out", str(out))
    assert bad.returncode == 2 and "--max-memory" in bad.stderr
