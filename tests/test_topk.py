"""TopK and BatchTopK SAEs: the k-sparse codes, the batch threshold, AuxK by hand, checkpoints, sweeps over k, recovery."""

from __future__ import annotations

import math

import pytest
import torch

from saekit.config import Config, parse_config
from saekit.io import load_sae, save_checkpoint
from saekit.sae import ARCHITECTURES, BatchTopKSAE, TopKSAE
from saekit.sae.sparse_decode import decode_path
from saekit.sources import make_source
from saekit.train.evaluate import evaluate
from saekit.train.loop import make_state, optimisation_step, train
from saekit.train.run import run_config


def _identity(cls: type[TopKSAE], d: int, k: list[int], **kwargs) -> TopKSAE:
    """An SAE whose encoder and decoder are the identity (m = d) and biases zero: pre-activations = x."""
    sae = cls(d, d, list(range(len(k))), k, decoder_bias=False, **kwargs)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d).expand(len(k), d, d))
        sae.W_dec.copy_(torch.eye(d).expand(len(k), d, d))
    return sae


# -- TopK ---------------------------------------------------------------------------------------


def test_topk_keeps_the_k_largest_per_sample_with_per_member_k():
    sae = _identity(TopKSAE, 4, [2, 3])
    x = torch.tensor([[4.0, 3.0, 2.0, 1.0], [0.5, 2.0, 1.5, 3.0]])
    x_hat, c = sae(x)
    # pre-activations = x; member 0 keeps the 2 largest of each row, member 1 the 3 largest
    expected = torch.tensor(
        [
            [[4.0, 3.0, 0.0, 0.0], [0.0, 2.0, 0.0, 3.0]],
            [[4.0, 3.0, 2.0, 0.0], [0.0, 2.0, 1.5, 3.0]],
        ]
    )
    torch.testing.assert_close(c, expected)
    torch.testing.assert_close(x_hat, expected)  # identity decoder, no bias
    torch.testing.assert_close(sae.encode(x), expected)
    torch.testing.assert_close(sae.decode(c), expected)


def test_topk_exactly_k_nonzero_codes_on_random_inputs():
    torch.manual_seed(0)
    sae = TopKSAE(16, 64, [0, 1, 2], [1, 5, 12])
    with torch.no_grad():
        sae.b_enc.fill_(10.0)  # every pre-activation positive, so the ReLU removes none of the top k
    c = sae.training_loss(torch.randn(32, 16))["codes"]
    assert (c != 0).sum(dim=2).tolist() == [[1] * 32, [5] * 32, [12] * 32]


def test_topk_relu_drops_negative_top_values():
    sae = _identity(TopKSAE, 3, [2])
    _, c = sae(torch.tensor([[1.0, -1.0, -2.0]]))
    # top 2 = (1, -1); ReLU(-1) = 0, so one nonzero
    torch.testing.assert_close(c, torch.tensor([[[1.0, 0.0, 0.0]]]))


def test_training_loss_values_and_firing_counts():
    sae = _identity(TopKSAE, 3, [1], dead_after=5)
    x = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.5, 3.0]])
    terms = sae.training_loss(x)
    # keeps 2 (latent 0) and 3 (latent 2); errors (0, 1, 0) and (0, 0.5, 0): mean over 6 entries = 1.25 / 6
    assert terms["reconstruction"].item() == pytest.approx(1.25 / 6)
    assert terms["sparsity"].item() == 0.0  # nothing dead yet: no AuxK
    assert terms["loss"].item() == pytest.approx(1.25 / 6)
    # latents 0 and 2 fired in this batch of 2 samples; latent 1 did not
    assert sae.samples_since_fired.tolist() == [[0, 2, 0]]


def _auxk_case(aux_k: int) -> TopKSAE:
    """m = 4 latents on d = 2: e1, e2, (e1+e2)/sqrt2, (e1-e2)/sqrt2; k = 1; latents 1 and 2 dead (10 >= dead_after),
    latent 3 one sample short of dead (9)."""
    sae = TopKSAE(2, 4, [0], [1], aux_k=aux_k, aux_coef=0.25, dead_after=10, decoder_bias=False)
    r = 1 / math.sqrt(2)
    rows = torch.tensor([[1.0, 0.0], [0.0, 1.0], [r, r], [r, -r]])
    with torch.no_grad():
        sae.W_dec.copy_(rows[None])
        sae.W_enc.copy_(rows.T[None])
        sae.samples_since_fired.copy_(torch.tensor([[0, 10, 10, 9]]))
    return sae


@pytest.mark.parametrize(("aux_k", "expected_aux"), [(2, 4.0), (1, 2.5)])
def test_auxk_by_hand(aux_k, expected_aux):
    sae = _auxk_case(aux_k)
    x = torch.tensor([[3.0, 1.0]])
    assert sae.dead_latents().tolist() == [[False, True, True, False]]
    terms = sae.training_loss(x)
    # pre-activations: (3, 1, 4/sqrt2 = 2.83, 2/sqrt2 = 1.41). Top 1: latent 0 -> x_hat = (3, 0), residual e = (0, 1):
    # reconstruction = (0 + 1) / 2 = 0.5.
    # Dead latents 1 (pre 1) and 2 (pre 2.83); latent 3 (1.41) is live although larger than latent 1.
    # aux_k = 2: e_hat = 1 * e2 + 2.83 * (e1+e2)/sqrt2 = (2, 3); AuxK = ((2-0)^2 + (3-1)^2) / 2 = 4.
    # aux_k = 1: only latent 2: e_hat = (2, 2); AuxK = (4 + 1) / 2 = 2.5.
    assert terms["reconstruction"].item() == pytest.approx(0.5)
    assert terms["sparsity"].item() == pytest.approx(expected_aux)
    assert terms["loss"].item() == pytest.approx(0.5 + 0.25 * expected_aux)
    # one more sample counted; latent 0 fired and restarts
    assert sae.samples_since_fired.tolist() == [[0, 11, 11, 10]]


def test_auxk_gradient_reaches_only_dead_latents():
    sae = _auxk_case(2)
    x = torch.tensor([[3.0, 1.0]])
    pre = sae.pre_activations(x)
    x_hat, _, _ = sae.train_reconstruction(pre)
    sae.auxk_loss(pre, sae.dead_latents(), (x - x_hat).detach()).sum().backward()
    # the residual is detached and live latents are masked out: latents 0 and 3 get no gradient from AuxK
    for live in (0, 3):
        assert torch.all(sae.W_enc.grad[0, :, live] == 0) and torch.all(sae.W_dec.grad[0, live] == 0)
    for dead in (1, 2):
        assert sae.W_dec.grad[0, dead].abs().sum() > 0


def test_auxk_is_zero_for_members_without_dead_latents():
    sae = TopKSAE(8, 16, [0, 1], [2, 2], dead_after=4)
    with torch.no_grad():
        sae.samples_since_fired[1].fill_(4)  # member 1: every latent dead; member 0: none
    terms = sae.training_loss(torch.randn(3, 8))
    assert terms["sparsity"][0].item() == 0.0
    assert terms["sparsity"][1].item() > 0.0


def test_members_match_single_saes():
    """Member i of an ensemble with different k computes what the SAE with its seed and k computes alone."""
    torch.manual_seed(0)
    ensemble = TopKSAE(8, 32, [3, 4], [2, 6])
    x = torch.randn(5, 8)
    x_hat, c = ensemble(x)
    for i, (seed, k) in enumerate([(3, 2), (4, 6)]):
        alone = TopKSAE(8, 32, [seed], [k])
        x_hat_1, c_1 = alone(x)
        torch.testing.assert_close(x_hat[i : i + 1], x_hat_1)
        torch.testing.assert_close(c[i : i + 1], c_1)
        torch.testing.assert_close(ensemble.member(i)(x)[1], c_1)


def test_init_unit_decoder_and_transposed_encoder():
    sae = TopKSAE(8, 16, [1], [2])
    torch.testing.assert_close(sae.W_dec.norm(dim=2), torch.ones(1, 16))
    torch.testing.assert_close(sae.W_enc, sae.W_dec.transpose(1, 2))
    assert sae.n_aux == 4  # aux_k None -> d // 2


def test_bad_k_raises():
    with pytest.raises(ValueError, match="k"):
        TopKSAE(8, 16, [0], [17])
    with pytest.raises(ValueError, match="one k per member"):
        TopKSAE(8, 16, [0, 1], [2])


# -- BatchTopK ----------------------------------------------------------------------------------


def test_batchtopk_keeps_k_times_b_across_the_batch():
    sae = _identity(BatchTopKSAE, 3, [1, 2])
    x = torch.tensor([[5.0, 4.5, 0.5], [4.0, 3.0, 2.0]])
    codes = sae.training_loss(x)["codes"]
    # member 0 keeps k*B = 2 of the 6 activations: 5 and 4.5, both in sample 0 (sample 1 keeps none);
    # member 1 keeps 4: 5, 4.5, 4, 3
    expected = torch.tensor(
        [
            [[5.0, 4.5, 0.0], [0.0, 0.0, 0.0]],
            [[5.0, 4.5, 0.0], [4.0, 3.0, 0.0]],
        ]
    )
    torch.testing.assert_close(codes, expected)
    # the first batch sets the threshold to its smallest kept activation
    assert sae.threshold.tolist() == [4.5, 3.0]


@pytest.mark.parametrize("path", ["sparse", "dense"])
def test_batchtopk_reconstruction_by_hand(path):
    sae = _identity(BatchTopKSAE, 3, [1, 2])
    x = torch.tensor([[5.0, 4.5, 0.5], [4.0, 3.0, 2.0]])
    with decode_path(path):
        rec = sae.training_loss(x)["reconstruction"]
    # identity decoder: x_hat = the codes of the test above. Member 0 errors (0, 0, 0.5), (4, 3, 2): 29.25 / 6;
    # member 1 errors (0, 0, 0.5), (0, 0, 2): 4.25 / 6
    torch.testing.assert_close(rec, torch.tensor([29.25 / 6, 4.25 / 6]))


def test_batchtopk_kb_nonzero_on_random_inputs():
    torch.manual_seed(0)
    sae = BatchTopKSAE(16, 64, [0, 1], [3, 7])
    with torch.no_grad():
        sae.b_enc.fill_(10.0)  # all activations positive
    codes = sae.training_loss(torch.randn(20, 16))["codes"]
    assert (codes != 0).sum(dim=(1, 2)).tolist() == [3 * 20, 7 * 20]


def test_batchtopk_threshold_is_the_running_mean_by_hand():
    """Train a few Adam steps; the threshold equals the running mean, computed by hand, of the (k*B)-th largest
    activation of each batch under the weights of that step; encode() then applies exactly that threshold."""
    torch.manual_seed(0)
    k, B, momentum = 2, 8, 0.3
    sae = BatchTopKSAE(6, 12, [5], [k], threshold_momentum=momentum)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    expected = None
    for _ in range(5):
        x = torch.rand(B, 6)
        with torch.no_grad():
            acts = torch.relu((x - sae.b_dec[0]) @ sae.W_enc[0] + sae.b_enc[0])  # (B, m)
        smallest = acts.flatten().sort(descending=True).values[k * B - 1].item()
        assert smallest > 0
        expected = smallest if expected is None else (1 - momentum) * expected + momentum * smallest
        optimisation_step(sae, opt, x)
    assert sae.threshold.item() == pytest.approx(expected, rel=1e-6)
    x = torch.rand(B, 6)
    with torch.no_grad():
        acts = torch.relu((x - sae.b_dec[0]) @ sae.W_enc[0] + sae.b_enc[0])
        torch.testing.assert_close(sae.encode(x)[0], acts * (acts > expected))


def test_batchtopk_threshold_unset_means_plain_relu():
    sae = _identity(BatchTopKSAE, 3, [1])
    assert sae.threshold.tolist() == [-1.0]
    _, c = sae(torch.tensor([[1.0, -2.0, 0.5]]))
    torch.testing.assert_close(c, torch.tensor([[[1.0, 0.0, 0.5]]]))


# -- checkpoints, resampling, sweeps ------------------------------------------------------------


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_save_load_round_trip(tmp_path, arch):
    torch.manual_seed(0)
    cls = ARCHITECTURES[arch]
    sae = cls(8, 24, [1, 2], [2, 5], aux_k=3, aux_coef=0.5, dead_after=16)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for _ in range(4):  # weights, firing counts (some latents dead after 16 samples) and threshold move
        optimisation_step(sae, opt, torch.randn(8, 8))
    folder = save_checkpoint(tmp_path / "ck", sae, samples=32, optimizer=opt)
    loaded = load_sae(folder)
    assert type(loaded) is cls and loaded.init_kwargs() == sae.init_kwargs()
    for name, tensor in sae.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    assert sae.samples_since_fired.max() >= 16  # the counts survive, not just zeros
    x = torch.randn(10, 8)
    for a, b in zip(sae(x), loaded(x)):
        assert torch.equal(a, b)
    # the training path too (AuxK on the restored dead set, threshold updates)
    ta, tb = sae.training_loss(x), loaded.training_loss(x)
    for key in ("loss", "reconstruction", "sparsity", "codes"):
        assert torch.equal(ta[key], tb[key]), key


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_resampling_uses_the_base_layout_and_restarts_counts(arch):
    torch.manual_seed(0)
    sae = ARCHITECTURES[arch](8, 16, [0], [2], dead_after=4)
    state = make_state(sae, Config().train)
    optimisation_step(sae, state.optimizer, torch.randn(8, 8))
    with torch.no_grad():
        sae.samples_since_fired.fill_(100)
    dead = torch.zeros(1, 16, dtype=torch.bool)
    dead[0, [3, 7]] = True
    g = torch.Generator().manual_seed(0)
    assert sae.resample_latents(dead, torch.randn(64, 8), state.optimizer, g) == 2
    assert sae.samples_since_fired[0, [3, 7]].tolist() == [0, 0]
    assert sae.samples_since_fired[0, 0].item() == 100
    torch.testing.assert_close(sae.W_dec[0, [3, 7]].norm(dim=1), torch.ones(2))
    assert sae.b_enc[0, [3, 7]].tolist() == [0.0, 0.0]


SMALL_SOURCE = {"d": 32, "n_features": 48, "mean_active": 3}


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_sweep_over_k_trains_one_ensemble(tmp_path, arch):
    cfg = parse_config(
        {
            "source": SMALL_SOURCE,
            "sae": {"arch": arch, "dict_size": 96, "k": [4, 8]},
            "train": {"batch_size": 256, "samples": 256 * 20, "eval_samples": 2048},
        }
    )
    rows, errors = run_config(cfg, tmp_path, progress=False)
    assert errors == []
    assert [r["k"] for r in rows] == [4, 8]
    assert rows[0]["ensemble_id"] == rows[1]["ensemble_id"] and rows[0]["ensemble_size"] == 2
    assert all(r["status"] == "done" and r["sparsity_knob"] == "k" for r in rows)
    if arch == "topk":  # at most k latents per sample
        assert 0 < rows[0]["l0"] <= 4 < rows[1]["l0"] <= 8
    for r in rows:
        single = load_sae(r["checkpoint"])
        assert single.k_values == [r["k"]]


# The small case of tests/test_train.py (d=32, G=48, ~3 active features, 96 latents, 1M samples, lr 3e-3)
# with k = 3, the mean number of active features. When chosen (seed 11) it reached MMCS 0.9986 (topk) and
# 0.9988 (batchtopk), every feature recovered at cosine 0.9.
@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_small_case_recovers_the_true_features(arch):
    torch.manual_seed(0)
    cfg = Config.model_validate(
        {
            "source": {**SMALL_SOURCE, "seed": 11},
            "sae": {"arch": arch, "dict_size": 96, "k": 3},
            "train": {"batch_size": 256, "lr": 3e-3, "samples": 1_000_000},
        }
    )
    src = make_source(cfg.source)
    sae = ARCHITECTURES[arch](32, 96, [1011], [3])
    train(sae, src, cfg.train, progress=False)
    metrics = evaluate(sae, src, 20_000, 4096)[0]
    assert metrics["mmcs"] >= 0.97, metrics
    assert metrics["recovered_0_9"] >= 0.9, metrics
