"""SynthSAEBench's scores in saekit: MCC, uniqueness, latents as feature detectors, shrinkage; hand-computed cases."""

from __future__ import annotations

import pytest
import torch

from saekit.errors import InputError
from saekit.metrics.counting import fire_counts
from saekit.metrics.detection import (
    DetectionCounts,
    best_features,
    detection_scores,
    hungarian_matching,
    mcc,
    uniqueness,
)
from saekit.metrics.reconstruction import shrinkage
from saekit.metrics.window import WindowStats


def _t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


TRUTH_2D = _t([[1, 0], [0, 1]])
DICT_2D = _t([[1, 0], [1, 0], [0.6, 0.8]])

# Four samples of two true features and three latents (DICT_2D: latents 0 and 1 best-match feature 0, latent 2
# feature 1). Feature 0 is on in samples 0, 1; feature 1 in samples 1, 2.
CODES = _t([[1, 0], [1, 1], [0, 1], [0, 0]])
LATENTS = _t([[1, 0, 0], [0, 2, 1], [0, 0, 0], [3, 0, 1]])


# -- MCC and uniqueness ---------------------------------------------------------------------------------------------


def test_mcc_is_a_one_to_one_matching_not_the_greedy_best():
    # |cos| of truth rows with dictionary rows [0.8, 0.6] and [1, 0]: feature 0 -> (0.8, 1), feature 1 -> (0.6, 0).
    # Greedy would give feature 0 the latent of cosine 1 and leave 0 for feature 1 (mean 0.5); the matching that
    # maximises the total pairs feature 0 with latent 1 (1) and feature 1 with latent 0 (0.6): mean 0.8.
    dictionary = _t([[0.8, 0.6], [1, 0]])
    assert mcc(dictionary, TRUTH_2D) == pytest.approx(0.8, abs=1e-12)
    matching = hungarian_matching(dictionary, TRUTH_2D)
    assert matching.latent_of(2).tolist() == [1, 0]


def test_mcc_uses_absolute_cosines():
    # dictionary [-1, 0] and [0.6, 0.8]: |cos| pairs feature 0 with latent 0 (1) and feature 1 with latent 1 (0.8):
    # mean 0.9. (With signed cosines the best total would be 0.6 + 0 = 0.6, mean 0.3.)
    assert mcc(_t([[-1, 0], [0.6, 0.8]]), TRUTH_2D) == pytest.approx(0.9, abs=1e-12)


def test_mcc_averages_over_the_matched_pairs_when_the_dictionary_is_smaller():
    # one latent [0.6, 0.8]: min(G, m) = 1 pair, feature 1 with cosine 0.8; the unmatched feature 0 is not averaged in.
    assert mcc(_t([[0.6, 0.8]]), TRUTH_2D) == pytest.approx(0.8, abs=1e-12)
    assert hungarian_matching(_t([[0.6, 0.8]]), TRUTH_2D).latent_of(2).tolist() == [-1, 0]


def test_mcc_does_not_depend_on_row_norms():
    # cosines only: scaling dictionary rows changes nothing (DICT_2D: pairs (f0, l0) = 1 and (f1, l2) = 0.8, mean 0.9)
    assert mcc(DICT_2D * _t([[3], [0.5], [7]]), TRUTH_2D) == pytest.approx(0.9, abs=1e-12)


def test_uniqueness_and_best_features():
    # DICT_2D: latents 0, 1 best-match feature 0 (cos 1), latent 2 feature 1 (cos 0.8): 2 distinct features / 3 latents.
    best, cos = best_features(DICT_2D, TRUTH_2D)
    assert best.tolist() == [0, 0, 1]
    assert cos.tolist() == pytest.approx([1, 1, 0.8])
    assert uniqueness(DICT_2D, TRUTH_2D) == pytest.approx(2 / 3)
    # the best match is by |cos|, and the signed cosine is kept: [-1, 0] best-matches feature 0 with cosine -1
    best, cos = best_features(_t([[-1, 0]]), TRUTH_2D)
    assert (best.tolist(), cos.tolist()) == ([0], [-1.0])


@pytest.mark.parametrize(
    "dictionary, truth, message",
    [
        (_t([[1, 0, 0]]), TRUTH_2D, "width"),
        (_t([[float("nan"), 0]]), TRUTH_2D, "NaN"),
        (torch.zeros(0, 2), TRUTH_2D, "non-empty"),
        (DICT_2D, torch.ones(2), "non-empty"),
    ],
)
def test_bad_directions_raise_input_error(dictionary, truth, message):
    with pytest.raises(InputError, match=message):
        mcc(dictionary, truth)


# -- latents as detectors -------------------------------------------------------------------------------------------


def test_detection_scores_hand_computed():
    # Counted from CODES and LATENTS by hand:
    # latent 0 (feature 0): fires in 0, 3; feature on in 0, 1 -> TP 1, FP 1, FN 1, TN 1: P = R = F1 = 0.5, accuracy 0.5
    # latent 1 (feature 0): fires in 1          -> TP 1, FP 0, FN 1, TN 2: P 1, R 0.5, F1 2/3, accuracy 0.75
    # latent 2 (feature 1): fires in 1, 3; feature on in 1, 2 -> TP 1, FP 1, FN 1, TN 1: all 0.5
    scores = detection_scores(LATENTS, CODES, DICT_2D, TRUTH_2D)
    assert scores.precision[0].tolist() == pytest.approx([0.5, 1.0, 0.5])
    assert scores.recall[0].tolist() == pytest.approx([0.5, 0.5, 0.5])
    assert scores.f1[0].tolist() == pytest.approx([0.5, 2 / 3, 0.5])
    assert scores.accuracy[0].tolist() == pytest.approx([0.5, 0.75, 0.5])
    means = {k: v.item() for k, v in scores.means().items()}
    # means over the 3 latents: precision 2/3, recall 1/2, F1 (0.5 + 2/3 + 0.5)/3 = 5/9, accuracy 1.75/3
    assert means == pytest.approx({"precision": 2 / 3, "recall": 0.5, "f1": 5 / 9, "accuracy": 1.75 / 3})


def test_a_latent_that_never_fires_scores_zero_and_counts_in_the_means():
    # a 4th latent, direction [0, 1], silent: precision 0/0 -> 0, recall 0/2 = 0, F1 0; the mean precision becomes
    # (0.5 + 1 + 0.5 + 0) / 4 = 0.5
    scores = detection_scores(torch.cat([LATENTS, torch.zeros(4, 1)], 1), CODES, torch.cat([DICT_2D, _t([[0, 1]])]), TRUTH_2D)
    assert (scores.precision[0, 3].item(), scores.recall[0, 3].item(), scores.f1[0, 3].item()) == (0, 0, 0)
    assert scores.means()["precision"].item() == pytest.approx(0.5)


def test_detection_counts_streamed_over_batches_equal_one_batch():
    best, _ = best_features(DICT_2D, TRUTH_2D)
    counts = DetectionCounts(torch.stack([best, best]), 2)  # two members, the second with latents doubled
    stacked = torch.stack([LATENTS, 2 * LATENTS])
    counts.update(stacked[:, :3], CODES[:3])
    counts.update(stacked[:, 3:], CODES[3:])
    whole = detection_scores(LATENTS, CODES, DICT_2D, TRUTH_2D)
    for k in range(2):
        scores = counts.scores(fire_counts(stacked))
        assert torch.equal(scores.f1[k], whole.f1[0])
        assert torch.equal(scores.accuracy[k], whole.accuracy[0])


def test_detection_counts_refuse_bad_shapes():
    counts = DetectionCounts(torch.zeros(1, 3, dtype=torch.long), 2)
    with pytest.raises(InputError, match="latents"):
        counts.update(LATENTS, CODES)  # (B, m), not (K, B, m)
    with pytest.raises(InputError, match="true codes"):
        counts.update(LATENTS[None], CODES[:, :1])
    with pytest.raises(InputError, match="NaN"):
        counts.update(LATENTS[None], CODES * float("nan"))
    with pytest.raises(InputError, match="feature indices"):
        DetectionCounts(torch.full((1, 3), 5), 2)


# -- shrinkage ------------------------------------------------------------------------------------------------------


def test_shrinkage_hand_computed_skips_zero_inputs():
    # ||x|| = 5, 0, 1 and ||x_hat|| = 2.5, (skipped: zero input), 2: ratios 0.5 and 2, mean 1.25
    x = _t([[3, 4], [0, 0], [1, 0]])
    x_hat = _t([[1.5, 2], [1, 1], [0, 2]])
    assert shrinkage(x, x_hat) == pytest.approx(1.25)
    assert shrinkage(torch.zeros(2, 2), torch.ones(2, 2)) == 0.0


def test_window_shrinkage_equals_the_batch_function():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 4, generator=g)
    x[3] = 0  # a zero input, skipped
    x_hat = torch.randn(2, 10, 4, generator=g)
    stats = WindowStats(2, 4, 3)
    for rows in (slice(0, 6), slice(6, 10)):
        stats.update(x[rows], x_hat[:, rows], torch.ones(2, x[rows].shape[0], 3))
    for k in range(2):
        assert stats.shrinkage()[k].item() == pytest.approx(shrinkage(x, x_hat[k]), rel=1e-12)


# -- exact counting -------------------------------------------------------------------------------------------------


def test_column_counts_are_exact_also_in_chunks(monkeypatch):
    from saekit.metrics import counting

    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(2, 37, 5, generator=g) < 0.4).float()
    want = (mask != 0).sum(dim=1)  # the plain count over rows
    assert torch.equal(counting.column_counts(mask), want)
    monkeypatch.setattr(counting, "EXACT_ROWS", 8)  # 37 rows in chunks of 8, 8, 8, 8, 5
    assert torch.equal(counting.column_counts(mask), want)


def test_detection_and_fire_counts_in_row_chunks_equal_one_chunk(monkeypatch):
    from saekit.metrics import counting

    whole = detection_scores(LATENTS, CODES, DICT_2D, TRUTH_2D)
    codes = torch.stack([LATENTS, 0 * LATENTS])
    monkeypatch.setattr(counting, "CHUNK_ELEMENTS", 4)  # width 3 + 2: one row per chunk
    assert [(r.start, r.stop) for r in counting.row_chunks(4, 5)] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert torch.equal(detection_scores(LATENTS, CODES, DICT_2D, TRUTH_2D).f1, whole.f1)
    # latent fire counts: LATENTS fire 2, 1, 2 times; the all-zero member never
    assert counting.fire_counts(codes).tolist() == [[2, 1, 2], [0, 0, 0]]


@pytest.mark.parametrize("chunk", [1, 2, 100])
def test_groups_list_every_item_of_each_queried_group(monkeypatch, chunk):
    from saekit.metrics import counting

    monkeypatch.setattr(counting, "CHUNK_ELEMENTS", chunk)
    groups = counting.Groups(torch.tensor([2, 0, 2, 1, 2]), 3)  # group 0: item 1; group 1: item 3; group 2: items 0, 2, 4
    pairs = [(int(q), int(i)) for pos, items in groups.members(torch.tensor([2, 1, 2, 0])) for q, i in zip(pos, items)]
    # query 0 (group 2) -> 0, 2, 4; query 1 (group 1) -> 3; query 2 (group 2) -> 0, 2, 4; query 3 (group 0) -> 1
    assert pairs == [(0, 0), (0, 2), (0, 4), (1, 3), (2, 0), (2, 2), (2, 4), (3, 1)]
    assert list(groups.members(torch.tensor([], dtype=torch.long))) == []
