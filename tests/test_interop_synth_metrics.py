"""saekit's known-feature metrics against SAELens's SynthSAEBench (`sae_lens.synthetic.evals`), on the same tensors.

A small synthetic model from `sae_lens.synthetic` (a feature dictionary and an activation generator with a
hierarchy) is sampled ONCE: true feature activations (N, G) and hidden activations (N, d). A saekit ReluSAE, part
true features, part duplicates, part random, some latents dead, is copied into an equivalent SAELens StandardSAE.
Then (1) SAELens's calculators and saekit's functions are fed the very same tensors, and (2) SAELens's
`eval_sae_on_synthetic_data` and saekit's `evaluate_window` each run their own SAE over the same samples (replayed
in the same batches). Every shared metric must agree within 1e-5; no definition differs. Absorption and the split
count have no SynthSAEBench counterpart.
"""

from __future__ import annotations

import pytest
import torch

from saekit.interop.saelens import saelens_tensors
from saekit.metrics import DetectionCounts, best_features, dead_fraction, mcc, shrinkage, uniqueness
from saekit.metrics.window import WindowStats
from saekit.sae import ReluSAE
from saekit.train.evaluate import evaluate_window

G, D, M, N, B = 24, 16, 40, 3000, 700  # B does not divide N: the last batch is short on both sides
TOL = 1e-5


@pytest.fixture(scope="module")
def sae_lens():
    return pytest.importorskip("sae_lens")


@pytest.fixture(scope="module")
def synth(sae_lens):
    """(feature dictionary, true feature activations (N, G), hidden activations (N, d), parent (G,))."""
    from sae_lens.synthetic import ActivationGenerator, FeatureDictionary, HierarchyNode, hierarchy_modifier

    torch.manual_seed(0)
    feature_dict = FeatureDictionary(G, D, seed=0)
    # features 0 and 1 are parents of 2, 3 and of 4, 5: a child only fires with its parent
    roots = [HierarchyNode(0, [HierarchyNode(2), HierarchyNode(3)]), HierarchyNode(1, [HierarchyNode(4), HierarchyNode(5)])]
    generator = ActivationGenerator(
        G,
        firing_probabilities=torch.linspace(0.3, 0.05, G),
        std_firing_magnitudes=0.2,
        modify_activations=hierarchy_modifier(roots),
    )
    with torch.no_grad():
        codes = generator.sample(N)
        hidden = feature_dict(codes)
    parent = torch.full((G,), -1, dtype=torch.long)
    parent[[2, 3, 4, 5]] = torch.tensor([0, 0, 1, 1])
    return feature_dict, codes, hidden, parent


def _saekit_sae(truth: torch.Tensor) -> ReluSAE:
    """Latents 0..23: the true features plus noise; 24..31: noisy copies of features 0..7; 32..39: random.
    Encoder = decoder transpose, bias -0.25 (latents 36..39: -100, dead), a small decoder bias."""
    g = torch.Generator().manual_seed(1)
    rows = torch.cat([truth, truth[:8], torch.randn(8, D, generator=g)]) + 0.15 * torch.randn(M, D, generator=g)
    rows = rows / rows.norm(dim=1, keepdim=True)
    sae = ReluSAE(D, M, seeds=[0], l1=[0.1], decoder_bias=True)
    with torch.no_grad():
        sae.W_dec.copy_(rows[None])
        sae.W_enc.copy_(rows.T[None])
        sae.b_enc.fill_(-0.25)
        sae.b_enc[0, 36:] = -100.0
        sae.b_dec.copy_(0.05 * torch.randn(1, D, generator=g))
    return sae


def _saelens_copy(sae_lens, sae: ReluSAE):
    """The same SAE as a SAELens StandardSAE (b_dec subtracted from the input, as saekit does)."""
    from sae_lens.registry import get_sae_class

    arch, tensors, _ = saelens_tensors(sae)
    cls, cfg_cls = get_sae_class(arch)
    theirs = cls(cfg_cls(d_in=D, d_sae=M, apply_b_dec_to_input=True))
    theirs.load_state_dict(tensors)
    return theirs.eval()


@pytest.fixture(scope="module")
def pair(sae_lens, synth):
    sae = _saekit_sae(synth[0].feature_vectors.detach())
    return sae, _saelens_copy(sae_lens, sae)


@pytest.mark.interop
def test_the_two_saes_encode_alike(synth, pair):
    """The premise of part (2): on these samples the copies give the same codes and the same firing pattern."""
    _, _, hidden, _ = synth
    ours, theirs = pair
    with torch.no_grad():
        c_ours, c_theirs = ours.encode(hidden)[0], theirs.encode(hidden)
    torch.testing.assert_close(c_ours, c_theirs, atol=TOL, rtol=0)
    assert torch.equal(c_ours != 0, c_theirs != 0)
    fires = (c_ours != 0).sum(dim=0)
    assert (fires[36:] == 0).all() and (fires[:36] > 0).all()  # 4 dead latents, the rest live


@pytest.mark.interop
def test_calculators_on_the_same_tensors(sae_lens, synth, pair):
    from sae_lens.evals import ExplainedVarianceCalculator
    from sae_lens.synthetic import evals

    feature_dict, codes, hidden, _ = synth
    _, theirs = pair
    truth, decoder = feature_dict.feature_vectors.detach(), theirs.W_dec.detach()
    with torch.no_grad():
        latents = theirs.encode(hidden)
        out = theirs.decode(latents)
    # dictionary-only metrics
    assert mcc(decoder, truth) == pytest.approx(evals.mean_correlation_coefficient(decoder, truth), abs=TOL)
    assert uniqueness(decoder, truth) == pytest.approx(evals.feature_uniqueness(decoder, truth), abs=TOL)
    assert uniqueness(decoder, truth) < 1  # the duplicated latents share features
    # window metrics, in batches of B on both sides
    classification = evals.ClassificationMetricsCalculator(decoder, truth)
    shrink, l0_calc = evals.ShrinkageCalculator(), evals.L0Calculator()
    dead, ev = evals.DeadLatentsCalculator(M), ExplainedVarianceCalculator()
    counts = DetectionCounts(best_features(decoder, truth)[0][None], G)
    stats = WindowStats(1, D, M)
    for start in range(0, N, B):
        rows = slice(start, start + B)
        classification.add_batch(latents[rows], codes[rows])
        shrink.add_batch(out[rows], hidden[rows])
        l0_calc.add_batch(latents[rows])
        dead.add_batch(latents[rows])
        ev.add_batch(out[rows], hidden[rows])
        counts.update(latents[None, rows], codes[rows])
        stats.update(hidden[rows], out[None, rows], latents[None, rows])
    theirs_cls, ours_cls = classification.compute(), {k: v.item() for k, v in counts.scores(stats.fire_counts).means().items()}
    assert ours_cls == pytest.approx(
        {"precision": theirs_cls.precision, "recall": theirs_cls.recall, "f1": theirs_cls.f1_score, "accuracy": theirs_cls.accuracy},
        abs=TOL,
    )
    assert 0 < ours_cls["f1"] < 1
    assert stats.shrinkage().item() == pytest.approx(shrink.compute(), abs=TOL)
    assert shrinkage(hidden, out) == pytest.approx(shrink.compute(), abs=TOL)
    assert stats.l0().item() == pytest.approx(l0_calc.compute(), abs=TOL)
    assert round(dead_fraction(stats.fire_counts[0]) * M) == dead.compute() == 4
    assert 1 - stats.fvu().item() == pytest.approx(ev.compute(), abs=TOL)  # explained variance = 1 - FVU


class _Replay:
    """Hands out the pre-sampled true activations in order, as SAELens's activation generator would sample them."""

    def __init__(self, codes: torch.Tensor) -> None:
        self.codes, self.at = codes, 0

    def sample(self, batch_size: int) -> torch.Tensor:
        self.at += batch_size
        return self.codes[self.at - batch_size : self.at]


class _SynthSource:
    """The same samples as a saekit source: batch t of the evaluation stream is rows [t B, (t + 1) B)."""

    def __init__(self, codes: torch.Tensor, hidden: torch.Tensor, truth: torch.Tensor, parent: torch.Tensor) -> None:
        self.codes, self.hidden, self.ground_truth, self.parent, self.d = codes, hidden, truth, parent, D

    def batch_with_codes(self, batch_size: int, step: int, stream: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        rows = slice(step * batch_size, (step + 1) * batch_size)
        return self.hidden[rows], self.codes[rows]

    def batch(self, batch_size: int, step: int, stream: int = 0) -> torch.Tensor:
        return self.batch_with_codes(batch_size, step, stream)[0]


@pytest.mark.interop
def test_eval_sae_on_synthetic_data_equals_evaluate_window(sae_lens, synth, pair):
    from sae_lens.synthetic import eval_sae_on_synthetic_data

    feature_dict, codes, hidden, parent = synth
    ours, theirs = pair
    want = eval_sae_on_synthetic_data(theirs, feature_dict, _Replay(codes), num_samples=N, batch_size=B)
    (got,) = evaluate_window(ours, _SynthSource(codes, hidden, feature_dict.feature_vectors.detach(), parent), N, B)[0]
    assert got["eval_samples"] == N
    pairs = {
        "l0": want.sae_l0,
        "shrinkage": want.shrinkage,
        "mcc": want.mcc,
        "uniqueness": want.uniqueness,
        "precision": want.classification.precision,
        "recall": want.classification.recall,
        "f1": want.classification.f1_score,
    }
    assert {k: got[k] for k in pairs} == pytest.approx(pairs, abs=TOL)
    assert 1 - got["fvu"] == pytest.approx(want.explained_variance, abs=TOL)
    assert round(got["dead_fraction"] * M) == want.dead_latents
    # saekit's extras, which SynthSAEBench does not compute: defined and in range on this hierarchical data
    assert 0 <= got["absorption"] <= 1 and got["split"] >= 0
