"""benchmarks/time_to_mmcs.py runs at a tiny size and reports what it promises (no wall-clock assertions)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "time_to_mmcs.py"
TINY = [
    "--threads", "1",
    "--set", "source.d=16", "--set", "source.n_features=24", "--set", "sae.dict_size=48",
    "--max-samples", "5120", "--check-every", "1280", "--eval-samples", "2000", "--pool-samples", "2560",
    "--target-mmcs", "0.5", "--json",
]  # fmt: skip
ROW_KEYS = {"trainer", "how", "status", "reached", "samples", "seconds", "samples_trained", "train_seconds", "samples_per_second"}
ROW_KEYS |= {"best_mmcs", "final_mmcs", "final_dead_fraction", "checks", "ratio_to_fastest_peer"}


def _load():
    spec = importlib.util.spec_from_file_location("time_to_mmcs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_tiny_run_reports_every_trainer(capsys) -> None:
    bench = _load()
    threads = torch.get_num_threads()
    try:
        out = bench.main(TINY)
    finally:
        torch.set_num_threads(threads)
    assert json.loads(capsys.readouterr().out)["results"].keys() == out["results"].keys() == {"saekit", "plain", "saelens"}
    assert out["threads"] == 1 and out["date"] and out["check_every"] == 1280 and out["max_samples"] == 5120
    for name in ("saekit", "plain"):
        row = out["results"][name]
        assert ROW_KEYS <= row.keys() and row["status"] == "ok"
        assert row["reached"] and row["samples"] % 1280 == 0 and row["best_mmcs"] >= 0.5 and 0 <= row["final_dead_fraction"] < 0.1
        assert [c["samples"] for c in row["checks"]] == list(range(1280, row["samples"] + 1, 1280))
    assert out["results"]["plain"]["ratio_to_fastest_peer"] is not None
    saelens = out["results"]["saelens"]
    assert saelens["status"] in ("ok", "not installed")
    if saelens["status"] == "ok":
        assert ROW_KEYS <= saelens.keys() and saelens["checks"]


def test_ratios_are_to_the_fastest_peer_that_reached() -> None:
    bench = _load()
    results = {
        "saekit": {"reached": True, "seconds": 3.0},
        "plain": {"reached": True, "seconds": 6.0},
        "saelens": {"reached": False, "seconds": None},
    }
    assert bench.add_ratios(results) == 6.0
    assert [r["ratio_to_fastest_peer"] for r in results.values()] == [0.5, 1.0, None]


@pytest.mark.slow  # about 0.7M samples of one 1024-latent SAE: 10-20 s on an idle 2-core machine
def test_the_fast_recipe_reaches_mmcs_0_99_with_few_dead_latents_in_under_a_million_samples() -> None:
    """configs/toy_fast.yaml on the report's data (seed 0): measured 2026-12-07 at 716,800 samples with 4.5% dead
    latents (0.61-0.72M samples, 2.2-3.6% dead, on data and init seeds 1-3); the report's setup at lr 1e-3 needs 1.4M."""
    bench = _load()
    threads = torch.get_num_threads()
    try:
        out = bench.main(["--threads", "2", "--trainers", "saekit", "--max-samples", "1500000", "--check-every", "102400"])
    finally:
        torch.set_num_threads(threads)
    row = out["results"]["saekit"]
    assert row["reached"] and row["samples"] <= 921_600  # checks every 102,400 samples
    assert row["final_dead_fraction"] < 0.1 and row["final_mmcs"] >= 0.99
