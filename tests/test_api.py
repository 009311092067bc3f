"""The notebook API: saekit.train / estimate / report / load, the names importable from `saekit`, `python -m saekit`.

The sweeps here are tiny (d=16, 32 true features, 32 latents, 4096 samples): they check the contract (fields,
grid, files, errors), not what the SAEs learn.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import saekit
from saekit.config import Config
from saekit.errors import InputError

TINY = {
    "source": {"d": 16, "n_features": 32, "mean_active": 3},
    "sae": {"dict_size": 32},
    "train": {"samples": 4096, "eval_samples": 4096, "log_every": 4},
}
# The fields DESIGN.md's contract promises in every row of `saekit train --json` (mmcs and recovered_0_9: the toy
# source knows its true features).
ROW_FIELDS = {"run_id", "arch", "dict_size", "l1", "seed", "samples", "seconds", "mse", "fvu", "l0", "dead_fraction"}
TRUTH_FIELDS = {"mmcs", "recovered_0_9"}
ESTIMATE_FIELDS = {"n_features", "low", "high", "dict_size", "l1"}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A 2 x 2 grid (L1 0.3 and 1.0, init seeds 0 and 1) given as a dict, a keyword override and a dict override."""
    out = tmp_path_factory.mktemp("sweep")
    rows = saekit.train(TINY, out=out, progress=False, sae__l1=[0.3, 1.0], overrides={"train.seeds": [0, 1]})
    return out, rows


def test_train_returns_one_contract_row_per_sae(sweep):
    out, rows = sweep
    assert len(rows) == 4
    for row in rows:
        assert ROW_FIELDS | TRUTH_FIELDS <= set(row), sorted(ROW_FIELDS | TRUTH_FIELDS - set(row))
        assert row["status"] == "done"
        assert row["arch"] == "relu" and row["dict_size"] == 32 and row["samples"] == 4096
        assert 0.0 <= row["mmcs"] <= 1.0 and 0.0 <= row["dead_fraction"] <= 1.0
        assert Path(row["checkpoint"]).is_dir()
    assert sorted((row["l1"], row["seed"]) for row in rows) == [(0.3, 0), (0.3, 1), (1.0, 0), (1.0, 1)]
    assert (out / "runs.sqlite").is_file()


def test_train_again_skips_finished_saes(sweep):
    out, rows = sweep
    again = saekit.train(TINY, out=out, progress=False, overrides={"sae.l1": [0.3, 1.0], "train.seeds": [0, 1]})
    assert [r["run_id"] for r in again] == [r["run_id"] for r in rows]
    assert [r["mse"] for r in again] == [r["mse"] for r in rows]  # read back, not retrained


def test_rows_are_what_the_cli_prints(sweep, tmp_path):
    """The same config through `saekit train --json` gives the same run ids and the same fields."""
    _, rows = sweep
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    cmd = [sys.executable, "-m", "saekit", "train", str(config), "--set", "sae.l1=[0.3,1.0]", "--set", "train.seeds=[0,1]"]
    done = subprocess.run(
        [*cmd, "--out", str(tmp_path / "cli"), "--json", "--no-progress"], capture_output=True, text=True, check=True, timeout=300
    )
    printed = json.loads(done.stdout)
    assert [r["run_id"] for r in printed] == [r["run_id"] for r in rows]
    assert [set(r) - {"checkpoint"} for r in printed] == [set(r) - {"checkpoint"} for r in rows]


def test_train_accepts_a_yaml_path_and_a_config(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    from_path = saekit.train(config, out=tmp_path / "a", progress=False, sae__l1=0.5)
    from_str = saekit.train(str(config), out=tmp_path / "b", progress=False, overrides={"sae.l1": 0.5})
    from_config = saekit.train(Config.model_validate(TINY), out=tmp_path / "c", progress=False, sae__l1=0.5)
    ids = [rows[0]["run_id"] for rows in (from_path, from_str, from_config)]
    assert len(set(ids)) == 1 and ids[0].startswith("relu-m32-l1_0.5-s0-")


def test_resolve_config_applies_overrides_without_changing_the_input():
    from saekit.api import resolve_config

    data = {"sae": {"l1": [0.1]}}
    cfg = resolve_config(data, {"sae.dict_size": [8, 16], "train__lr": 0.01}, {"train__samples": 100, "source__kind": "tms"})
    assert cfg.sae.dict_size == [8, 16] and cfg.sae.l1 == [0.1] and cfg.train.samples == 100 and cfg.train.lr == 0.01
    assert cfg.source.kind == "tms" and cfg.source.d == 20  # tms's own default width
    assert data == {"sae": {"l1": [0.1]}}
    assert resolve_config(None).sae.l1 == Config().sae.l1
    base = Config.model_validate({"sae": {"arch": "topk", "k": 4}})
    assert resolve_config(base) is base
    assert resolve_config(base, {"sae.dict_size": 64}).sae.k == 4


@pytest.mark.parametrize(
    ("overrides", "keywords", "match"),
    [
        ({"sae.nope": 1}, {}, "unknown config key"),
        ({}, {"sae__nope": 1}, "unknown config key"),
        ({}, {"l1": 0.1}, "section__key"),
        ({"sae..l1": 0.1}, {}, "section.key"),
        ({"sae.dict_size.x": 1}, {}, "not a section"),
        ({"sae.l1": -1.0}, {}, "l1"),
    ],
)
def test_bad_overrides_raise_input_error(tmp_path, overrides, keywords, match):
    with pytest.raises(InputError, match=match):
        saekit.train(TINY, out=tmp_path, progress=False, overrides=overrides, **keywords)
    assert not (tmp_path / "runs.sqlite").exists()


def test_train_refuses_a_missing_config_file(tmp_path):
    with pytest.raises(InputError, match="config file not found"):
        saekit.train(tmp_path / "missing.yaml", out=tmp_path)


def test_estimate_returns_the_contract_fields(sweep):
    out, rows = sweep
    result = saekit.estimate(out)
    assert ESTIMATE_FIELDS <= set(result)
    assert result["knob"] == "l1" and result["l1"] in (0.3, 1.0)
    assert result["dict_size"] == 32
    assert result["low"] <= result["n_features"] <= result["high"]
    assert isinstance(result["summary"], str) and result["summary"]
    json.dumps(result)  # what `saekit estimate --json` prints


def test_estimate_of_a_folder_without_a_sweep_is_an_input_error(tmp_path):
    with pytest.raises(InputError):
        saekit.estimate(tmp_path)


def test_report_writes_the_page_and_returns_its_path(sweep):
    out, rows = sweep
    path = saekit.report(out)
    assert path == out / "report.html"
    html = path.read_text()
    assert html.lstrip().lower().startswith("<!doctype html") and rows[0]["run_id"] in html


def test_load_reads_a_trained_sae(sweep):
    _, rows = sweep
    sae = saekit.load(rows[0]["checkpoint"])
    codes = sae.encode(torch.randn(5, 16))
    assert codes.shape[-1] == 32 and sae.decode(codes).shape[-1] == 16


def test_sources_and_architectures_are_importable_from_saekit():
    from saekit import sae, sources

    assert saekit.ToySource is sources.ToySource and saekit.TMSSource is sources.TMSSource
    assert saekit.ReluSAE is sae.ReluSAE and saekit.TopKSAE is sae.TopKSAE and saekit.GatedSAE is sae.GatedSAE
    assert set(saekit.ARCHITECTURES) == {"relu", "topk", "batchtopk", "jumprelu", "gated", "matryoshka"}
    assert saekit.MatryoshkaBatchTopKSAE is sae.MatryoshkaBatchTopKSAE
    for name in saekit.__all__:
        assert getattr(saekit, name) is not None, name
    with pytest.raises(AttributeError):
        saekit.NoSuchThing  # noqa: B018


def test_train_and_report_stay_functions_after_their_subpackages_are_imported():
    import saekit.report.figures
    import saekit.train.loop  # noqa: F401

    assert callable(saekit.train) and callable(saekit.report)
    assert saekit.train.loop is sys.modules["saekit.train.loop"]
    assert saekit.report.figures is sys.modules["saekit.report.figures"]
    assert "config_or_path" in saekit.train.__doc__ or "config" in saekit.train.__doc__


def test_import_saekit_does_not_import_torch():
    code = "import sys, saekit; saekit.train; saekit.estimate; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert done.stdout.strip() == "False"


def test_python_m_saekit_runs_the_cli(tmp_path):
    assert subprocess.run([sys.executable, "-m", "saekit", "--help"], capture_output=True, timeout=300).returncode == 0
    bad = subprocess.run(
        [sys.executable, "-m", "saekit", "train", "--set", "sae.nope=1", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "unknown config key" in bad.stderr
