"""The report's heuristics and the seed-consensus estimate, on hand-made sweeps."""

import math

import pytest
import torch

from saekit.analysis import (
    Sweep,
    collapse_points,
    consensus_count,
    cross_size_table,
    estimate,
    heuristics,
    power_law_fit,
    seed_agreement,
)
from saekit.errors import InputError

E = torch.eye(6)


def test_consensus_count_hand_case():
    e2_tilted = E[1] * 0.95 + E[2] * math.sqrt(1 - 0.95**2)  # cosine 0.95 with e2
    a = torch.stack([E[0], E[1], E[3]])
    b = torch.stack([E[0], e2_tilted, E[4]])
    # Linked across seeds: (e1, e1) and (e2, e2'); e4 and e5 are found by one seed only -> 2.
    assert consensus_count(a, b, 0.9) == 2
    # Copies inside one seed merge into one component: a has e1 twice, b once -> still 1 feature.
    assert consensus_count(torch.stack([E[0], E[0]]), E[:1], 0.9) == 1
    # A chain a0 - b0 - a1 (a0 and a1 at cosine 0.92 each with b0, 0.69 with each other) is one feature.
    c = 0.92
    b0 = E[0]
    a0 = c * E[0] + math.sqrt(1 - c**2) * E[1]
    a1 = c * E[0] - math.sqrt(1 - c**2) * E[1]
    assert consensus_count(torch.stack([a0, a1]), b0[None], 0.9) == 1


def test_seed_agreement():
    assert seed_agreement(E[:3], E[:3]) == pytest.approx(1.0)
    # a = {e1, e2}, b = {e1}: b->a mean max cos 1, a->b (1 + 0)/2 = 0.5 -> (1 + 0.5) / 2 = 0.75
    assert seed_agreement(E[:2], E[:1]) == pytest.approx(0.75)
    assert seed_agreement(E[:0], E[:1]) == 0.0


def test_power_law_fit_exact():
    fit = power_law_fit([1, 2, 4, 8], [2 * x**1.5 for x in [1, 2, 4, 8]])
    assert fit["exponent"] == pytest.approx(1.5) and fit["prefactor"] == pytest.approx(2.0) and fit["r2"] == pytest.approx(1.0)
    assert power_law_fit([4], [1.0]) is None


def _run(run_id, size, l1, seed, fvu=0.1, dead=0.0, **metrics):
    return {
        "run_id": run_id,
        "arch": "relu",
        "dict_size": size,
        "knob": "l1",
        "knob_value": l1,
        "l1": l1,
        "seed": seed,
        "fvu": fvu,
        "dead_fraction": dead,
        "metrics": {"reconstruction_loss": fvu / 100, "sparsity_loss": 0.01, "l1_loss": 0.01 * l1, **metrics},
        "checkpoint": None,
    }


def test_collapse_point_interpolates_in_log_l1():
    runs = [
        _run("a", 64, 0.1, 0, fvu=0.2),
        _run("b", 64, 1.0, 0, fvu=0.8),
        _run("c", 128, 0.1, 0, fvu=0.1),
        _run("d", 128, 1.0, 0, fvu=0.3),
    ]
    out = collapse_points(Sweep(None, runs))
    # size 64: FVU 0.2 -> 0.8 crosses 0.5 halfway, i.e. at exp((log 0.1 + log 1) / 2) = sqrt(0.1) = 0.3162.
    assert out["points"] == [{"dict_size": 64, "knob_collapse": pytest.approx(math.sqrt(0.1))}]
    assert out["power_law"] is None  # one point only; size 128 never collapses


def _truth_sweep(n_true=20, d=16, sizes=(10, 20, 40, 80), seeds_at=(40, 80), l1s=(0.1, 0.3)):
    """A sweep whose dictionaries are the first min(m, n_true) true directions plus random junk latents,
    with the seeds agreeing best at L1 0.3 (at 0.1 each seed adds its own random latents)."""
    g = torch.Generator().manual_seed(0)
    truth = torch.nn.functional.normalize(torch.randn(n_true, d, generator=g), dim=1)
    runs, dirs = [], {}
    for size in sizes:
        for l1 in l1s:
            for seed in (0, 1) if size in seeds_at else (0,):
                run_id = f"m{size}-l{l1}-s{seed}"
                found = truth[: min(size, n_true)]
                junk = 0 if l1 == 0.3 else 6
                extra = torch.nn.functional.normalize(torch.randn(junk, d, generator=g), dim=1)
                dirs[run_id] = torch.cat([found, extra])
                runs.append(_run(run_id, size, l1, seed, dead=max(0.0, 1 - n_true / size)))
    sweep = Sweep(None, runs)
    sweep._directions.update({(run_id, False): v for run_id, v in dirs.items()})
    return sweep


def test_estimate_counts_what_both_seeds_learned():
    sweep = _truth_sweep()
    result = estimate(sweep)
    # At 80 latents both seeds hold the 20 true directions; junk latents differ between seeds, so the count is 20.
    assert result["n_features"] == 20 and result["low"] == 20 and result["high"] == 20
    assert result["l1"] in (0.1, 0.3) and result["dict_size"] == 40  # smallest size >= 2 x 20
    for key in ("n_features", "low", "high", "dict_size", "l1", "signals", "summary"):
        assert key in result
    dead_signal = next(s for s in result["signals"] if s["name"].startswith("dead"))
    assert dead_signal["value"] == 40  # dead fraction 1 - 20/40 = 0.5 > 5% first at 40 latents


def test_cross_size_table_matches_contained_dictionaries():
    sweep = _truth_sweep()
    rows = [r for r in cross_size_table(sweep) if r["knob_value"] == 0.3]
    # At L1 0.3 every dictionary is a prefix of the true directions, so each smaller one is fully found in the larger.
    assert rows and all(r["mmcs"] == pytest.approx(1.0) and r["matched_fraction"] == 1.0 for r in rows)


def test_estimate_needs_two_seeds():
    sweep = _truth_sweep(seeds_at=())
    with pytest.raises(InputError, match="two init seeds"):
        estimate(sweep)
    assert heuristics(sweep)["consensus"] == []


def test_count_that_still_moves_late_in_training_is_not_stable():
    sweep = _truth_sweep()
    assert estimate(sweep)["stable"] is True
    # Pretend that at 80% of training the seeds at the counting size shared only 10 of the 20 features.
    for run in sweep.select(dict_size=80):
        sweep._directions[(run["run_id"], True)] = sweep.live_directions(run)[:10]
    result = estimate(sweep)
    assert result["n_features"] == 20 and result["stable"] is False
    assert "at 80% of training it was 10" in result["signals"][0]["note"]


def test_a_count_still_growing_with_size_is_a_lower_bound():
    # 20 true features; at 40 latents (room for 20) both seeds learned only the first 10 of them, at 80 all 20:
    # the count doubled between the two sizes trained with two seeds, so it has not settled with size.
    sweep = _truth_sweep()
    g = torch.Generator().manual_seed(1)
    for run in sweep.select(dict_size=40):
        junk = torch.nn.functional.normalize(torch.randn(6, 16, generator=g), dim=1)
        sweep._directions[(run["run_id"], False)] = torch.cat([sweep.live_directions(run)[:10], junk])
    result = estimate(sweep)
    assert result["n_features"] == 20 and result["lower_bound"] is True and result["stable"] is False
    assert "it grew from 10 at 40 latents to 20 at 80" in result["summary"]
    # The same when the seeds agree better at the smaller size (each seed's 80-latent dictionary gets its own junk):
    # the count is still read at the largest size with room, 80 latents.
    for run in sweep.select(dict_size=80):
        junk = torch.nn.functional.normalize(torch.randn(12, 16, generator=g), dim=1)
        sweep._directions[(run["run_id"], False)] = torch.cat([sweep.live_directions(run), junk])
    for run in sweep.select(dict_size=40):
        sweep._directions[(run["run_id"], False)] = sweep.live_directions(run)[:10]
    result = estimate(sweep)
    assert "at 80 latents" in result["signals"][0]["note"] and result["lower_bound"] is True
    assert "it grew from 10 at 40 latents to 20 at 80" in result["summary"]
    # 15% growth is within the tolerance: 17 shared at 40 latents, 20 at 80 (20 <= 1.15 x 17 = 19.55 is false: grows);
    # 18 shared (20 <= 20.7): settled.
    for shared, grows in ((17, True), (18, False)):
        sweep = _truth_sweep()
        for run in sweep.select(dict_size=40):
            sweep._directions[(run["run_id"], False)] = sweep.live_directions(run)[:shared]
        assert estimate(sweep)["lower_bound"] is grows


def test_a_count_that_grew_from_a_size_without_room_is_unconfirmed_not_a_lower_bound():
    # 30 true features, sizes 40 and 80 with two seeds: at 40 latents the seeds share 24 (no room: 2 x 24 > 40), at 80
    # all 30 (room). 30 > 1.15 x 24: the count grew with size, but 40 latents were too few to show all the features,
    # so the count is not stable and not called a lower bound.
    sweep = _truth_sweep(n_true=30)
    for run in sweep.select(dict_size=40):
        sweep._directions[(run["run_id"], False)] = sweep.live_directions(run)[:24]
    result = estimate(sweep)
    assert result["n_features"] == 30 and result["stable"] is False and result["lower_bound"] is False
    assert "count not settled with size: it grew from 24 at 40 latents to 30 at 80" in result["summary"]


def test_seeds_that_share_nothing_give_no_stable_count():
    # Two seeds whose dictionaries hold only their own random directions (undertrained): a count of 0 at every size,
    # consistent with itself, must not be called stable.
    sweep = _truth_sweep()
    g = torch.Generator().manual_seed(2)
    for run in sweep.runs:
        sweep._directions[(run["run_id"], False)] = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=1)
    result = estimate(sweep)
    assert result["n_features"] == 0 and result["stable"] is False
    assert "the two seeds share no feature" in result["summary"]


def test_a_count_without_room_is_a_lower_bound():
    # 20 true features, but the largest dictionaries (the ones with two seeds) have only 30 latents: 2 x 20 > 30.
    sweep = _truth_sweep(sizes=(10, 20, 30), seeds_at=(30,))
    result = estimate(sweep)
    assert result["n_features"] == 20 and result["lower_bound"] is True and result["stable"] is False
    assert "count is a lower bound" in result["summary"]
    assert _truth_sweep() and estimate(_truth_sweep())["lower_bound"] is False
