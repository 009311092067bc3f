"""`saekit count` under torchrun: 2 ranks share each size's SAEs and end on the curve one process gives (with
`train.parallel: data`, on its sizes and knob values up to rounding); a busy OUT stops both ranks with one line;
`reproduce --preset quick` stays one process's.

The search is tiny (d = 8, 12 true features, 20,000 samples per SAE, 50,000 per probe: sizes 8 to 512); it takes
about 4 s in one process and 10-15 s on 2 ranks on 2 busy cores, most of it the processes importing torch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from saekit.count import count_config, count_features
from saekit.errors import InputError
from saekit.outlock import hold_out_dir
from saekit.pipeline import reproduce_search
from saekit.store import RunStore
from test_distributed import TORCHRUN, one_thread, run_torchrun

pytestmark = pytest.mark.distributed

SETS = ["source.mean_active=2", "train.samples=20000", "train.eval_samples=2000"]


def toy_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "toy.yaml"
    path.write_text("source: {kind: toy, d: 8, n_features: 12}\n")
    return path


def torchrun_count(config: Path, out: Path) -> list[str]:
    sets = [a for s in SETS for a in ("--set", s)]
    return [*TORCHRUN, "-m", "saekit.cli", "count", str(config), *sets, "--out", str(out), "--json", "--no-progress"]


def shape(result: dict) -> list[dict]:
    """What the search decided and counted at each size (all but the time it took and the held-out metrics, which
    an ensemble split over ranks computes to float rounding, compared by `metrics_agree`)."""
    return [{k: v for k, v in point.items() if k not in ("seconds", "metrics")} for point in result["curve"]]


def metrics_agree(result: dict, reference: dict) -> bool:
    """Each size's held-out metrics equal to 1e-4 relative (members of a split ensemble round differently)."""
    pairs = zip(result["curve"], reference["curve"], strict=True)
    return all(a["metrics"] == pytest.approx(b["metrics"], rel=1e-4, abs=1e-6) for a, b in pairs)


def ensembles_by_size(out: Path) -> dict[int, set[str]]:
    """The ensembles that trained each size's SAEs, from OUT's run store."""
    by_size: dict[int, set[str]] = {}
    with RunStore(out) as store:
        for run in store.runs():
            assert run["status"] == "done"
            by_size.setdefault(run["dict_size"], set()).add(run["metrics"]["ensemble_id"])
    return by_size


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> tuple[Path, dict]:
    """The search in this one process, on one thread like each rank: (its OUT, its result)."""
    tmp = tmp_path_factory.mktemp("single")
    with one_thread():
        return tmp / "out", count_features(count_config(toy_yaml(tmp), SETS), tmp / "out", progress=False)


def test_count_on_two_ranks_equals_one_process(tmp_path, single):
    alone_out, reference = single
    proc = run_torchrun(torchrun_count(toy_yaml(tmp_path), tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)  # rank 0's document alone
    assert len(result["curve"]) >= 3 and shape(result) == shape(reference) and metrics_agree(result, reference)
    assert result["probes"] == reference["probes"] and result["n_features"] == reference["n_features"]
    assert json.loads((tmp_path / "out" / "count.json").read_text())["curve"] == result["curve"]
    assert proc.stderr.count("probes at") == 1, "rank 0 alone logs"
    for sub in ("", "probes"):
        assert not list((tmp_path / "out" / sub).glob("runs.rank*.sqlite*")), "rank 0 merged the rank files"
        # each ensemble of one process is two on 2 ranks: each rank trained its share of it
        alone, ranks = ensembles_by_size(alone_out / sub), ensembles_by_size(tmp_path / "out" / sub)
        assert {m: 2 * len(ids) for m, ids in alone.items()} == {m: len(ids) for m, ids in ranks.items()}


def test_data_parallel_count_trains_the_same_sizes(tmp_path, single):
    """train.parallel: data, every SAE on both ranks: the sizes and SAEs of one process, knob values equal up to float
    rounding (which could move a count, so counts are not compared)."""
    _, reference = single
    proc = run_torchrun([*torchrun_count(toy_yaml(tmp_path), tmp_path / "out"), "--set", "train.parallel=data"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert [(p["dict_size"], p["n_saes"]) for p in result["curve"]] == [(p["dict_size"], p["n_saes"]) for p in reference["curve"]]
    for got, want in zip(result["curve"], reference["curve"]):
        assert got["knob_value"] == pytest.approx(want["knob_value"], rel=1e-3)
    assert not list((tmp_path / "out").glob("runs.rank*.sqlite*")), "rank 0 alone records"


def test_a_busy_out_stops_both_ranks_with_one_line(tmp_path):
    out = tmp_path / "out"
    with hold_out_dir(out):
        proc = run_torchrun(torchrun_count(toy_yaml(tmp_path), out), timeout=300)
    assert proc.returncode != 0 and proc.stdout == ""
    # one per rank (counted in the whole text: two ranks' lines can interleave on the shared stderr)
    assert proc.stderr.count("is in use by another saekit process") == 2, proc.stderr[-3000:]
    assert not (out / "count.json").exists()


def test_reproduce_quick_is_refused_under_torchrun(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(InputError, match="only `saekit train` and `saekit count` share their work"):
        reproduce_search(tmp_path / "q", [], progress=False)
    assert not (tmp_path / "q").exists()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
