"""The report's toy generator: shapes, determinism, firing rates, coefficients, correlation, variants."""

import math

import pytest
import torch

from saekit.config import SourceConfig
from saekit.sources import ToySource, make_source, stream_batches
from saekit.sources.seeding import seeded_generator
from saekit.sources.toy import firing_probabilities, random_correlation_matrix


def test_shapes_dtype_and_unit_truth():
    src = ToySource(d=16, n_features=24, mean_active=3, seed=1)
    x = src.batch(10, step=0)
    assert x.shape == (10, 16) and x.dtype == torch.float32
    assert src.ground_truth.shape == (24, 16)
    torch.testing.assert_close(src.ground_truth.norm(dim=1), torch.ones(24))


def test_deterministic_for_a_seed_and_fresh_per_step():
    a, b = ToySource(d=16, n_features=24, seed=5), ToySource(d=16, n_features=24, seed=5)
    assert torch.equal(a.ground_truth, b.ground_truth)
    assert torch.equal(a.batch(8, 3), b.batch(8, 3))
    assert not torch.equal(a.batch(8, 3), a.batch(8, 4))  # fresh samples every step
    assert not torch.equal(a.batch(8, 3, stream=0), a.batch(8, 3, stream=1))  # eval stream differs
    c = ToySource(d=16, n_features=24, seed=6)
    assert not torch.equal(a.ground_truth, c.ground_truth)
    it = stream_batches(a, 8, start_step=3)
    assert torch.equal(next(it), a.batch(8, 3)) and torch.equal(next(it), a.batch(8, 4))


def test_firing_probabilities_decay_and_sum():
    p = firing_probabilities(512, 0.99, 5.0)
    # The report: p_i proportional to 0.99**i, scaled so the expected count is 5.
    assert p.sum().item() == pytest.approx(5.0, rel=1e-9)
    torch.testing.assert_close(p[1:] / p[:-1], torch.full((511,), 0.99, dtype=torch.float64))


def test_firing_probabilities_clamped_to_one():
    # 4 features, decay 0.5, mean 3: unclamped s*(1, .5, .25, .125) would need s = 3/1.875 = 1.6 > 1 for p_0,
    # so p_0 = 1 and s solves 1 + s*(.5+.25+.125) = 3 -> s = 2/0.875 = 2.2857, which caps p_1 at 1 too:
    # then 2 + s*(.25+.125) = 3 -> s = 2.6667, p = (1, 1, 0.6667, 0.3333).
    p = firing_probabilities(4, 0.5, 3.0)
    torch.testing.assert_close(p, torch.tensor([1.0, 1.0, 2 / 3, 1 / 3], dtype=torch.float64))
    assert torch.equal(firing_probabilities(3, 0.9, 3.0), torch.ones(3, dtype=torch.float64))


def _codes(src: ToySource, n: int) -> torch.Tensor:
    g = seeded_generator(123)
    return torch.cat([src.sample_coefficients(4096, g) for _ in range(n // 4096)])


def test_empirical_rates_and_uniform_coefficients():
    src = ToySource(d=8, n_features=20, prob_decay=0.9, mean_active=4, seed=2)
    codes = _codes(src, 4096 * 40)
    n = codes.shape[0]
    rate = (codes > 0).double().mean(dim=0)
    p = src.probs
    # Binomial standard error sqrt(p(1-p)/n); 5 sigma.
    assert ((rate - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-9).all()
    active = codes[codes > 0]
    assert active.min() >= 0 and active.max() < 1
    # Uniform[0,1): mean 1/2 and quartiles 1/4, 1/2, 3/4 (std of mean = sqrt(1/12/N)).
    assert active.mean().item() == pytest.approx(0.5, abs=5 * math.sqrt(1 / 12 / active.numel()))
    q = torch.quantile(active[:100_000], torch.tensor([0.25, 0.5, 0.75]))
    torch.testing.assert_close(q, torch.tensor([0.25, 0.5, 0.75]), atol=0.01, rtol=0)


def test_x_is_the_sum_of_active_directions():
    src = ToySource(d=8, n_features=12, mean_active=3, seed=3)
    g1, g2 = seeded_generator(9), seeded_generator(9)
    codes = src.sample_coefficients(32, g1)
    torch.testing.assert_close(src.sample(32, g2), codes @ src.ground_truth)


def test_magnitude_decay_scales_feature_i():
    src = ToySource(d=8, n_features=10, prob_decay=1.0, mean_active=5, magnitude_decay=0.8, seed=4)
    codes = _codes(src, 4096 * 10)
    mean_active = torch.stack([codes[:, i][codes[:, i] > 0].mean() for i in range(10)])
    # E[c_i | active] = 0.5 * 0.8**i
    torch.testing.assert_close(mean_active, 0.5 * 0.8 ** torch.arange(10.0), atol=0.01, rtol=0)


def test_noise_std():
    clean = ToySource(d=64, n_features=10, mean_active=2, seed=5)
    noisy = ToySource(d=64, n_features=10, mean_active=2, seed=5, noise_std=0.1)
    g1, g2 = seeded_generator(1), seeded_generator(1)
    codes = clean.sample_coefficients(2048, g1)
    residual = noisy.sample(2048, g2) - codes @ clean.ground_truth
    assert residual.std().item() == pytest.approx(0.1, rel=0.02)


def test_correlated_keeps_marginals_and_correlates_pairs():
    src = ToySource(d=8, n_features=8, prob_decay=1.0, mean_active=4, correlated=True, seed=7)
    corr = src.correlation
    torch.testing.assert_close(corr.diagonal(), torch.ones(8))
    assert torch.linalg.eigvalsh(corr.double()).min() > 0
    fired = (_codes(src, 4096 * 50) > 0).double()
    n = fired.shape[0]
    rate = fired.mean(dim=0)
    assert ((rate - 0.5).abs() <= 5 * math.sqrt(0.25 / n)).all()  # marginals stay p_i = 4/8
    emp = torch.corrcoef(fired.T)
    off = ~torch.eye(8, dtype=torch.bool)
    # With p = 1/2 the firing correlation of a pair is (2/pi) arcsin(rho) (the Gaussian orthant formula).
    expected = (2 / math.pi) * torch.asin(corr.double())
    torch.testing.assert_close(emp[off], expected[off], atol=0.02, rtol=0)
    assert expected[off].abs().max() > 0.1  # the pairs really are correlated
    indep = (_codes(ToySource(d=8, n_features=8, prob_decay=1.0, mean_active=4, seed=7), 4096 * 50) > 0).double()
    assert torch.corrcoef(indep.T)[off].abs().max() < 0.02


def test_random_correlation_matrix_is_valid():
    c = random_correlation_matrix(50, seeded_generator(0))
    torch.testing.assert_close(c, c.T)
    torch.testing.assert_close(c.diagonal(), torch.ones(50, dtype=torch.float64))
    assert torch.linalg.eigvalsh(c).min() > 0


def test_fixed_dataset_epochs():
    src = ToySource(d=4, n_features=6, mean_active=2, seed=8, n_samples=10)
    data = src.dataset()
    assert data.shape == (10, 4)
    batches = torch.cat([src.batch(4, t) for t in range(5)])  # 20 rows = two epochs
    for epoch in (batches[:10], batches[10:]):
        # every sample exactly once per epoch (match rows by sorting on their sums + first column)
        key = lambda t: sorted(map(tuple, t.tolist()))  # noqa: E731
        assert key(epoch) == key(data)
    assert torch.equal(src.batch(4, 2), ToySource(d=4, n_features=6, mean_active=2, seed=8, n_samples=10).batch(4, 2))


@pytest.mark.parametrize("kw", [{}, {"noise_std": 0.1}, {"correlated": True}, {"magnitude_decay": 0.9}])
def test_batch_with_codes_is_batch_and_its_codes(kw):
    src = ToySource(d=16, n_features=24, mean_active=3, seed=2, **kw)
    x, codes = src.batch_with_codes(50, step=4, stream=1)
    assert torch.equal(x, src.batch(50, step=4, stream=1))  # bit for bit the batch training and evaluation read
    assert codes.shape == (50, 24) and (codes >= 0).all()
    # the codes are the ones x was built from (noise aside): x = codes @ truth (+ noise_std * N(0, 1))
    residual = x - codes @ src.ground_truth
    assert residual.abs().max() < 1e-6 if not kw.get("noise_std") else 0.05 < residual.std() < 0.15


def test_batch_with_codes_of_a_fixed_dataset_is_none():
    # the dataset keeps no codes: None tells the caller to read plain batches
    assert ToySource(d=4, n_features=6, mean_active=2, n_samples=10).batch_with_codes(4, 0) is None


def test_make_source_from_config():
    src = make_source(SourceConfig(d=12, n_features=20, mean_active=2, seed=1))
    assert isinstance(src, ToySource) and src.d == 12 and src.ground_truth.shape == (20, 12)
