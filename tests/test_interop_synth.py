"""A SAELens synthetic model (sae_lens.synthetic, marker `interop`) saved to disk and read by saekit: the same model,
and samples with the same statistics.

The model has everything SynthSAEBench uses: Zipfian firing, a hierarchy with mutually exclusive children,
compensation and children scaled by their parent, a low-rank correlation, linear mean magnitudes with
folded-normal stds, orthogonalised directions and a bias. Both sides then draw N = 200,000 rows. Bounds: a
two-sample difference of rates r1, r2 must stay within 5 standard errors, 5 * sqrt(r1 (1 - r1) / N + r2 (1 - r2) / N),
per feature and per pair of features (a false alarm has probability ~6e-7 per comparison); mean active values
within 5 * sqrt(var1 / n1 + var2 / n2).
"""

from __future__ import annotations

import pytest
import torch

from saekit.sources import SynthSource

N = 200_000
BATCH = 10_000


@pytest.fixture(scope="module")
def sae_lens():
    return pytest.importorskip("sae_lens")


@pytest.fixture(scope="module")
def pair(sae_lens, tmp_path_factory):
    """(SAELens's model, saekit's source read from the folder SAELens saved it to)."""
    from sae_lens import synthetic as syn

    cfg = syn.SyntheticModelConfig(
        num_features=96,
        hidden_dim=24,
        firing_probability=syn.ZipfianFiringProbabilityConfig(exponent=0.7, max_prob=0.5, min_prob=0.02),
        hierarchy=syn.HierarchyConfig(
            total_root_nodes=4, branching_factor=3, max_depth=2, mutually_exclusive_portion=0.5,
            compensate_probabilities=True, scale_children_by_parent=True,
        ),
        orthogonalization=syn.OrthogonalizationConfig(num_steps=5, lr=0.01),
        correlation=syn.LowRankCorrelationConfig(rank=4, correlation_scale=0.3),
        mean_firing_magnitudes=syn.LinearMagnitudeConfig(start=2.0, end=1.0),
        std_firing_magnitudes=syn.FoldedNormalMagnitudeConfig(mean=0.6, std=0.5),
        bias=0.7,
        seed=3,
    )
    model = syn.SyntheticModel(cfg)
    folder = tmp_path_factory.mktemp("synth") / "model"
    model.save(folder)
    return model, SynthSource.from_folder(folder, seed=1)


def _their_hierarchy(model) -> tuple[list[int], list[tuple[int, ...]]]:
    """(parent per feature, the mutually exclusive groups as sorted tuples), read off SAELens's HierarchyNode trees."""
    parent = [-1] * model.cfg.num_features
    groups = []
    stack = list(model.hierarchy.roots)
    while stack:
        node = stack.pop()
        for child in node.children:
            parent[child.feature_index] = node.feature_index
            stack.append(child)
        if node.mutually_exclusive_children:
            groups.append(tuple(sorted(c.feature_index for c in node.children)))
    return parent, sorted(groups)


@pytest.mark.interop
def test_saekit_reads_the_same_model(pair):
    model, src = pair
    assert torch.equal(src.model.vectors, model.feature_dict.feature_vectors.data)
    assert torch.equal(src.bias, model.feature_dict.bias.data)
    assert torch.equal(src.sampling_probs, model.activation_generator.firing_probabilities.double())
    assert torch.equal(src.magnitude_mean, model.activation_generator.mean_firing_magnitudes)
    assert torch.equal(src.magnitude_std, model.activation_generator.std_firing_magnitudes)
    assert torch.equal(src.model.factor, model.correlation_matrix.correlation_factor)
    assert torch.equal(src.model.diag, model.correlation_matrix.correlation_diag)
    parent, groups = _their_hierarchy(model)
    assert src.parent.tolist() == parent
    ours = sorted(tuple(torch.nonzero(src.exclusive_group == g).flatten().tolist()) for g in range(int(src.exclusive_group.max()) + 1))
    assert ours == groups and len(groups) >= 2
    assert bool(src.model.rescale[src.parent >= 0].all())  # scale_children_by_parent on every parent


def _draws(model, src) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)  # SAELens samples from torch's global generator
    theirs = torch.cat([model.sample_with_features(BATCH)[1] for _ in range(N // BATCH)])
    ours = torch.cat([src.batch_with_codes(BATCH, step)[1] for step in range(N // BATCH)])
    return theirs, ours


def _two_sample_z(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    se = (a * (1 - a) / N + b * (1 - b) / N).sqrt()
    return torch.where(se > 0, (a - b) / se.clamp_min(1e-300), torch.zeros_like(a))


@pytest.mark.interop
@pytest.mark.slow  # 2 x 200,000 rows: ~15 s on an idle 2-core machine
def test_samples_agree_within_sampling_error(pair):
    model, src = pair
    theirs, ours = _draws(model, src)
    on_t, on_o = theirs > 0, ours > 0
    rate_t, rate_o = on_t.double().mean(dim=0), on_o.double().mean(dim=0)
    assert _two_sample_z(rate_t, rate_o).abs().max() < 5
    assert ((rate_t - src.probs) / (src.probs * (1 - src.probs) / N).sqrt()).abs().max() < 5  # saekit's probs fit SAELens
    # co-firing of every pair among the 32 most frequent features (roots, children and copula-correlated features)
    top = torch.argsort(rate_t, descending=True)[:32]
    both_t = on_t[:, top].double().T @ on_t[:, top].double() / N
    both_o = on_o[:, top].double().T @ on_o[:, top].double() / N
    assert _two_sample_z(both_t, both_o).abs().max() < 5
    # a child never fires without its parent; exclusive siblings never co-fire (both sides)
    kids = torch.nonzero(src.parent >= 0).flatten()
    for on in (on_t, on_o):
        assert int((on[:, kids] & ~on[:, src.parent[kids]]).sum()) == 0
        for g in range(int(src.exclusive_group.max()) + 1):
            assert int(on[:, src.exclusive_group == g].sum(dim=1).max()) <= 1
    # parent-child co-firing: P(child | parent) the same
    cond_t = on_t[:, kids].double().sum(0) / on_t[:, src.parent[kids]].double().sum(0)
    cond_o = on_o[:, kids].double().sum(0) / on_o[:, src.parent[kids]].double().sum(0)
    n_par = on_t[:, src.parent[kids]].double().sum(0)
    assert ((cond_t - cond_o).abs() / (2 * cond_t * (1 - cond_t) / n_par).sqrt().clamp_min(1e-12)).max() < 5
    # mean active value per feature (children carry their parent's scale)
    count_t, count_o = on_t.sum(0).double(), on_o.sum(0).double()
    mean_t, mean_o = theirs.double().sum(0) / count_t, ours.double().sum(0) / count_o
    var_t = (theirs.double() ** 2).sum(0) / count_t - mean_t**2
    var_o = (ours.double() ** 2).sum(0) / count_o - mean_o**2
    enough = (count_t > 100) & (count_o > 100)
    z = (mean_t - mean_o) / (var_t / count_t + var_o / count_o).sqrt()
    assert z[enough].abs().max() < 5


@pytest.mark.interop
def test_hidden_activations_are_codes_times_vectors_plus_bias(pair):
    model, src = pair
    x, codes = src.batch_with_codes(256, 0)
    torch.testing.assert_close(x, model.feature_dict(codes), atol=1e-5, rtol=1e-5)  # SAELens's own decode of our codes

