"""Hand-computed checks of the metric functions and of WindowStats against them."""

from __future__ import annotations

import pytest
import torch

from saekit.metrics import (
    cosine_matrix,
    dead_fraction,
    dense_fraction,
    fvu,
    l0,
    matched_cosines,
    max_cosines,
    mmcs,
    mse,
    recovered_fraction,
    sparsity_term,
)
from saekit.metrics.window import WindowStats


def _t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


TRUTH_2D = _t([[1, 0], [0, 1]])
DICT_2D = _t([[1, 0], [1, 0], [0.6, 0.8]])


# -- mmcs -----------------------------------------------------------------------------------


def test_mmcs_hand_computed_truth_direction():
    """Each true feature's best cosine with the dictionary, averaged."""
    # truth0=[1,0]: best cosine 1 (dict rows 0/1); truth1=[0,1]: best is dict row 2 [0.6,0.8] -> 0.8.
    # mean = (1 + 0.8) / 2 = 0.9
    assert mmcs(DICT_2D, TRUTH_2D) == pytest.approx(0.9, abs=1e-12)


def test_mmcs_hand_computed_other_direction():
    """Swapping the arguments averages over the dictionary rows instead."""
    # dict rows [1,0], [1,0] each best-match truth0 with cosine 1; [0.6,0.8] best-matches truth1 with 0.8.
    # mean = (1 + 1 + 0.8) / 3 = 2.8 / 3 = 0.9333...
    assert mmcs(TRUTH_2D, DICT_2D) == pytest.approx(2.8 / 3, abs=1e-12)


def test_max_cosines_per_true_feature():
    """max_cosines gives the per-truth-row values that mmcs averages."""
    # as above: truth0 -> 1, truth1 -> 0.8
    assert torch.allclose(max_cosines(DICT_2D, TRUTH_2D), _t([[1, 0.8]])[0], atol=1e-12)


def test_cosine_matrix_shape_and_values():
    """cosine_matrix(a, b)[i, j] is the cosine of a_i and b_j."""
    # rows of TRUTH_2D against rows of DICT_2D: truth0 . dict = [1, 1, 0.6]; truth1 . dict = [0, 0, 0.8]
    expected = _t([[1, 1, 0.6], [0, 0, 0.8]])
    cos = cosine_matrix(TRUTH_2D, DICT_2D)
    assert cos.shape == (2, 3)
    assert torch.allclose(cos, expected, atol=1e-12)


def test_mmcs_is_one_for_identical_dictionary():
    """A dictionary equal to the truth has every cosine 1."""
    g = torch.Generator().manual_seed(0)
    truth = torch.randn(6, 5, generator=g, dtype=torch.float64)
    # every true row matches itself with cosine 1 -> mean 1
    assert mmcs(truth, truth) == pytest.approx(1.0, abs=1e-12)


def test_mmcs_below_one_for_a_different_dictionary():
    """Sanity: a dictionary missing a direction scores below 1 (so the test above can fail)."""
    # truth1=[0,1] has cosine 0 with dict [[1,0]] -> mmcs = (1 + 0) / 2 = 0.5
    assert mmcs(_t([[1, 0]]), TRUTH_2D) == pytest.approx(0.5, abs=1e-12)


def test_mmcs_invariant_to_positive_scaling_and_row_permutation():
    """Cosines ignore row lengths and the order of the dictionary rows."""
    g = torch.Generator().manual_seed(1)
    truth = torch.randn(5, 4, generator=g, dtype=torch.float64)
    dictionary = torch.randn(7, 4, generator=g, dtype=torch.float64)
    base = mmcs(dictionary, truth)
    scales = torch.tensor([0.1, 2.0, 3.5, 1.0, 10.0, 0.5, 7.0], dtype=torch.float64)[:, None]
    perm = torch.tensor([6, 2, 0, 5, 1, 4, 3])
    # same directions, so the same best cosine per true row -> the same mean
    assert mmcs(dictionary * scales, truth) == pytest.approx(base, abs=1e-12)
    assert mmcs(dictionary[perm], truth) == pytest.approx(base, abs=1e-12)
    assert mmcs(truth, dictionary * scales) == pytest.approx(mmcs(truth, dictionary), abs=1e-12)


def test_mmcs_unnormalised_row_equals_normalised():
    """Row [3, 4] (norm 5) gives the same result as its unit version [0.6, 0.8]."""
    unnormalised = _t([[1, 0], [1, 0], [3, 4]])
    # [3,4]/5 = [0.6,0.8]: truth1's best cosine stays 0.8 -> (1 + 0.8) / 2 = 0.9
    assert mmcs(unnormalised, TRUTH_2D) == pytest.approx(0.9, abs=1e-12)
    assert mmcs(unnormalised, TRUTH_2D) == pytest.approx(mmcs(DICT_2D, TRUTH_2D), abs=1e-12)


# -- recovered_fraction / matched_cosines ---------------------------------------------------

# 0.96^2 + 0.28^2 = 0.9216 + 0.0784 = 1, so both truth rows are unit vectors.
TRUTH_3D = _t([[1, 0, 0], [0.96, 0.28, 0]])
DICT_3D = _t([[1, 0, 0], [0, 0, 1]])


def test_recovered_fraction_max():
    """Many-to-one: both true features find dict row 0."""
    # cosines truth x dict = [[1, 0], [0.96, 0]]; best per truth row: 1 and 0.96, both >= 0.9 -> 2/2 = 1.0
    assert recovered_fraction(DICT_3D, TRUTH_3D, threshold=0.9, method="max") == pytest.approx(1.0)


def test_recovered_fraction_matched():
    """One-to-one: the Hungarian matching gives dict row 0 to truth 0, leaving truth 1 with dict row 1."""
    # matchings: (t0-d0, t1-d1) total 1 + 0 = 1; (t0-d1, t1-d0) total 0 + 0.96 = 0.96. 1 > 0.96, so the first wins
    # matched cosines [1, 0]: only truth 0 is >= 0.9 -> 1/2 = 0.5
    assert recovered_fraction(DICT_3D, TRUTH_3D, threshold=0.9, method="matched") == pytest.approx(0.5)


def test_recovered_fraction_default_is_max_at_0_9():
    """Defaults are threshold 0.9 and method 'max'."""
    # as in test_recovered_fraction_max: cosines 1 and 0.96 both >= 0.9 -> 1.0
    assert recovered_fraction(DICT_3D, TRUTH_3D) == pytest.approx(1.0)


def test_recovered_fraction_threshold_is_inclusive_and_discriminating():
    """A threshold above 0.96 excludes the second true feature."""
    # best cosines 1 and 0.96; at threshold 0.97 only the first passes -> 1/2
    assert recovered_fraction(DICT_3D, TRUTH_3D, threshold=0.97, method="max") == pytest.approx(0.5)
    # at threshold 1.0 the exact match (cosine exactly 1 in float64) still counts: >= is inclusive -> 1/2
    assert recovered_fraction(DICT_3D, TRUTH_3D, threshold=1.0, method="max") == pytest.approx(0.5)


def test_recovered_fraction_unknown_method():
    """An unknown method is refused."""
    with pytest.raises(ValueError, match="unknown method"):
        recovered_fraction(DICT_3D, TRUTH_3D, method="best")


def test_matched_cosines_values():
    """matched_cosines returns the cosine of each true feature's partner."""
    # from the matching above: truth0-dict0 cosine 1, truth1-dict1 cosine 0
    got = matched_cosines(DICT_3D, TRUTH_3D)
    assert torch.allclose(got, _t([[1, 0]])[0], atol=1e-12)


def test_fewer_dictionary_rows_than_truth():
    """With m < G, unmatched true features count as not recovered in 'matched', while 'max' may reuse rows."""
    truth = _t([[1, 0, 0], [0, 1, 0], [0.96, 0.28, 0]])
    dictionary = _t([[1, 0, 0], [0, 1, 0]])
    # cosines truth x dict = [[1, 0], [0, 1], [0.96, 0.28]].
    # max: best per truth row 1, 1, 0.96 -> all >= 0.9 -> 3/3 = 1.0
    assert recovered_fraction(dictionary, truth, method="max") == pytest.approx(1.0)
    # matched: best 2-of-3 assignment is t0-d0 + t1-d1 = 2 (vs t2-d0 + t1-d1 = 1.96, t0-d0 + t2-d1 = 1.28)
    # -> matched cosines [1, 1]; truth 2 is unmatched -> 2 recovered out of G=3 = 2/3
    assert recovered_fraction(dictionary, truth, method="matched") == pytest.approx(2 / 3)
    cos = matched_cosines(dictionary, truth)
    assert cos.shape == (2,)  # min(G=3, m=2)
    assert torch.allclose(cos, _t([[1, 1]])[0], atol=1e-12)


# -- reconstruction and sparsity ------------------------------------------------------------


def test_l0():
    """Mean number of non-zero latents per sample."""
    # row 0 has 2 non-zeros (1, 2), row 1 has 0 -> (2 + 0) / 2 = 1.0
    assert l0(_t([[0, 1, 2], [0, 0, 0]])) == pytest.approx(1.0)


def test_l0_counts_negative_codes():
    """Any non-zero counts, not only positive ones."""
    # row 0: -1 and 2 non-zero -> 2; row 1: 3 -> 1; mean (2 + 1) / 2 = 1.5
    assert l0(_t([[-1, 0, 2], [0, 0, 3]])) == pytest.approx(1.5)


def test_dead_fraction():
    """Fraction of latents with zero fire count."""
    # counts [0, 3, 0, 1]: latents 0 and 2 never fired -> 2/4 = 0.5
    assert dead_fraction(torch.tensor([0, 3, 0, 1])) == pytest.approx(0.5)


def test_dense_fraction():
    """Fraction of latents firing on more than `threshold` of the samples."""
    # counts / 100 = [0, 0.5, 0.05, 0.11]; > 0.1: 0.5 and 0.11 -> 2/4 = 0.5
    assert dense_fraction(torch.tensor([0, 50, 5, 11]), 100, threshold=0.1) == pytest.approx(0.5)


def test_dense_fraction_is_strict():
    """Exactly `threshold` does not count as dense."""
    # counts / 100 = [0.1, 0.2]: 0.1 is not > 0.1, 0.2 is -> 1/2 = 0.5
    assert dense_fraction(torch.tensor([10, 20]), 100, threshold=0.1) == pytest.approx(0.5)


def test_fvu_and_mse():
    """Hand-computed FVU and MSE."""
    x = _t([[1, 0], [-1, 0]])
    x_hat = _t([[0.5, 0], [-1, 0]])
    # mean of x over the batch = [0, 0]; total sum of squares = 1^2 + (-1)^2 = 2
    # squared error = (1 - 0.5)^2 = 0.25 -> fvu = 0.25 / 2 = 0.125
    assert fvu(x, x_hat) == pytest.approx(0.125)
    # mse = 0.25 over 2 samples x 2 dims = 0.25 / 4 = 0.0625
    assert mse(x, x_hat) == pytest.approx(0.0625)


def test_fvu_uses_variance_about_the_mean():
    """FVU divides by the spread about the mean, not by the raw sum of squares."""
    x = _t([[3, 0], [1, 0]])
    x_hat = _t([[2, 0], [1, 0]])
    # mean = [2, 0]; total = (3-2)^2 + (1-2)^2 = 2 (the raw sum of squares would be 10)
    # squared error = (3 - 2)^2 = 1 -> fvu = 1 / 2 = 0.5
    assert fvu(x, x_hat) == pytest.approx(0.5)


def test_sparsity_term_reductions():
    """'mean' averages |c| over everything; 'sum' sums over latents and averages over the batch."""
    codes = _t([[0, 1, 2], [0, 0, 3]])
    # mean: (0+1+2+0+0+3) / 6 = 6 / 6 = 1.0
    assert sparsity_term(codes, "mean") == pytest.approx(1.0)
    # sum: row sums 3 and 3 -> (3 + 3) / 2 = 3.0
    assert sparsity_term(codes, "sum") == pytest.approx(3.0)


def test_sparsity_term_takes_absolute_values():
    """Negative codes contribute their magnitude."""
    # |[-2, 2]| = [2, 2]: mean 4/2 = 2.0
    assert sparsity_term(_t([[-2, 2]]), "mean") == pytest.approx(2.0)


def test_sparsity_term_unknown_reduction():
    """An unknown reduction is refused."""
    with pytest.raises(ValueError, match="unknown reduction"):
        sparsity_term(_t([[0, 1]]), "max")


# -- WindowStats ----------------------------------------------------------------------------


def _random_chunks(sizes: list[int], K: int = 2, d: int = 3, m: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    chunks = []
    for b in sizes:
        x = torch.randn(b, d, generator=g) + 0.5
        x_hat = x + 0.3 * torch.randn(K, b, d, generator=g)
        # relu of a shifted normal: many exact zeros, so l0 / fire counts are non-trivial
        codes = torch.relu(torch.randn(K, b, m, generator=g) - 0.3)
        chunks.append((x, x_hat, codes))
    return chunks


@pytest.mark.parametrize("sizes", [[4, 6], [3, 1, 5]])
def test_window_stats_equal_batch_functions_on_concatenation(sizes):
    """Accumulating chunks gives the batch metrics of the concatenated batch, member by member."""
    K, d, m = 2, 3, 5
    chunks = _random_chunks(sizes, K=K, d=d, m=m)
    stats = WindowStats(n_members=K, d=d, dict_size=m)
    for x, x_hat, codes in chunks:
        stats.update(x, x_hat, codes)
    x_all = torch.cat([c[0] for c in chunks], dim=0)
    x_hat_all = torch.cat([c[1] for c in chunks], dim=1)
    codes_all = torch.cat([c[2] for c in chunks], dim=1)
    assert stats.n == sum(sizes)
    # fire counts are hand-countable: the number of non-zero codes per (member, latent) across all samples
    assert torch.equal(stats.fire_counts, (codes_all != 0).sum(dim=1))
    for k in range(K):
        assert stats.mse()[k].item() == pytest.approx(mse(x_all, x_hat_all[k]), rel=1e-6)
        assert stats.fvu()[k].item() == pytest.approx(fvu(x_all, x_hat_all[k]), rel=1e-6)
        assert stats.l0()[k].item() == pytest.approx(l0(codes_all[k]), rel=1e-6)
        for reduction in ("mean", "sum"):
            assert stats.sparsity(reduction)[k].item() == pytest.approx(sparsity_term(codes_all[k], reduction), rel=1e-6)
        assert dead_fraction(stats.fire_counts[k]) == pytest.approx(dead_fraction((codes_all[k] != 0).sum(dim=0)))
    # the members differ, so a mix-up between members would be caught
    assert stats.mse()[0].item() != pytest.approx(stats.mse()[1].item(), rel=1e-6)


def test_window_stats_hand_computed():
    """A tiny window with numbers worked out by hand (K=1, d=2, m=3)."""
    stats = WindowStats(n_members=1, d=2, dict_size=3)
    # chunk 1 / chunk 2 together are the fvu example above: x = [[1,0],[-1,0]], x_hat = [[0.5,0],[-1,0]]
    stats.update(_t([[1, 0]]), _t([[[0.5, 0]]]), _t([[[0, 1, 2]]]))
    stats.update(_t([[-1, 0]]), _t([[[-1, 0]]]), _t([[[0, 0, 3]]]))
    # mse = 0.25 / (2 samples * 2 dims) = 0.0625; fvu = 0.25 / 2 = 0.125
    assert stats.mse()[0].item() == pytest.approx(0.0625)
    assert stats.fvu()[0].item() == pytest.approx(0.125)
    # codes [[0,1,2],[0,0,3]]: l0 = (2 + 1) / 2 = 1.5; sparsity mean = 6/6 = 1.0, sum = (3+3)/2 = 3.0
    assert stats.l0()[0].item() == pytest.approx(1.5)
    assert stats.sparsity("mean")[0].item() == pytest.approx(1.0)
    assert stats.sparsity("sum")[0].item() == pytest.approx(3.0)
    # latent 0 never fires, latent 1 fires once, latent 2 twice
    assert stats.fire_counts.tolist() == [[0, 1, 2]]
