"""Absorption and splitting against known hierarchical features; the truth metrics in the final evaluation.

Every expected number is counted by hand from the tiny cases in the comments."""

from __future__ import annotations

import math

import pytest
import torch

from saekit.errors import InputError
from saekit.metrics.absorption import AbsorptionCounts, absorbed_fraction, latents_per_feature, split_count
from saekit.metrics.counting import fire_counts
from saekit.metrics.detection import DetectionCounts, best_features
from saekit.metrics.truth_window import TruthWindow
from saekit.sae import ReluSAE
from saekit.sources import Stream, ToySource
from saekit.train.evaluate import evaluate_window

EYE3 = torch.eye(3)
PARENT = torch.tensor([-1, 0, 0])  # feature 0 is the parent of features 1 and 2

# Five samples of the hierarchy: a child is only on with its parent.
CODES = torch.tensor([[1.0, 0, 0], [1, 1, 0], [1, 0, 1], [0, 0, 0], [0.5, 1, 0]])


def absorbing_sae() -> ReluSAE:
    """An SAE on x = codes (truth = identity) whose child latent 1 has absorbed its parent: latent 0 = ReLU(x0 - 2 x1)
    fires for the parent only when child 1 is off; latent 1 = ReLU(x1) decodes to 0.6 f0 + 0.8 f1, so it
    reconstructs part of the parent too; latent 2 = ReLU(x2) is child 2, which absorbed nothing."""
    sae = ReluSAE(3, 3, seeds=[0], l1=[0.1])
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0, 0], [-2, 1, 0], [0, 0, 1]])[None])  # (1, d, m): column j is latent j
        sae.b_enc.zero_()
        sae.W_dec.copy_(torch.tensor([[1.0, 0, 0], [0.6, 0.8, 0], [0, 0, 1]])[None])
    return sae


def test_constructed_absorbing_sae_hand_computed():
    # Latents per sample (l0 = ReLU(x0 - 2 x1), l1 = x1, l2 = x2):
    #   [1,0,0] -> l0 = 1            parent on, its latent fires          : not absorbed
    #   [1,1,0] -> l0 = 0, l1 = 1    parent on, silent, child 1's fires    : absorbed
    #   [1,0,1] -> l0 = 1, l2 = 1    parent on, its latent fires          : not absorbed
    #   [0,0,0] -> nothing           parent off                           : not counted
    #   [.5,1,0]-> l0 = 0, l1 = 1    parent on, silent, child 1's fires    : absorbed
    # Matching: |cos| of f0 with (l0, l1, l2) = (1, 0.6, 0), f1 = (0, 0.8, 0), f2 = (0, 0, 1), so the best total
    # pairs f0-l0, f1-l1, f2-l2. Parent 0 is on 4 times, absorbed 2 times: 0.5.
    sae = absorbing_sae()
    latents = sae.encode(CODES)[0]
    result = absorbed_fraction(latents, CODES, PARENT, sae.directions()[0], EYE3)
    assert result.parents.tolist() == [0]
    assert result.fractions.tolist() == [0.5] and result.mean == 0.5


def test_an_sae_with_a_latent_per_feature_absorbs_nothing():
    # latents = the codes themselves: the parent's latent fires whenever the parent is on.
    assert absorbed_fraction(CODES, CODES, PARENT, EYE3, EYE3).mean == 0.0


def test_parents_never_on_or_unmatched_have_no_value():
    # Features 0 -> 1 and 2 -> 3 (G = 4, identity truth); parent 2 is never on in these samples: NaN, left out of the mean.
    parent = torch.tensor([-1, 0, -1, 2])
    codes = torch.tensor([[1.0, 1, 0, 0], [1, 0, 0, 0]])
    latents = torch.tensor([[0.0, 1, 0, 0], [1, 0, 0, 0]])  # sample 0: parent 0's latent silent, child 1's fires
    result = absorbed_fraction(latents, codes, parent, torch.eye(4), torch.eye(4))
    assert result.fractions[0].item() == 0.5 and math.isnan(result.fractions[1].item()) and result.mean == 0.5
    # latent_of says parent 0 has no latent (as when m < G): no value anywhere, so no mean
    counts = AbsorptionCounts(parent, torch.tensor([[-1, 1, 2, 3]]))
    counts.update(latents[None], codes)
    assert counts.fractions()[0].isnan().all() and counts.means() == [None]


def test_absorption_counts_streamed_equal_one_batch():
    sae = absorbing_sae()
    latents = sae.encode(CODES)  # (1, 5, 3)
    counts = AbsorptionCounts(PARENT, torch.tensor([[0, 1, 2]]))
    counts.update(latents[:, :2], CODES[:2])
    counts.update(latents[:, 2:], CODES[2:])
    assert counts.means() == [0.5]


def test_absorption_in_small_chunks_equals_one_chunk(monkeypatch):
    from saekit.metrics import counting

    monkeypatch.setattr(counting, "CHUNK_ELEMENTS", 1)  # one (sample, child) pair at a time
    sae = absorbing_sae()
    assert absorbed_fraction(sae.encode(CODES)[0], CODES, PARENT, sae.directions()[0], EYE3).mean == 0.5


@pytest.mark.parametrize(
    "parent, message",
    [(torch.tensor([-1, 0]), r"\(3,\)"), (torch.tensor([-1, 0, 3]), "outside"), (torch.tensor([-1, 1, 0]), "own parent"),
     (torch.tensor([-1.0, 0, 0]), "integer")],
)  # fmt: skip
def test_bad_parent_raises_input_error(parent, message):
    with pytest.raises(InputError, match=message):
        AbsorptionCounts(parent, torch.tensor([[0, 1, 2]]))


# -- splitting ------------------------------------------------------------------------------------------------------

# Truth: the two axes of the plane. Latents 0 = [1, 0] and 1 = [0.95, 0.312] (cosine 0.95 with feature 0) both
# track feature 0; latent 2 = [0, 1] tracks feature 1; latent 3 = [0.3, 0.954] (cosine 0.954 with feature 1)
# fires mostly while feature 1 is off.
SPLIT_TRUTH = torch.eye(2)
SPLIT_DICT = torch.tensor([[1.0, 0], [0.95, 0.312], [0, 1], [0.3, 0.954]])
SPLIT_CODES = torch.tensor([[1.0, 0], [1, 1], [0, 1], [0, 0]])
SPLIT_LATENTS = torch.tensor([[1.0, 0, 0, 1], [1, 1, 1, 0], [0, 0, 1, 1], [0, 0, 0, 1]])


def test_split_count_hand_computed():
    # precision: latent 0 fires in samples 0, 1 (feature 0 on in both): 1; latent 1 in sample 1: 1; latent 2 in 1, 2
    # (feature 1 on in both): 1; latent 3 in 0, 2, 3, feature 1 on only in 2: 1/3 < 0.5.
    # Feature 0 has two representing latents (0, 1), feature 1 one (latent 2): split count 1.
    assert split_count(SPLIT_LATENTS, SPLIT_CODES, SPLIT_DICT, SPLIT_TRUTH) == 1
    # latent 3 firing only in sample 2 has precision 1: feature 1 is split too
    latents = SPLIT_LATENTS.clone()
    latents[[0, 3], 3] = 0
    assert split_count(latents, SPLIT_CODES, SPLIT_DICT, SPLIT_TRUTH) == 2


def test_split_needs_the_cosine_threshold():
    # latent 1 turned to [0.8, 0.6] (cosine 0.8 < 0.9) no longer represents feature 0: nothing is split
    dictionary = SPLIT_DICT.clone()
    dictionary[1] = torch.tensor([0.8, 0.6])
    assert split_count(SPLIT_LATENTS, SPLIT_CODES, dictionary, SPLIT_TRUTH) == 0


def test_latents_per_feature_counts():
    best, cos = best_features(SPLIT_DICT, SPLIT_TRUTH)
    counts = DetectionCounts(best[None], 2)
    counts.update(SPLIT_LATENTS[None], SPLIT_CODES)
    # as in test_split_count_hand_computed: feature 0 <- latents 0, 1; feature 1 <- latent 2 (latent 3's precision 1/3)
    assert latents_per_feature(best[None], cos[None], counts.scores(fire_counts(SPLIT_LATENTS[None])).precision, 2).tolist() == [[2, 1]]


# -- in the final evaluation ----------------------------------------------------------------------------------------


class _HierarchySource:
    """A fake hierarchical source: x = codes on the identity truth of d = 3, batch t of a stream cycling through CODES."""

    d = 3
    ground_truth = EYE3
    parent = PARENT

    def batch_with_codes(self, batch_size: int, step: int, stream: int = Stream.TRAIN) -> tuple[torch.Tensor, torch.Tensor]:
        rows = (torch.arange(batch_size) + step * batch_size) % len(CODES)
        return CODES[rows], CODES[rows]

    def batch(self, batch_size: int, step: int, stream: int = Stream.TRAIN) -> torch.Tensor:
        return self.batch_with_codes(batch_size, step, stream)[0]


def test_evaluate_window_adds_the_truth_metrics_and_absorption():
    # 10 samples = CODES twice: the absorbing SAE's parent absorbed on 4 of its 8 firings (0.5, as above).
    rows, _ = evaluate_window(absorbing_sae(), _HierarchySource(), n_samples=10, batch_size=4)
    (row,) = rows
    assert row["absorption"] == 0.5 and row["split"] == 0
    assert row["mcc"] == pytest.approx((1 + 0.8 + 1) / 3)  # the matched |cosines| f0-l0, f1-l1, f2-l2
    assert row["uniqueness"] == 1.0  # best features of l0, l1, l2: f0, f1 (0.8 > 0.6), f2
    # per CODES pass: latent 0 fires on samples 0, 2 (f0 on in 0, 1, 2, 4): precision 1, recall 1/2; latent 1 on
    # samples 1, 4 = f1's firings: 1, 1; latent 2 on sample 2 = f2's only firing: 1, 1.
    assert (row["precision"], row["recall"]) == pytest.approx((1.0, (0.5 + 1 + 1) / 3))
    assert row["f1"] == pytest.approx((2 / 3 + 1 + 1) / 3)  # latent 0: 2 x 1 x 0.5 / 1.5 = 2/3


def test_evaluate_window_without_parents_or_codes():
    toy = ToySource(d=8, n_features=12, mean_active=2, seed=0)
    sae = ReluSAE(8, 16, seeds=[0, 1], l1=[0.1, 0.2])
    rows, _ = evaluate_window(sae, toy, n_samples=300, batch_size=128)
    for row in rows:
        assert {"mcc", "uniqueness", "precision", "recall", "f1", "split", "shrinkage"} <= set(row) and "absorption" not in row
    fixed = ToySource(d=8, n_features=12, mean_active=2, seed=0, n_samples=500)  # a fixed dataset keeps no codes
    rows, _ = evaluate_window(sae, fixed, n_samples=300, batch_size=128)
    assert "mcc" in rows[0] and "precision" not in rows[0] and "split" not in rows[0]


def test_truth_window_skips_a_member_with_nan_directions():
    directions = torch.stack([EYE3, torch.full((3, 3), float("nan"))])
    window = TruthWindow(directions, EYE3, PARENT)
    window.update(torch.stack([CODES, CODES]), CODES)
    good, bad = window.rows(fire_counts(torch.stack([CODES, CODES])))
    assert bad == {} and good["absorption"] == 0.0 and good["mcc"] == 1.0
