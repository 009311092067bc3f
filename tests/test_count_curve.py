"""The count curve (saekit.analysis.curve) and the knob choices of the search (saekit.count.knob), on hand-made
numbers."""

from __future__ import annotations

import math

import pytest

from saekit.analysis.curve import CurvePoint, describe_curve, growth_exponent, point_settled, saturated, saturating_fit
from saekit.archspec import ARCH_SPECS
from saekit.count.knob import (
    best_value,
    extend_grid,
    mean_l0,
    neighbours,
    probe_grid,
    size_power,
    tradeoff,
    value_at_size,
    value_for_l0,
)


def point(
    size: int,
    count: int,
    low: int | None = None,
    high: int | None = None,
    late: int | None = None,
    seconds: float = 10.0,
    n_saes: int = 4,
) -> CurvePoint:
    """A curve point; by default trained with both neighbouring knob values (4 SAEs)."""
    return CurvePoint(size, count, count if low is None else low, count if high is None else high, 0.3, late, seconds, n_saes)


def test_a_point_has_room_when_its_size_is_at_least_twice_its_count():
    assert point(1024, 512).roomy
    assert not point(1024, 513).roomy
    assert not point(1024, 0).roomy


def test_saturating_fit_recovers_the_curve_it_was_made_from():
    # counts = 500 m / (m + 200) exactly: the fit must give N = 500, h = 200 (up to its log grid's spacing)
    sizes = [128, 256, 512, 1024, 2048, 4096]
    fit = saturating_fit(sizes, [500 * m / (m + 200) for m in sizes])
    assert fit["n_features"] == pytest.approx(500, rel=0.01)
    assert fit["half_size"] == pytest.approx(200, rel=0.03)
    assert fit["rms_error"] < 2
    assert saturating_fit([128], [100]) is None


def test_growth_exponent_is_the_log_log_slope():
    # 100 -> 200 when m doubles: beta = 1; 100 -> 141 when m doubles: beta = log2(1.41) = 0.496
    assert growth_exponent(point(256, 100), point(512, 200)) == pytest.approx(1.0)
    assert growth_exponent(point(256, 100), point(512, 141)) == pytest.approx(math.log2(1.41))
    assert growth_exponent(point(256, 0), point(512, 141)) is None


def test_saturated_needs_two_roomy_sizes_that_agree():
    assert saturated([point(1024, 500), point(2048, 520)])  # 20 apart, within 15% of 520
    assert not saturated([point(1024, 400), point(2048, 520)])  # 120 apart > 78
    assert not saturated([point(512, 400), point(1024, 420)])  # 400 has no room in 512
    assert not saturated([point(2048, 520)])


def test_point_settled_checks_the_knob_neighbours_and_the_late_count():
    assert point_settled(point(1024, 500, 480, 520, late=490))[0]
    ok, why = point_settled(point(1024, 500, 300, 520))  # range 220 > 2 x 15% of 500
    assert not ok and "neighbouring" in why[0]
    ok, why = point_settled(point(1024, 500, late=400))  # moved 100 > 75
    assert not ok and "last 20%" in why[0]
    ok, why = point_settled(point(1024, 0))
    assert not ok and "share no feature" in why[0]


def test_describe_curve_says_saturated_with_the_range_of_the_last_two_sizes():
    verdict = describe_curve([point(512, 300), point(1024, 500, 490, 505), point(2048, 510, 500, 530)])
    assert verdict["state"] == "saturated"
    assert (verdict["n_features"], verdict["low"], verdict["high"], verdict["dict_size"]) == (510, 490, 530, 2048)
    assert verdict["sentence"].startswith("saturated at 510 features (490-530)")


def test_describe_curve_gives_a_lower_bound_the_exponent_and_the_next_size_while_growing():
    verdict = describe_curve([point(512, 200, seconds=30), point(1024, 400, seconds=60)])
    assert verdict["state"] == "growing"
    assert verdict["beta"] == pytest.approx(1.0)
    assert (verdict["next_size"], verdict["next_seconds"]) == (2048, 120)
    assert "still growing as m^1.00 at m = 1024" in verdict["sentence"]
    assert "lower bound" in verdict["sentence"] and "train 2048 latents next, about 2 min" in verdict["sentence"]
    assert describe_curve([])["state"] == "empty"


def test_the_next_sizes_time_scales_with_the_saes_it_trains():
    # 4 SAEs of 1024 latents took 60 s; 2 SAEs of 2048 latents are as many latents: 60 s, not 120 s.
    curve = [point(512, 200, seconds=30), point(1024, 400, seconds=60, n_saes=4)]
    assert describe_curve(curve, next_saes=2)["next_seconds"] == pytest.approx(60)
    assert describe_curve(curve, next_saes=4)["next_seconds"] == pytest.approx(120)
    assert describe_curve(curve)["next_seconds"] == pytest.approx(120)


def test_a_saturated_curve_needs_one_of_its_two_sizes_checked_at_neighbouring_knob_values():
    assert describe_curve([point(1024, 500, n_saes=2), point(2048, 510, n_saes=4)])["state"] == "saturated"
    assert describe_curve([point(1024, 500, n_saes=4), point(2048, 510, n_saes=2)])["state"] == "saturated"
    verdict = describe_curve([point(1024, 500, n_saes=2), point(2048, 510, n_saes=2)])
    assert verdict["state"] == "growing" and any("neighbouring knob values" in r for r in verdict["reasons"])


def test_a_curve_that_levels_off_while_its_last_count_still_moved_late_is_still_learning():
    # 380 -> 510 and 460 -> 510 in the last 20% of training: 25% and 9.8%, both more than LEARNING_TOLERANCE (3%)
    for late in (380, 460):
        verdict = describe_curve([point(1024, 500), point(2048, 510, late=late)])
        assert verdict["state"] == "learning" and verdict["n_features"] == 510
        assert verdict["reasons"] == [f"at 2048 latents the count moved from {late} to 510 in the last 20% of training"]
        assert "still learning" in verdict["sentence"] and "train 2048 latents on twice the samples" in verdict["sentence"]
        assert verdict["next_size"] == 2048 and verdict["next_seconds"] == 20.0  # the point's 10 s, doubled
    # 500 -> 510 is 2.0%: trained to the end
    assert describe_curve([point(1024, 500), point(2048, 510, late=500)])["state"] == "saturated"


def test_a_size_that_moved_late_before_the_last_one_keeps_the_curve_from_saturating():
    verdict = describe_curve([point(1024, 500, late=380), point(2048, 510)])  # 380 -> 500: 24%, over TOLERANCE
    assert verdict["state"] == "growing"
    assert any("last 20%" in r for r in verdict["reasons"])


def test_still_learning_compares_the_centre_pair_with_itself():
    assert CurvePoint(2048, 500, 480, 520, 0.3, count_late=440, centre=480).still_learning  # 440 -> 480: 8.3%
    assert CurvePoint(2048, 500, 480, 520, 0.3, count_late=460, centre=480).still_learning  # 4.2%
    assert not CurvePoint(2048, 500, 480, 520, 0.3, count_late=470, centre=480).still_learning  # 2.1%
    assert not CurvePoint(2048, 500, 480, 520, 0.3).still_learning  # no late count


def test_only_the_l1_on_the_mean_scales_with_size():
    relu, topk = ARCH_SPECS["relu"], ARCH_SPECS["topk"]
    assert size_power("relu", "mean") == 1 and size_power("relu", "sum") == 0 and size_power("jumprelu") == 0
    assert value_at_size(relu, 0.3, 1, 1024, 2048) == pytest.approx(0.6)
    assert value_at_size(relu, 0.3, 0, 1024, 2048) == pytest.approx(0.3)
    assert value_at_size(topk, 16, 1, 1024, 2048) == 16


def test_probe_grids():
    relu, topk = ARCH_SPECS["relu"], ARCH_SPECS["topk"]
    assert probe_grid(relu, 256, 256, 1.0) == [1 / 16, 1 / 8, 1 / 4, 1 / 2, 1, 2, 4, 8]
    assert probe_grid(topk, 256, 256, 32) == [2, 4, 8, 16, 32, 64, 128]  # up to min(d, m/2) = 128
    assert extend_grid(relu, [1, 2, 4], 4, 256) == [8, 16, 32, 64]
    assert extend_grid(relu, [1, 2, 4], 1, 256) == [0.5, 0.25, 0.125, 0.0625]
    assert extend_grid(relu, [1, 2, 4], 2, 256) == []
    assert extend_grid(topk, [2, 4, 8], 8, 64) == [16, 32]
    assert extend_grid(topk, [2, 4, 8], 2, 64) == [1]


def rows(*triples: tuple[float, float, float], arch: str = "relu", knob: str = "l1") -> list[dict]:
    return [{"arch": arch, knob: v, "l0": l0, "fvu": fvu} for v, l0, fvu in triples]


def test_best_value_minimises_fvu_plus_l0_over_d_among_values_that_did_not_collapse():
    # d = 100: 0.1 -> 0.05 + 0.30 = 0.35; 0.2 -> 0.10 + 0.10 = 0.20; 0.4 -> 0.30 + 0.05 = 0.35; 0.8 -> 0.9 + 0.0 (collapsed)
    table = rows((0.1, 30, 0.05), (0.2, 10, 0.10), (0.4, 5, 0.30), (0.8, 0, 0.9))
    assert tradeoff(table[1], 100) == pytest.approx(0.2)
    assert best_value(table, "l1", 100) == 0.2
    # at d = 10 the dense values cost too much (0.1 -> 3.05, 0.2 -> 1.1, 0.4 -> 0.8), and collapse (0.9) is excluded
    assert best_value(table, "l1", 10) == 0.4
    assert best_value(rows((0.1, math.nan, 0.1)), "l1", 10) is None


def test_value_for_l0_interpolates_in_log_log():
    table = rows((0.1, 40, 0.05), (0.2, 20, 0.1), (0.4, 10, 0.2))  # L0 = 4 / l1: the target 14.14 lies at l1 = 0.2 sqrt 2
    assert value_for_l0(table, "l1", 20 / math.sqrt(2), integer=False) == pytest.approx(0.2 * math.sqrt(2), rel=1e-3)
    assert value_for_l0(table, "l1", 5, integer=False) == pytest.approx(0.8, rel=1e-3)  # one step past the edge
    assert value_for_l0(table, "l1", 0.1, integer=False) == pytest.approx(1.6, rel=1e-3)  # capped two steps past
    assert value_for_l0(table, "l1", 12.4, integer=True) == 12
    assert mean_l0(table, "l1", 0.2) == 20


def test_neighbours():
    assert neighbours(ARCH_SPECS["relu"], 0.3, 1024) == (0.15, 0.6)
    assert neighbours(ARCH_SPECS["topk"], 16, 1024) == (11, 24)
    assert neighbours(ARCH_SPECS["topk"], 2, 1024) == (1, 3)


def test_best_value_takes_the_sparsest_value_near_the_minimum():
    # d = 100: 0.1 -> 0.10 + 0.10 = 0.20 (the minimum); 0.2 -> 0.15 + 0.06 = 0.21 (within 10%); 0.4 -> 0.25 + 0.04 = 0.29
    table = rows((0.1, 10, 0.10), (0.2, 6, 0.15), (0.4, 4, 0.25))
    assert best_value(table, "l1", 100) == 0.2
    # for k the sparsest is the smallest: k=8 -> 0.10 + 0.08 = 0.18; k=4 -> 0.15 + 0.04 = 0.19 (within 10%); k=2 -> 0.42
    assert best_value(rows((8, 8, 0.10), (4, 4, 0.15), (2, 2, 0.40), arch="topk", knob="k"), "k", 100) == 4


def test_a_count_that_falls_with_size_is_not_called_growing():
    # 164 at 256 latents, then 114 at 512: beta = log2(114 / 164) = -0.52; the most counted (164) is the lower bound
    verdict = describe_curve([point(128, 106), point(256, 164), point(512, 114)])
    assert verdict["state"] == "falling" and verdict["n_features"] == 164 and verdict["dict_size"] == 256
    assert verdict["beta"] == pytest.approx(math.log2(114 / 164))
    assert verdict["sentence"].startswith("not settled: the count falls with size (114 at m = 512)")


def test_two_sizes_that_agree_below_a_larger_count_are_not_saturated():
    # 126 at 256 latents, then 60 and 62 at 512 and 1024: the last two agree and have room, but a smaller dictionary
    # counted twice as many, so 62 is not the plateau; the most counted is the lower bound
    verdict = describe_curve([point(128, 100), point(256, 126), point(512, 60, n_saes=4), point(1024, 62)])
    assert verdict["state"] == "falling" and verdict["n_features"] == 126
    assert verdict["reasons"][0] == "the count fell from 126 at 256 latents to 62 at 1024"


def test_a_small_drop_is_level_not_falling():
    # 49 -> 48 (2%, within 15%) at sizes without room for the pair check: level but not settled, not "falling"
    verdict = describe_curve([point(32, 30), point(64, 49), point(128, 48, late=30)])
    assert verdict["state"] == "growing" and "level (m^-0.03) but not settled" in verdict["sentence"]
