"""`source.kind: synth`: SynthSAEBench-style generator, sparse sampler, realised firing rates, SAELens folders, config.

Statistical checks compare empirical rates with their expected value p and allow 5 standard errors,
5 * sqrt(p (1 - p) / N), per feature (a false alarm has probability ~6e-7 per feature); expected values come
from hand calculations stated in the comments, or from an independent route (a 1-D Gauss-Hermite integral
for the copula, autograd for the orthogonalisation gradient).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from saekit.config import load_config
from saekit.errors import InputError
from saekit.sources import SynthSource, make_source
from saekit.sources.seeding import seeded_generator
from saekit.sources.synth_build import compensate, exclusive_groups, firing_probabilities, forest, orthogonalize
from saekit.sources.synth_model import SynthModel
from saekit.sources.synth_probs import realised_probabilities
from saekit.sources.synth_sampling import bernoulli_positions

# two trees (branching 4, depth 3) fill all 64 features breadth first: roots 0-1, 2-9, 10-41, 42-63
SMALL = {"d": 16, "n_features": 64, "hierarchy_roots": 2, "orthogonalize_steps": 10}


def _codes(source: SynthSource, n: int, batch: int = 10_000, stream: int = 5) -> torch.Tensor:
    return torch.cat([source.batch_with_codes(batch, step, stream)[1] for step in range(n // batch)])


def _z(rate: torch.Tensor, p: torch.Tensor, n: int) -> torch.Tensor:
    """Standard scores of empirical rates against p (0 where p is 0 or 1 and the rate agrees)."""
    se = (p * (1 - p) / n).sqrt()
    return torch.where(se > 0, (rate - p) / se.clamp_min(1e-300), (rate - p).abs() * 1e300)


def _model(parent, group, p, mean=None, std=None, rescale=None, factor=None, diag=None) -> SynthModel:
    G = len(parent)
    return SynthModel(
        vectors=torch.eye(G), bias=torch.zeros(G), sampling_probs=torch.tensor(p, dtype=torch.float64),
        mean=torch.ones(G) if mean is None else torch.tensor(mean, dtype=torch.float32),
        std=torch.zeros(G) if std is None else torch.tensor(std, dtype=torch.float32),
        parent=torch.tensor(parent), rescale=torch.zeros(G, dtype=torch.bool) if rescale is None else torch.tensor(rescale),
        group=torch.tensor(group), exclusive=torch.zeros(G, dtype=torch.bool), factor=factor, diag=diag,
    )


# ---------------------------------------------------------------- shapes, determinism, codes


def test_shapes_unit_truth_and_bias():
    src = SynthSource(**SMALL, bias_norm=2.0, seed=1)
    x = src.batch(32, 0)
    assert x.shape == (32, 16) and x.dtype == torch.float32
    assert src.ground_truth.shape == (64, 16)
    torch.testing.assert_close(src.ground_truth.norm(dim=1), torch.ones(64))
    torch.testing.assert_close(src.feature_norms, torch.ones(64))
    assert src.bias.norm().item() == pytest.approx(2.0, rel=1e-6)
    assert src.probs.dtype == torch.float64 and src.parent.dtype == torch.int64 and src.mutually_exclusive.dtype == torch.bool
    assert SynthSource(**SMALL, bias_norm=0.0).bias.abs().max().item() == 0


def test_batch_is_a_pure_function_of_seed_stream_step():
    a, b = SynthSource(**SMALL, seed=3), SynthSource(**SMALL, seed=3)
    assert torch.equal(a.ground_truth, b.ground_truth)
    assert torch.equal(a.batch(64, 7), b.batch(64, 7))
    assert torch.equal(a.batch(64, 7, stream=1), b.batch(64, 7, stream=1))
    assert not torch.equal(a.batch(64, 7), a.batch(64, 8))
    assert not torch.equal(a.batch(64, 7, stream=0), a.batch(64, 7, stream=1))
    assert not torch.equal(a.ground_truth, SynthSource(**SMALL, seed=4).ground_truth)


def test_batch_with_codes_gives_the_same_x_and_codes_that_rebuild_it():
    src = SynthSource(**SMALL, seed=2)
    x, codes = src.batch_with_codes(256, 4, stream=1)
    assert torch.equal(x, src.batch(256, 4, stream=1))
    assert codes.shape == (256, 64) and bool((codes >= 0).all()) and bool((codes > 0).any())
    rebuilt = codes @ (src.feature_norms[:, None] * src.ground_truth) + src.bias
    torch.testing.assert_close(rebuilt, x, atol=1e-5, rtol=1e-5)


def test_empty_rows_are_the_bias():
    # firing 1e-3 everywhere and no hierarchy: most rows have no active feature, so x is the bias alone
    src = SynthSource(**{**SMALL, "hierarchy_roots": 0}, firing="constant", firing_max=1e-3, bias_norm=1.5, seed=0)
    x, codes = src.batch_with_codes(200, 0)
    empty = (codes > 0).sum(dim=1) == 0
    assert int(empty.sum()) > 100
    torch.testing.assert_close(x[empty], src.bias.expand(int(empty.sum()), -1))


# ---------------------------------------------------------------- the sampler's building blocks


def test_bernoulli_positions_certain_impossible_and_rates():
    q = torch.tensor([0.0, 1.0, 0.3, 0.002], dtype=torch.float64)
    n, rounds = 200, 400
    counts = torch.zeros(4, dtype=torch.float64)
    by_position = torch.zeros(n, dtype=torch.float64)
    g = seeded_generator(0, 1)
    for _ in range(rounds):
        which, pos = bernoulli_positions(q, n, g)
        assert bool((pos >= 0).all() and (pos < n).all())
        key = which * n + pos
        assert bool((key[1:] > key[:-1]).all())  # sorted by (which, pos), no repeats
        assert torch.equal(pos[which == 1], torch.arange(n))  # q = 1: every position
        counts += torch.bincount(which, minlength=4).double()
        by_position += torch.bincount(pos[which == 2], minlength=n).double()
    assert counts[0] == 0
    trials = n * rounds
    assert _z(counts[2:] / trials, q[2:], trials).abs().max() < 5
    # positions of q = 0.3 are uniform: each position fires with probability 0.3 in each round
    assert _z(by_position / rounds, torch.full((n,), 0.3, dtype=torch.float64), rounds).abs().max() < 5


def test_bernoulli_positions_unordered_holds_the_same_entries():
    q = torch.rand(40, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a = bernoulli_positions(q, 30, seeded_generator(1))
    b = bernoulli_positions(q, 30, seeded_generator(1), ordered=False)
    assert sorted(zip(a[0].tolist(), a[1].tolist())) == sorted(zip(b[0].tolist(), b[1].tolist()))


# ---------------------------------------------------------------- realised probabilities against hand calculations


def test_realised_probabilities_by_hand():
    # root 0 always on; children 1, 2 mutually exclusive, each drawn with 0.5: child 1 survives when drawn and
    # either 2 is off (0.5) or 2 is on and 1 wins the coin (0.5 * 0.5): 0.5 * (0.5 + 0.25) = 0.375.
    m = _model([-1, 0, 0], [-1, 0, 0], [1.0, 0.5, 0.5])
    torch.testing.assert_close(realised_probabilities(m), torch.tensor([1.0, 0.375, 0.375], dtype=torch.float64))
    # three exclusive siblings with q = 0.5: E[1 / (1 + K)], K ~ Binomial(2, 0.5): 0.25 + 0.5 / 2 + 0.25 / 3 = 7/12;
    # rate 0.5 * 7/12. A grandchild under child 1 (drawn with 0.4): 0.5 * 7/12 * 0.4.
    m = _model([-1, 0, 0, 0, 1], [-1, 0, 0, 0, -1], [1.0, 0.5, 0.5, 0.5, 0.4])
    want = torch.tensor([1.0, 7 / 24, 7 / 24, 7 / 24, 7 / 24 * 0.4], dtype=torch.float64)
    torch.testing.assert_close(realised_probabilities(m), want)
    # magnitudes N(0, 1) clipped at 0 are on half the time: a root drawn with 0.8 is on with 0.4, its child
    # (drawn with 0.5, mean 1, std 0) with 0.4 * 0.5.
    m = _model([-1, 0], [-1, -1], [0.8, 0.5], mean=[0.0, 1.0], std=[1.0, 0.0])
    torch.testing.assert_close(realised_probabilities(m), torch.tensor([0.4, 0.2], dtype=torch.float64))


def test_independent_rates_match_probs():
    src = SynthSource(**SMALL, correlation_rank=0, magnitude_std=1.5, seed=5)  # std 1.5 around 4-5: some values clip to 0
    n = 100_000
    rate = (_codes(src, n) > 0).double().mean(dim=0)
    assert _z(rate, src.probs, n).abs().max() < 5


def test_correlated_rates_match_probs():
    src = SynthSource(**SMALL, correlation_rank=3, correlation_scale=0.4, seed=6)
    n = 100_000
    rate = (_codes(src, n) > 0).double().mean(dim=0)
    assert _z(rate, src.probs, n).abs().max() < 5


def test_probs_follow_the_hierarchy_not_the_sampling_probs():
    src = SynthSource(**SMALL, seed=0)
    children = src.parent >= 0
    # compensation draws children far more often than they end up firing
    assert bool((src.sampling_probs[children] > src.probs[children]).all())
    assert bool((src.probs[children] <= src.probs[src.parent[children]] + 1e-12).all())  # never above the parent


# ---------------------------------------------------------------- hierarchy, exclusion, scaling


def test_children_never_fire_without_their_parent_and_exclusive_children_never_cofire():
    src = SynthSource(**SMALL, exclusive_portion=0.5, seed=7)
    codes = _codes(src, 40_000)
    on = codes > 0
    kids = torch.nonzero(src.parent >= 0).flatten()
    assert int((on[:, kids] & ~on[:, src.parent[kids]]).sum()) == 0
    groups = src.exclusive_group
    assert int(groups.max()) >= 1 and bool(src.mutually_exclusive.any())
    for gid in range(int(groups.max()) + 1):
        members = torch.nonzero(groups == gid).flatten()
        assert int(on[:, members].sum(dim=1).max()) <= 1
    loose = torch.nonzero(src.mutually_exclusive == 0).flatten()  # children of the other parents do co-fire
    siblings = [torch.nonzero(src.parent == q).flatten() for q in loose.tolist() if int((src.parent == q).sum()) >= 2]
    assert max(int(on[:, sib].sum(dim=1).max()) for sib in siblings) >= 2


def test_children_scaled_by_parent_value_over_parent_mean():
    # root: mean 2, std 0.5; child: mean 3, std 0 -> child value = 3 * root value / 2 exactly
    m = _model([-1, 0], [-1, -1], [0.9, 0.9], mean=[2.0, 3.0], std=[0.5, 0.0], rescale=[False, True])
    codes = _codes(SynthSource.from_model(m), 2000, batch=1000)
    both = (codes > 0).all(dim=1)
    assert int(both.sum()) > 1000
    torch.testing.assert_close(codes[both, 1], 3 * codes[both, 0] / 2)


def test_magnitudes_mean_and_std():
    # constant firing, no hierarchy, mean 3 (first and last), std 0.5 for every feature: active values ~ N(3, 0.5^2)
    # (clipping at 0 is 6 sigma away). 5 standard errors of the mean: 5 * 0.5 / sqrt(n); of the std: 5 * 0.5 / sqrt(2 n).
    src = SynthSource(d=8, n_features=8, firing="constant", firing_max=0.5, hierarchy_roots=0, correlation_rank=0,
                      magnitude_mean=3.0, magnitude_mean_last=3.0, magnitude_std=0.5, magnitude_std_spread=0.0,
                      orthogonalize_steps=0, seed=0)
    codes = _codes(src, 20_000)
    values = codes[codes > 0].double()
    n = values.numel()
    assert abs(values.mean().item() - 3.0) < 5 * 0.5 / math.sqrt(n)
    assert abs(values.std().item() - 0.5) < 5 * 0.5 / math.sqrt(2 * n)
    spread = SynthSource(**SMALL, magnitude_std=0.5, magnitude_std_spread=0.5, seed=0)
    assert spread.magnitude_std.std().item() > 0.1 and bool((spread.magnitude_std >= 0).all())
    torch.testing.assert_close(spread.magnitude_mean[[0, -1]], torch.tensor([5.0, 4.0]))  # linear from 5 to 4


# ---------------------------------------------------------------- correlation


def _joint_on_rank1(a_i: float, a_j: float, t_i: float, t_j: float) -> float:
    """P(z_i > t_i, z_j > t_j) for z = a e + sqrt(1 - a^2) eta, e ~ N(0, 1): a Gauss-Hermite integral over e."""
    x, w = np.polynomial.hermite_e.hermegauss(80)
    from scipy.special import ndtr

    p_i = ndtr((a_i * x - t_i) / math.sqrt(1 - a_i**2))
    p_j = ndtr((a_j * x - t_j) / math.sqrt(1 - a_j**2))
    return float((w * p_i * p_j).sum() / math.sqrt(2 * math.pi))


def test_correlation_off_is_independent_and_on_matches_the_copula():
    n, p = 100_000, 0.2
    flat = {"d": 8, "n_features": 6, "firing": "constant", "firing_max": p, "hierarchy_roots": 0, "magnitude_std": 0.0,
            "orthogonalize_steps": 0}
    on = _codes(SynthSource(**flat, correlation_rank=0, seed=0), n) > 0
    both = (on[:, :, None] & on[:, None, :]).double().mean(dim=0)
    off_diag = ~torch.eye(6, dtype=torch.bool)
    # independence: P(i and j) = p^2 for every pair
    assert _z(both[off_diag], torch.full((30,), p * p, dtype=torch.float64), n).abs().max() < 5
    corr = SynthSource(**flat, correlation_rank=1, correlation_scale=0.8, seed=0)
    on = _codes(corr, n) > 0
    both = (on[:, :, None] & on[:, None, :]).double().mean(dim=0)
    a = corr.model.factor[:, 0].double().tolist()
    t = torch.special.ndtri(torch.tensor(1 - p, dtype=torch.float64)).item()
    want = torch.tensor([[_joint_on_rank1(a[i], a[j], t, t) for j in range(6)] for i in range(6)], dtype=torch.float64)
    assert _z(both[off_diag], want[off_diag], n).abs().max() < 5
    assert (want[off_diag] - p * p).abs().max() > 0.03  # the copula makes a measurable difference


# ---------------------------------------------------------------- the generator's parts


def test_firing_probability_shapes():
    z = firing_probabilities("zipfian", 5, 0.4, 0.01, 1.0, 0)
    # ranks 1..5, 1/rank = (1, .5, .333, .25, .2) mapped linearly onto [0.01, 0.4]: rank 2 -> 0.01 + 0.39 * 0.3/0.8
    torch.testing.assert_close(z[[0, 1, 4]], torch.tensor([0.4, 0.01 + 0.39 * 0.375, 0.01], dtype=torch.float64))
    torch.testing.assert_close(firing_probabilities("linear", 3, 0.3, 0.1, 1.0, 0), torch.tensor([0.3, 0.2, 0.1], dtype=torch.float64))
    assert torch.equal(firing_probabilities("constant", 3, 0.3, 0.1, 1.0, 0), torch.full((3,), 0.3, dtype=torch.float64))
    r = firing_probabilities("random", 100, 0.3, 0.1, 1.0, 0)
    assert bool(((r >= 0.1) & (r <= 0.3)).all())


def test_forest_breadth_first_and_exclusive_portion():
    parent, exclusive = forest(30, roots=2, branching=3, depth=2, exclusive_portion=0.5, seed=0)
    # roots 0, 1; their children 2-4 and 5-7; then 8-10 under 2, ..., 23-25 under 7; 26-29 outside the trees
    assert parent[:8].tolist() == [-1, -1, 0, 0, 0, 1, 1, 1]
    assert parent[8:26].tolist() == [p for p in range(2, 8) for _ in range(3)]
    assert bool((parent[26:] == -1).all())
    assert int(exclusive.sum()) == 4  # int(8 parents * 0.5)
    groups = exclusive_groups(parent, exclusive)
    assert bool(((groups >= 0) == exclusive[parent.clamp(min=0)] & (parent >= 0)).all())


def test_compensation_by_hand():
    # root p 0.5; children 0.2 and 0.1, exclusive: 0.2 / 0.5 * (1 + 0.1 / 0.5) = 0.48, 0.1 / 0.5 * (1 + 0.2 / 0.5) = 0.28
    base = torch.tensor([0.5, 0.2, 0.1], dtype=torch.float64)
    parent, group = torch.tensor([-1, 0, 0]), torch.tensor([-1, 0, 0])
    torch.testing.assert_close(compensate(base, parent, group), torch.tensor([0.5, 0.48, 0.28], dtype=torch.float64))
    # without exclusion 0.4 and 0.2; a factor above 1 is capped
    torch.testing.assert_close(compensate(base, parent, torch.full((3,), -1)), torch.tensor([0.5, 0.4, 0.2], dtype=torch.float64))
    assert compensate(torch.tensor([0.1, 0.5], dtype=torch.float64), torch.tensor([-1, 0]), torch.full((2,), -1))[1] == 1.0


def test_orthogonalize_gradient_is_the_losss_and_spreads_directions():
    F0 = torch.randn(12, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    F = F0.clone().requires_grad_(True)
    dots = F @ F.T
    loss = (dots**2).sum() - (dots.diagonal() ** 2).sum() + 12 * ((dots.diagonal() - 1) ** 2).sum()
    loss.backward()
    sq = (F0 * F0).sum(dim=1, keepdim=True)
    torch.testing.assert_close(4 * (F0 @ (F0.T @ F0) - sq * F0) + 4 * 12 * (sq - 1) * F0, F.grad)
    unit = F0 / F0.norm(dim=1, keepdim=True)
    after = orthogonalize(unit.float(), steps=200, lr=0.01)
    torch.testing.assert_close(after.norm(dim=1), torch.ones(12))
    off = ~torch.eye(12, dtype=torch.bool)
    assert (after @ after.T)[off].abs().max() < (unit @ unit.T)[off].abs().max().float()


# ---------------------------------------------------------------- config


def test_config_defaults_and_relevant_keys():
    cfg = load_config(None, ["source.kind=synth"]).source
    assert (cfg.d, cfg.n_features, cfg.firing, cfg.hierarchy_roots, cfg.correlation_rank) == (256, 4096, "zipfian", 32, 25)
    rel = cfg.relevant()
    assert rel["kind"] == "synth" and rel["n_features"] == 4096 and "firing_exponent" in rel and "prob_decay" not in rel
    folder = load_config(None, ["source.kind=synth", "source.path=/some/folder"]).source
    assert folder.relevant() == {"kind": "synth", "path": "/some/folder", "seed": 0}
    toy = load_config(None, []).source.relevant()  # toy run ids do not see the synth keys
    assert not any(k.startswith(("firing", "hierarchy", "magnitude_mean", "correlation_", "orthogonalize")) for k in toy)


@pytest.mark.parametrize(
    "sets, needle",
    [
        (["source.firing_max=0.3"], "applies to kind 'synth' only"),  # a synth key with kind toy
        (["source.kind=synth", "source.prob_decay=0.9"], "applies to kind 'toy' only"),
        (["source.kind=synth", "source.sparsity=0.5"], "applies to kinds 'tms' and 'compute' only"),
        (["source.kind=synth", "source.path=/f", "source.hierarchy_roots=3"], "cannot be given with source.path"),
        (["source.kind=synth", "source.firing_min=0.5"], "firing_min"),
        (["source.kind=synth", "source.firing=power"], "firing"),
        (["source.kind=synth", "source.hierarchy_branching=1"], "hierarchy_branching"),
        (["source.kind=synth", "source.correlation_rank=-1"], "correlation_rank"),
        (["source.kind=synth", "source.exclusive_portion=1.5"], "exclusive_portion"),
        (["source.kind=synth", "source.magnitude_std=nan"], "magnitude_std"),
        (["source.kind=tms", "source.path=/f"], "source.path applies"),
    ],
)
def test_config_refusals(sets, needle):
    with pytest.raises(InputError, match=needle.replace(".", r"\.")):
        load_config(None, sets)


def test_make_source_builds_synth_from_keys():
    cfg = load_config(None, ["source.kind=synth", "source.d=12", "source.n_features=40", "source.hierarchy_roots=2",
                             "source.orthogonalize_steps=0", "source.correlation_rank=0"]).source
    src = make_source(cfg)
    assert isinstance(src, SynthSource) and (src.d, src.n_features) == (12, 40) and src.model.factor is None


# ---------------------------------------------------------------- SAELens folders written by hand

_HIERARCHY = {"roots": [
    {"feature_index": 0, "mutually_exclusive_children": True, "scale_children_by_parent": True, "feature_id": None,
     "children": [{"feature_index": 2, "children": []}, {"feature_index": 3, "children": []}]},
    {"feature_index": 1, "children": [  # an organisational node without a feature: its children hang from feature 1
        {"feature_index": None, "mutually_exclusive_children": True, "children": [{"feature_index": 4}, {"feature_index": 5}]}]},
]}


def _folder_config() -> dict:
    return {
        "num_features": 6, "hidden_dim": 4,
        "firing_probability": {"generator_name": "constant", "probability": 0.5},
        "hierarchy": {"total_root_nodes": 2, "branching_factor": 2, "max_depth": 2, "mutually_exclusive_portion": 1.0,
                      "mutually_exclusive_min_depth": 0, "mutually_exclusive_max_depth": None,
                      "compensate_probabilities": False, "scale_children_by_parent": False},
        "orthogonalization": None,
        "correlation": {"rank": 2, "correlation_scale": 0.1, "seed": None},
        "std_firing_magnitudes": {"generator_name": "folded_normal", "mean": 0.3, "std": 0.2, "min_value": None, "max_value": None},
        "mean_firing_magnitudes": {"generator_name": "linear", "start": 2.0, "end": 1.0},
        "bias": 0.5, "dtype": "float32", "seed": 11,
    }


def _folder_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    vectors = torch.randn(6, 4, generator=g)
    factor = 0.3 * torch.randn(6, 2, generator=g)
    return {
        "feature_vectors": 2 * vectors / vectors.norm(dim=1, keepdim=True),  # norm 2: codes multiply these vectors
        "bias": torch.tensor([0.5, 0.0, 0.0, 0.0]),
        "firing_probabilities": torch.tensor([0.9, 0.5, 0.6, 0.7, 0.4, 0.8]),
        "correlation_factor": factor,
        "correlation_diag": 1 - (factor**2).sum(dim=1),
    }


def write_folder(path: Path, config: dict | None = None, tensors: dict | None = None, hierarchy: object = _HIERARCHY) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "synthetic_model_config.json").write_text(json.dumps(_folder_config() if config is None else config))
    save_file(_folder_tensors() if tensors is None else tensors, str(path / "synthetic_model.safetensors"))
    if hierarchy is not None:
        (path / "hierarchy.json").write_text(hierarchy if isinstance(hierarchy, str) else json.dumps(hierarchy))
    return path


def test_folder_round_trip(tmp_path):
    folder = write_folder(tmp_path / "model")
    src = make_source(load_config(None, ["source.kind=synth", f"source.path={folder}", "source.d=4"]).source)
    t = _folder_tensors()
    torch.testing.assert_close(src.feature_norms, torch.full((6,), 2.0))
    torch.testing.assert_close(src.ground_truth, t["feature_vectors"] / 2)
    assert torch.equal(src.bias, t["bias"]) and torch.equal(src.sampling_probs, t["firing_probabilities"].double())
    assert src.parent.tolist() == [-1, -1, 0, 0, 1, 1]
    assert src.exclusive_group.tolist() == [-1, -1, 0, 0, 1, 1]
    assert src.mutually_exclusive.tolist() == [True, False, False, False, False, False]  # the organisational node holds group 1
    assert src.model.rescale.tolist() == [False, False, True, True, False, False]
    # SAELens's magnitudes: mean linspace(2, 1, 6); std |0.3 + 0.2 N(0, 1)| drawn by torch.Generator seeded seed + 1 = 12
    torch.testing.assert_close(src.magnitude_mean, torch.linspace(2.0, 1.0, 6))
    torch.testing.assert_close(src.magnitude_std, (0.3 + torch.randn(6, generator=torch.Generator().manual_seed(12)) * 0.2).abs())
    torch.testing.assert_close(src.model.factor, t["correlation_factor"])
    x, codes = src.batch_with_codes(500, 0)
    torch.testing.assert_close(codes @ t["feature_vectors"] + t["bias"], x, atol=1e-5, rtol=1e-5)
    on = codes > 0
    assert int((on[:, 2] & on[:, 3]).sum()) == 0 and int((on[:, 4] & on[:, 5]).sum()) == 0
    assert int((on[:, 4] & ~on[:, 1]).sum()) == 0
    with pytest.raises(InputError, match="source.d is 5"):
        make_source(load_config(None, ["source.kind=synth", f"source.path={folder}", "source.d=5"]).source)


def _corrupt(kind: str, tmp: Path) -> Path:
    """A folder with one thing wrong."""
    folder = tmp / kind
    cfg, tensors = _folder_config(), _folder_tensors()
    if kind == "missing weights":
        write_folder(folder)
        (folder / "synthetic_model.safetensors").unlink()
        return folder
    if kind == "not json":
        write_folder(folder)
        (folder / "synthetic_model_config.json").write_text('{"num_features": 6,')
        return folder
    if kind == "nan in json":
        write_folder(folder)
        (folder / "synthetic_model_config.json").write_text(json.dumps(cfg).replace('"bias": 0.5', '"bias": NaN'))
        return folder
    if kind == "corrupt weights":
        write_folder(folder)
        (folder / "synthetic_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
        return folder
    if kind == "deep hierarchy json":
        return write_folder(folder, hierarchy="[" * 100_000 + "]" * 100_000)
    edits = {
        "unknown generator": lambda: cfg.update(firing_probability={"generator_name": "power", "alpha": 1}),
        "unknown key": lambda: cfg.update(colour="red"),
        "huge size": lambda: cfg.update(num_features=2**40),
        "wrong shape": lambda: tensors.update(feature_vectors=torch.ones(6, 5)),
        "nan in weights": lambda: tensors["feature_vectors"].__setitem__((1, 2), float("nan")),
        "negative diag": lambda: tensors.update(correlation_diag=-tensors["correlation_diag"]),
        "unknown tensor": lambda: tensors.update(extra=torch.ones(1)),
        "probability above 1": lambda: tensors["firing_probabilities"].__setitem__(0, 1.5),
    }
    if kind in edits:
        edits[kind]()
        return write_folder(folder, cfg, tensors)
    trees = {
        "index out of range": {"roots": [{"feature_index": 9}]},
        "repeated index": {"roots": [{"feature_index": 0, "children": [{"feature_index": 2, "children": [{"feature_index": 0}]}]}]},
        "boolean index": {"roots": [{"feature_index": True}]},
        "one exclusive child": {"roots": [{"feature_index": 0, "mutually_exclusive_children": True, "children": [{"feature_index": 1}]}]},
        "not a forest": [1, 2],
        "missing hierarchy": None,
    }
    return write_folder(folder, cfg, tensors, trees[kind])


CORRUPT = {
    "missing weights": "missing synthetic_model.safetensors",
    "not json": "not valid JSON",
    "nan in json": "not a number",
    "corrupt weights": "cannot read safetensors",
    "deep hierarchy json": "not valid JSON",
    "unknown generator": "unknown firing_probability generator 'power'",
    "unknown key": "unknown key 'colour'",
    "huge size": "too large",
    "wrong shape": "feature_vectors",
    "nan in weights": "NaN",
    "negative diag": "diagonal must be > 0",
    "unknown tensor": "unknown tensor 'extra'",
    "probability above 1": "[0, 1]",
    "index out of range": "feature_index 9",
    "repeated index": "appears twice",
    "boolean index": "feature_index True",
    "one exclusive child": "at least 2 children",
    "not a forest": "'roots'",
    "missing hierarchy": "missing hierarchy.json",
}


@pytest.mark.parametrize("kind", sorted(CORRUPT))
def test_corrupt_folders_are_refused_in_one_line(tmp_path, kind):
    folder = _corrupt(kind, tmp_path)
    with pytest.raises(InputError) as err:
        make_source(load_config(None, ["source.kind=synth", f"source.path={folder}"]).source)
    assert CORRUPT[kind] in str(err.value) and "\n" not in str(err.value)


def test_missing_folder_is_refused(tmp_path):
    with pytest.raises(InputError, match="synthetic model folder not found"):
        SynthSource.from_folder(tmp_path / "nowhere")


# ---------------------------------------------------------------- the command line


def _saekit(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    return subprocess.run([sys.executable, "-m", "saekit.cli", *args], capture_output=True, text=True, env=env, timeout=300)


TINY_SYNTH = ["source.kind=synth", "source.d=16", "source.n_features=64", "source.hierarchy_roots=2", "source.orthogonalize_steps=5",
              "sae.dict_size=32", "train.samples=4096", "train.eval_samples=2048"]


def test_train_on_synth_reports_ground_truth_metrics(tmp_path):
    r = _saekit("train", *[a for s in TINY_SYNTH for a in ("--set", s)], "--out", str(tmp_path / "out"), "--json", "--no-progress")
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)
    assert 0 <= row["mmcs"] <= 1 and 0 <= row["recovered_0_9"] <= 1 and row["n_true_features"] == 64
    info = json.loads((tmp_path / "out" / "source.json").read_text())
    assert info["n_features"] == 64 and info["expected_active"] > 0


@pytest.mark.parametrize("kind", ["repeated index", "nan in weights", "missing weights"])
def test_train_refuses_a_corrupt_folder_with_exit_2(tmp_path, kind):
    folder = _corrupt(kind, tmp_path)
    out = tmp_path / "out"
    r = _saekit("train", "--set", "source.kind=synth", "--set", f"source.path={folder}", "--out", str(out), "--json", "--no-progress")
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and CORRUPT[kind] in lines[0] and "Traceback" not in r.stderr and r.stdout == ""
