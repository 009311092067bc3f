"""The architecture-independent training options: sparsity knobs as grid axes, keys of other
architectures refused, run ids of earlier versions kept, relu's free decoder, lr and L1 warm-up, and
MMCS tracked over training."""

import re
from pathlib import Path

import pytest
import torch

from saekit.config import KNOWN_ARCHS, TrainConfig, expand_grid, load_config, parse_config
from saekit.errors import InputError
from saekit.metrics import first_reaching, mmcs, mmcs_members
from saekit.sae import ReluSAE
from saekit.train.identity import run_id_for
from saekit.train.loop import lr_factor, make_state, training_step, warmup_factor

TOY = Path(__file__).resolve().parents[1] / "configs" / "toy.yaml"  # not relative to the current directory


def test_run_ids_of_earlier_versions_are_kept():
    """Ids printed by saekit at commit 4f3b419 (before the architectures' keys existed) for the same configs,
    so that a rerun of an old sweep still finds its finished SAEs."""
    cfg = load_config(TOY)
    assert [run_id_for(cfg, s) for s in expand_grid(cfg)] == ["relu-m1024-l1_0.3-s0-61217f36"]
    sets = ["sae.decoder_bias=true", "sae.decoder_bias_init=geometric_median", "train.lr_decay=linear", "source.kind=tms"]
    cfg = load_config(TOY, sets)
    assert [run_id_for(cfg, s) for s in expand_grid(cfg)] == ["relu-m1024-l1_0.3-s0-21a6038e"]


def test_new_options_change_the_run_id():
    base = load_config(TOY)
    ids = {run_id_for(base, expand_grid(base)[0])}
    for extra in (
        ["sae.decoder_norm=free"],
        ["train.lr_warmup=0.05"],
        ["train.l1_warmup=0.05"],
        ["sae.decoder_norm=free", "sae.decoder_init_norm=0.1"],
    ):
        cfg = load_config(TOY, extra)
        ids.add(run_id_for(cfg, expand_grid(cfg)[0]))
    assert len(ids) == 5


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        ({"arch": "relu", "k": 4}, "sae.k applies to topk, batchtopk, matryoshka only"),
        ({"arch": "batchtopk", "prefix_fractions": [0.5, 1.0]}, "sae.prefix_fractions applies to matryoshka only"),
        ({"arch": "matryoshka", "prefix_fractions": [0.5, 0.25, 1.0]}, "prefix_fractions must increase strictly"),
        ({"arch": "matryoshka", "prefix_fractions": [0.25, 0.5]}, "prefix_fractions must be fractions in (0, 1] ending at 1"),
        # 0.05 x 8 = 0.4 rounds to 0 latents; the check runs for every dict_size of the grid
        ({"arch": "matryoshka", "dict_size": [64, 8], "prefix_fractions": [0.05, 1.0]}, "of dict_size 8 give prefix widths [0, 8]"),
        ({"arch": "relu", "l0_coef": 0.1}, "sae.l0_coef applies to jumprelu only"),
        ({"arch": "topk", "l1": 0.5}, "sae.l1 applies to relu, gated only"),
        ({"arch": "gated", "decoder_norm": "free"}, "sae.decoder_norm applies to relu only"),
        ({"arch": "topk", "decoder_init_norm": 0.1}, "sae.decoder_init_norm applies to relu only"),
        ({"arch": "relu", "decoder_init_norm": 0.1}, "sae.decoder_init_norm 0.1 needs sae.decoder_norm: free"),
        ({"arch": "relu", "decoder_norm": "free", "decoder_init_norm": 0.0}, "decoder_init_norm"),
        ({"arch": "topk", "k": 0}, "k must be positive"),
        ({"arch": "topk", "k": 64, "dict_size": 32}, "k (64) is larger than dict_size (32)"),
        ({"arch": "jumprelu", "l0_coef": -1.0}, "l0_coef must be a finite number >= 0"),
    ],
)
def test_keys_that_do_not_apply_are_refused(sets, message):
    with pytest.raises(InputError, match=re.escape(message)):
        parse_config({"sae": sets})


def test_each_architecture_sweeps_its_own_knob():
    cfg = parse_config({"sae": {"arch": "topk", "k": [4, 8], "dict_size": [64, 128]}})
    specs = expand_grid(cfg)
    assert [(s.dict_size, s.knob, s.knob_value) for s in specs] == [(64, "k", 4), (64, "k", 8), (128, "k", 4), (128, "k", 8)]
    assert isinstance(specs[0].knob_value, int)
    assert run_id_for(cfg, specs[0]).startswith("topk-m64-k_4-s0-")
    cfg = parse_config({"sae": {"arch": "jumprelu", "l0_coef": [0.01, 0.1]}})
    assert [s.knob_value for s in expand_grid(cfg)] == [0.01, 0.1]


def test_full_dump_of_a_config_reloads():
    """A run's stored config (model_dump, every key) validates again for every architecture."""
    for arch in KNOWN_ARCHS:
        cfg = parse_config({"sae": {"arch": arch}})
        assert parse_config(cfg.model_dump()) == cfg


def test_free_decoder_weights_the_l1_term_by_decoder_norms():
    """d = 2, m = 2, one member: decoder rows of norm 2 and 3 (the identity scaled), encoder the identity, no bias.
    x = (1, 4): codes (1, 4), L1 term with the mean reduction = (1*2 + 4*3) / 2 = 7 (by hand)."""
    sae = ReluSAE(d=2, dict_size=2, seeds=[0], l1=[1.0], decoder_norm="free")
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2)[None])
        sae.W_dec.copy_(torch.diag(torch.tensor([2.0, 3.0]))[None])
    x = torch.tensor([[1.0, 4.0]])
    x_hat, c = sae(x)
    assert c.tolist() == [[[1.0, 4.0]]]
    terms = sae.loss_terms(x, x_hat, c)
    assert terms["sparsity"].item() == pytest.approx(7.0)
    # reconstruction: x_hat = (2, 12), error (1, 8), mean square = 65 / 2
    assert terms["reconstruction"].item() == pytest.approx(32.5)
    assert sae.directions()[0].tolist() == [[1.0, 0.0], [0.0, 1.0]]


def test_a_free_decoder_starts_at_its_init_norm_with_the_encoder_its_transpose():
    sae = ReluSAE(d=8, dict_size=16, seeds=[0, 1], l1=[0.1, 0.1], decoder_norm="free", decoder_init_norm=0.1)
    torch.testing.assert_close(sae.W_dec.norm(dim=2), torch.full((2, 16), 0.1))
    torch.testing.assert_close(sae.W_enc, sae.W_dec.transpose(1, 2))
    unit = ReluSAE(d=8, dict_size=16, seeds=[0, 1], l1=[0.1, 0.1])
    torch.testing.assert_close(sae.directions(), unit.directions())  # the same directions, a tenth of the length
    assert sae.init_kwargs()["decoder_init_norm"] == 0.1
    with pytest.raises(ValueError, match="decoder_init_norm"):
        ReluSAE(d=8, dict_size=16, seeds=[0], l1=[0.1], decoder_init_norm=0.5)  # unit rows start at 1


def test_free_decoder_is_not_renormalised_and_unit_decoder_is():
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    for norm, unit_after in (("unit", True), ("free", False)):
        sae = ReluSAE(d=8, dict_size=16, seeds=[0], l1=[0.1], decoder_norm=norm)
        state = make_state(sae, TrainConfig(lr=0.05))
        training_step(state, x, source=None, cfg=TrainConfig(lr=0.05), n_steps=10)
        norms = sae.W_dec.detach().norm(dim=2)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5) == unit_after


def test_free_decoder_gradient_matches_finite_differences():
    """The fused path of the free decoder (the L1 term weighted by row norms), in float64 against finite differences."""
    sae = ReluSAE(d=3, dict_size=4, seeds=[1], l1=[0.5], decoder_norm="free", decoder_bias=True).double()
    x = torch.rand(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) + 0.5

    W_dec = sae.W_dec.detach().clone().requires_grad_()
    del sae.W_dec  # the parameter becomes the gradcheck input

    def loss(w: torch.Tensor) -> torch.Tensor:
        sae.W_dec = w
        return sae.training_loss(x)["loss"].sum()

    assert torch.autograd.gradcheck(loss, (W_dec,))


def test_warmup_factor_by_hand():
    """Linear warm-up over 10% of 100 steps = 10 steps: step t gets (t + 1) / 10."""
    assert [warmup_factor(t, 100, 0.1) for t in (0, 4, 9, 10, 99)] == pytest.approx([0.1, 0.5, 1.0, 1.0, 1.0])
    assert warmup_factor(0, 100, 0.0) == 1.0


def test_lr_warmup_and_decay_combine():
    """100 steps, warm-up over the first 10, linear decay over the last 20: (t+1)/10, then 1, then (100-t)/20."""
    cfg = TrainConfig(lr_warmup=0.1, lr_decay="linear", lr_decay_fraction=0.2)
    assert [lr_factor(t, 100, cfg) for t in (0, 9, 50, 80, 90, 99)] == pytest.approx([0.1, 1.0, 1.0, 1.0, 0.5, 0.05])


def test_l1_warmup_scales_the_penalty_in_the_fused_step():
    """With l1_warmup the trainer sets sparsity_scale = (t+1)/warm-up steps; the logged loss of step 0 of 100
    with a 50% warm-up is reconstruction + l1 * sparsity / 50."""
    x = torch.rand(32, 8, generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(l1_warmup=0.5, lr=1e-9)
    sae = ReluSAE(d=8, dict_size=16, seeds=[0], l1=[2.0])
    state = make_state(sae, cfg)
    terms = training_step(state, x, source=None, cfg=cfg, n_steps=100)
    assert sae.sparsity_scale == pytest.approx(1 / 50)
    expected = terms["reconstruction"] + 2.0 / 50 * terms["sparsity"]
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_mmcs_members_equals_mmcs_per_member():
    g = torch.Generator().manual_seed(3)
    truth = torch.nn.functional.normalize(torch.randn(10, 6, generator=g), dim=1)
    dirs = torch.nn.functional.normalize(torch.randn(3, 7, 6, generator=g), dim=2)
    got = mmcs_members(dirs, truth)
    assert got.tolist() == pytest.approx([mmcs(dirs[k], truth) for k in range(3)], abs=1e-6)
    assert mmcs_members(truth[None], truth).item() == pytest.approx(1.0)


def test_first_reaching():
    history = [{"samples": 100, "mmcs": 0.5}, {"samples": 200, "loss": 1.0}, {"samples": 300, "mmcs": 0.96}, {"samples": 400, "mmcs": 0.99}]
    assert first_reaching(history, "mmcs", 0.95) == 300
    assert first_reaching(history, "mmcs", 0.999) is None


@pytest.mark.parametrize("seed", [21, 22])
def test_free_decoder_with_warmups_recovers_the_true_features(seed):
    """Anthropic's 2024 recipe on the small toy case of test_train (d=32, G=48, 96 latents, 1M samples): free decoder,
    L1 weighted by decoder norms, 5% L1 and lr warm-up. Probe seeds 0 and 1 gave MMCS 0.998 at L1 1.0 (L0 3.7)."""
    from saekit.config import Config
    from saekit.sources import make_source
    from saekit.train.evaluate import evaluate
    from saekit.train.loop import train

    cfg = Config.model_validate(
        {
            "source": {"d": 32, "n_features": 48, "mean_active": 3, "seed": seed},
            "train": {"batch_size": 256, "lr": 3e-3, "samples": 1_000_000, "l1_warmup": 0.05, "lr_warmup": 0.05},
        }
    )
    src = make_source(cfg.source)
    sae = ReluSAE(32, 96, [seed + 1000], [1.0], decoder_norm="free")
    train(sae, src, cfg.train, progress=False)
    metrics = evaluate(sae, src, 20_000, 4096)[0]
    assert metrics["mmcs"] >= 0.97, metrics
    assert metrics["recovered_0_9"] >= 0.9, metrics
    assert not torch.allclose(sae.W_dec.norm(dim=2), torch.ones(1, 96), atol=1e-3)  # the decoder really was free


def test_a_topk_sweep_is_analysed_by_its_k_and_archs_do_not_mix(tmp_path):
    """The estimate, its summary and the recommended run speak of k for a TopK sweep; a folder holding two
    architectures is refused by the analysis (their knobs are different quantities)."""
    from saekit.analysis import load_sweep
    from saekit.pipeline import analyse_and_report, recommended_run
    from saekit.train.run import run_config

    small = ["source.d=16", "source.n_features=24", "source.mean_active=2", "train.samples=60000", "train.eval_samples=5000"]
    cfg = load_config(None, [*small, "sae.arch=topk", "sae.k=[2,3]", "sae.dict_size=[24,48]", "train.seeds=[0,1]"])
    results, errors = run_config(cfg, tmp_path, progress=False)
    assert not errors and all(r["l1"] is None and r["sparsity_knob"] == "k" and r["k"] in (2, 3) for r in results)
    result, report = analyse_and_report(tmp_path)
    assert result["knob"] == "k" and result["l1"] is None and result["k"] in (2, 3)
    assert f"at k = {result['k']}" in result["summary"] and "L1" not in result["summary"]
    chosen = recommended_run(results, result)
    assert (chosen["dict_size"], chosen["k"]) == (result["dict_size"], result["k"])
    page = report.read_text()
    assert "k = " in page and "sparsity losses vs k" in page and "For each k," in page and "α" not in page
    relu = load_config(None, [*small, "sae.dict_size=24"])
    run_config(relu, tmp_path, progress=False)
    with pytest.raises(InputError, match="mixes architectures"):
        load_sweep(tmp_path)
