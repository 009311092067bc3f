"""The search's control flow (saekit.count.search) with a stand-in for training: which sizes and knob values it
trains, and where it stops. One end-to-end search on tiny toy data checks it against real training."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

import saekit.count.search as search_module
from saekit.analysis.curve import CurvePoint
from saekit.archspec import ARCH_SPECS
from saekit.config import parse_config
from saekit.count import count_config, default_settings, parse_duration
from saekit.count.search import SearchContext, SearchSettings, run_search, size_specs
from saekit.errors import InputError


class FakeTraining:
    """Stands in for run_config: L0 = 4 / (l1 per latent x 1000), so L0 = 8 at l1 = 0.5 m / 1000; FVU = 0.1 unless
    the L1 is so large that L0 < 1 (collapsed). The count at size m comes from `counts`: a number, or
    {samples: number} for a size whose count depends on how long it trained."""

    def __init__(self, counts: dict[int, int], seconds: float = 1.0) -> None:
        self.counts, self.seconds, self.calls, self.sized_calls = counts, seconds, [], []

    def __call__(self, cfg, folder, specs):
        self.calls.append((Path(folder).name, [(s.dict_size, s.sparsity, s.seed) for s in specs]))
        self.sized_calls.append((*self.calls[-1], cfg.train.samples))
        rows = []
        for s in specs:
            l0 = 4.0 / (s.sparsity / s.dict_size * 1000)
            rows.append(
                {
                    "run_id": f"{s.dict_size}-{s.sparsity}-{s.seed}",
                    "arch": "relu",
                    "l1": s.sparsity,
                    "l0": l0,
                    "fvu": 0.1 if l0 >= 1 else 1.0,
                    "dead_fraction": 0.0,
                    "status": "done",
                    "seconds": self.seconds,
                    "samples": cfg.train.samples,
                }
            )
        return rows, []

    def point(self, ctx, size, value, rows):
        n = self.counts[size]
        n = n[rows[0]["samples"]] if isinstance(n, dict) else n
        late, n = n if isinstance(n, tuple) else (n, n)  # (count at 80% of training, at the end)
        return CurvePoint(size, n, n, n, value, late, self.seconds, len(rows))


def run(tmp_path, monkeypatch, counts, budget=None, max_size=4096, seconds=1.0):
    fake = FakeTraining(counts, seconds)
    monkeypatch.setattr(search_module, "curve_point", fake.point)
    cfg = parse_config({"source": {"kind": "toy", "d": 64, "n_features": 128}, "train": {"samples": 10**6}})
    settings = SearchSettings(probe_samples=500, start_size=32, max_size=max_size, budget_seconds=budget)
    ctx = SearchContext(cfg, tmp_path, 64, ARCH_SPECS["relu"], 1, settings, fake, lambda text: None)
    return run_search(ctx), fake


def test_the_search_stops_when_two_sizes_with_room_agree(tmp_path, monkeypatch):
    result, fake = run(tmp_path, monkeypatch, {32: 30, 64: 60, 128: 100, 256: 126, 512: 130, 1024: 131})
    assert result["state"] == "saturated" and result["stopped"] == "saturated"
    assert [p["dict_size"] for p in result["curve"]] == [32, 64, 128, 256, 512]  # 256 (126) and 512 (130) agree
    assert result["n_features"] == 130 and result["dict_size"] == 512
    assert json.loads((tmp_path / "count.json").read_text())["n_features"] == 130
    assert fake.calls[0][0] == "probes"


def test_the_knob_follows_the_l0_target_at_every_size(tmp_path, monkeypatch):
    result, fake = run(tmp_path, monkeypatch, {32: 30, 64: 60, 128: 100, 256: 126, 512: 130})
    # the fake's L0 = 4 / (l1 per latent x 1000); the probes' best trade-off at d = 64 ... whatever it chose, each size's
    # centre value must give the same L0 there: l1 / m constant
    centres = [(p["dict_size"], p["knob_value"]) for p in result["curve"]]
    per_latent = [v / m for m, v in centres[1:]]  # from the second size on, set by the previous size's rows
    assert max(per_latent) == pytest.approx(min(per_latent), rel=1e-3)
    sizes_trained = [c for c in fake.calls if c[0] != "probes"]
    seeds = [sorted(seed for _, _, seed in specs) for _, specs in sizes_trained]
    # the first size and those after a size more than 80% full (30/32, 60/64) train the pair only; after 100/128 the
    # pair and one more seed at each neighbouring value; the size after that the pair only again
    assert seeds == [[0, 1], [0, 1], [0, 1], [0, 1, 2, 2], [0, 1]]


def test_the_search_stops_at_the_largest_size_with_a_lower_bound(tmp_path, monkeypatch):
    counts = {m: m for m in (32, 64, 128, 256, 512)}
    result, _ = run(tmp_path, monkeypatch, counts, max_size=512)
    assert result["stopped"] == "max_size" and result["state"] == "growing" and result["lower_bound"]
    assert "still growing as m^1.00 at m = 512" in result["sentence"] and "train 1024 latents next" in result["sentence"]


def test_the_search_stops_before_a_size_that_would_pass_the_budget(tmp_path, monkeypatch):
    counts = {m: m for m in (32, 64, 128, 256, 512, 1024, 2048, 4096)}
    result, _ = run(tmp_path, monkeypatch, counts, budget=1e-6, seconds=1.0)
    assert result["stopped"] == "budget" and [p["dict_size"] for p in result["curve"]] == [32]


def test_a_size_whose_count_falls_trains_again_on_more_samples_and_the_larger_sizes_keep_them(tmp_path, monkeypatch):
    # 256 latents count 126 on 1M samples; 512 count 60 on 1M, 100 on 2M (still more than 15% below 126), 128 on 4M
    counts = {32: 30, 64: 60, 128: 100, 256: 126, 512: {1_000_000: 60, 2_000_000: 100, 4_000_000: 128}, 1024: 130}
    result, fake = run(tmp_path, monkeypatch, counts)
    trained = [(specs[0][0], s) for name, specs, s in fake.sized_calls if name != "probes"]
    assert trained == [(32, 10**6), (64, 10**6), (128, 10**6), (256, 10**6), (512, 10**6), (512, 2 * 10**6), (512, 4 * 10**6)]
    assert result["state"] == "saturated" and result["n_features"] == 128
    assert [p["samples"] for p in result["curve"]] == [10**6] * 4 + [4 * 10**6]


def test_a_falling_count_is_trained_at_most_eight_times_as_long(tmp_path, monkeypatch):
    counts = {32: 30, 64: 60, 128: 100, 256: 126, 512: 60, 1024: 60}
    result, fake = run(tmp_path, monkeypatch, counts, max_size=1024)
    samples = [s for name, specs, s in fake.sized_calls if name != "probes" and specs[0][0] >= 512]
    assert samples == [10**6, 2 * 10**6, 4 * 10**6, 8 * 10**6, 8 * 10**6]  # 1024 starts where 512 ended and stays
    assert result["state"] == "falling" and result["n_features"] == 126


def test_a_size_where_the_curve_levels_off_while_still_learning_trains_again_on_more_samples(tmp_path, monkeypatch):
    # 512 latents: 110 at 80% and 130 at the end of 1M samples (18%, still learning), 128 -> 131 on 2M (2.3%)
    counts = {32: 30, 64: 60, 128: 100, 256: 126, 512: {1_000_000: (110, 130), 2_000_000: (128, 131)}, 1024: 132}
    result, fake = run(tmp_path, monkeypatch, counts)
    trained = [(specs[0][0], s) for name, specs, s in fake.sized_calls if name != "probes"]
    assert trained[-2:] == [(512, 10**6), (512, 2 * 10**6)]
    assert result["state"] == "saturated" and result["stopped"] == "saturated" and result["n_features"] == 131


def test_a_size_still_learning_after_eight_times_the_samples_stops_the_search_with_a_lower_bound(tmp_path, monkeypatch):
    counts = {32: 30, 64: 60, 128: 100, 256: 126, 512: (110, 130), 1024: 132}
    result, fake = run(tmp_path, monkeypatch, counts)
    samples = [s for name, specs, s in fake.sized_calls if name != "probes" and specs[0][0] >= 512]
    assert samples == [10**6, 2 * 10**6, 4 * 10**6, 8 * 10**6]  # and 1024 is not trained
    assert result["state"] == "learning" and result["stopped"] == "learning" and result["lower_bound"]
    assert result["n_features"] == 130 and "still learning" in result["sentence"]


def test_a_size_still_learning_is_not_trained_longer_past_the_budget(tmp_path, monkeypatch):
    clock = [0.0]  # each training call takes 1 s of this clock; the search reads it
    monkeypatch.setattr(search_module, "time", SimpleNamespace(perf_counter=lambda: clock[0]))

    class TimedTraining(FakeTraining):
        def __call__(self, cfg, folder, specs):
            clock[0] += self.seconds
            return super().__call__(cfg, folder, specs)

    fake = TimedTraining({32: 30, 64: 60, 128: 100, 256: 126, 512: (110, 130), 1024: 132})
    monkeypatch.setattr(search_module, "curve_point", fake.point)
    cfg = parse_config({"source": {"kind": "toy", "d": 64, "n_features": 128}, "train": {"samples": 10**6}})
    # 2 probe rounds + 32..256 + 512 once = 7 s; training 512 again is guessed at 2 s: 7 + 2 fits in 9.5, 8 + 2 does not
    settings = SearchSettings(probe_samples=500, start_size=32, max_size=4096, budget_seconds=9.5)
    result = run_search(SearchContext(cfg, tmp_path, 64, ARCH_SPECS["relu"], 1, settings, fake, lambda text: None))
    assert sum(name == "probes" for name, *_ in fake.sized_calls) == 2
    samples = [s for name, specs, s in fake.sized_calls if name != "probes" and specs[0][0] >= 512]
    assert samples == [10**6, 2 * 10**6]
    assert result["state"] == "learning" and result["stopped"] == "learning"


def test_a_point_keeps_the_pair_s_mean_held_out_metrics_where_both_have_them():
    # store rows: fvu and l0 as columns, the downstream loss in `metrics`; (0.1 + 0.2) / 2 = 0.15, (10 + 20) / 2 = 15,
    # KL (0.04 + 0.06) / 2 = 0.05; the CE recovered only one of them has, and a NaN, are left out
    pair = [
        {"fvu": 0.1, "l0": 10.0, "dead_fraction": 0.0, "mmcs": float("nan"), "metrics": {"kl_div": 0.04, "ce_loss_recovered": 0.9}},
        {"fvu": 0.2, "l0": 20.0, "dead_fraction": 0.5, "mmcs": 0.99, "metrics": {"kl_div": 0.06}},
    ]
    assert search_module.pair_metrics(pair) == pytest.approx({"fvu": 0.15, "l0": 15.0, "dead_fraction": 0.25, "kl_div": 0.05})


def test_a_size_trains_the_pair_and_where_asked_two_neighbours():
    specs = size_specs(ARCH_SPECS["topk"], 256, 16.0)
    assert [(s.sparsity, s.seed) for s in specs] == [(16, 0), (16, 1), (11, 2), (24, 2)]
    assert [(s.sparsity, s.seed) for s in size_specs(ARCH_SPECS["topk"], 256, 16.0, with_neighbours=False)] == [(16, 0), (16, 1)]


def test_count_config_takes_the_data_and_architecture_but_not_the_recipe(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "source: {kind: toy, d: 32, n_features: 64}\nsae: {arch: topk, dict_size: 999}\ntrain: {lr: 0.1, samples: 7, device: cpu}\n"
    )
    cfg = count_config(path, ["train.batch_size=128"])
    assert (cfg.source.d, cfg.sae.arch, cfg.train.device, cfg.train.batch_size) == (32, "topk", "cpu", 128)
    assert cfg.train.lr == 3e-3 and cfg.train.samples == 1_000_000  # the search's recipe, not the file's
    assert default_settings(cfg, 32).start_size == 32 and default_settings(cfg, 32).max_size == 2048


def test_bad_targets_and_budgets_are_refused_in_one_line(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        count_config(tmp_path / "missing.yaml")
    assert parse_duration("90") == 90 and parse_duration("15m") == 900 and parse_duration("1.5h") == 5400
    for bad in ("soon", "-3m", "0"):
        with pytest.raises(InputError, match="--budget"):
            parse_duration(bad)


@pytest.mark.slow
def test_a_real_search_counts_the_toy_data_and_resumes_without_training_again(tmp_path):
    """configs/small.yaml's data (d = 32, 48 true features, the report's generator): the curve saturates by 256
    latents, within 15% of 48."""
    from saekit.count import count_features

    cfg = count_config(_toy_yaml(tmp_path, d=32, g=48), ["train.samples=600000"])
    settings = SearchSettings(probe_samples=100_000, start_size=32, max_size=256)
    result = count_features(cfg, tmp_path / "out", settings=settings, progress=False)
    assert result["state"] == "saturated", result["sentence"]
    assert abs(result["n_features"] - 48) <= 0.15 * 48, result["curve"]
    again = count_features(cfg, tmp_path / "out", settings=settings, progress=False)  # every SAE is read back
    assert again["curve"] == result["curve"] and again["seconds"] < result["seconds"] / 3
    import saekit

    assert saekit.estimate(tmp_path / "out")["n_features"] == result["n_features"]  # the estimate of a count folder is its curve's


def _toy_yaml(tmp_path: Path, d: int, g: int) -> Path:
    path = tmp_path / "toy.yaml"
    path.write_text(f"source: {{kind: toy, d: {d}, n_features: {g}}}\n")
    return path


@pytest.mark.slow
def test_reproduce_quick_is_the_search_with_its_report(tmp_path):
    """`saekit reproduce --preset quick` on configs/small.yaml's data: the search's JSON, a report page with the
    count's curve, and `saekit estimate` on the folder gives the same count."""
    import subprocess
    import sys

    out = tmp_path / "q"
    args = ["reproduce", "--preset", "quick", "--set", "source.d=32", "--set", "source.n_features=48", "--set", "train.samples=600000"]
    done = subprocess.run(
        [sys.executable, "-m", "saekit", *args, "--out", str(out), "--json", "--no-progress"], capture_output=True, text=True, timeout=1200
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["estimate"]["curve"] and result["estimate"]["sentence"]
    assert result["runs"] and all(r["status"] == "done" for r in result["runs"])
    assert (out / "report.html").is_file() and (out / "count.json").is_file()
    again = subprocess.run([sys.executable, "-m", "saekit", "estimate", str(out), "--json"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and json.loads(again.stdout)["n_features"] == result["estimate"]["n_features"]


def test_the_search_stops_at_the_memory_limit(tmp_path, monkeypatch):
    counts = {m: m for m in (32, 64, 128, 256, 512)}
    fake = FakeTraining(counts)
    monkeypatch.setattr(search_module, "curve_point", fake.point)
    cfg = parse_config({"source": {"kind": "toy", "d": 64, "n_features": 128}, "train": {"samples": 10**6}})
    settings = SearchSettings(probe_samples=500, start_size=32, max_size=4096)
    ctx = SearchContext(cfg, tmp_path, 64, ARCH_SPECS["relu"], 1, settings, fake, lambda text: None, lambda n, m: m < 128)
    result = run_search(ctx)
    assert result["stopped"] == "memory" and [p["dict_size"] for p in result["curve"]] == [32, 64]


@pytest.mark.slow
def test_a_killed_search_resumes_to_the_curve_an_uninterrupted_one_gives(tmp_path):
    """SIGKILL once the first size is in count.json, run again: the same sizes, knob values and counts as a search that
    was never stopped (training is deterministic on one thread)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    sets = ["source.d=8", "source.n_features=12", "source.mean_active=2", "train.samples=60000", "train.eval_samples=4000"]
    args = [a for s in sets for a in ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def start(out: Path) -> subprocess.Popen:
        cmd = [
            sys.executable,
            "-m",
            "saekit",
            "count",
            str(_toy_yaml(tmp_path, d=8, g=12)),
            *args,
            "--out",
            str(out),
            "--json",
            "--no-progress",
        ]
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    killed = start(tmp_path / "a")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and killed.poll() is None:
        path = tmp_path / "a" / "count.json"
        if path.is_file() and json.loads(path.read_text())["curve"]:
            break
        time.sleep(0.05)
    assert killed.poll() is None, "the search ended before it could be killed"
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=60)
    resumed, whole = start(tmp_path / "a"), start(tmp_path / "b")
    out_a, err_a = resumed.communicate(timeout=900)
    out_b, err_b = whole.communicate(timeout=900)
    assert resumed.returncode == 0 and whole.returncode == 0, (err_a[-1500:], err_b[-1500:])

    def shape(doc: bytes) -> list[tuple]:
        return [(p["dict_size"], p["count"], p["knob_value"], p["n_saes"]) for p in json.loads(doc)["curve"]]

    assert shape(out_a) == shape(out_b)


def test_a_penalty_never_rises_above_its_size_scaling_and_falls_at_most_sqrt_2():
    from saekit.count.search import _bounded

    assert _bounded(5.0, 1.0, integer=False) == 1.0  # larger dictionaries' early L0 must not push the penalty up
    assert _bounded(0.9, 1.0, integer=False) == 0.9
    assert _bounded(0.1, 1.0, integer=False) == pytest.approx(2**-0.5)
    assert _bounded(None, 1.0, integer=False) == 1.0
    assert _bounded(24.0, 16.0, integer=True) == 24.0  # k is the L0 target itself
