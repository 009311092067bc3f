"""The report's SAE: values, gradients, decoder constraint, initialisation, members."""

import pytest
import torch

from saekit.sae import ReluSAE


def _identity_sae(reduction: str) -> ReluSAE:
    sae = ReluSAE(d=2, dict_size=2, seeds=[0], l1=[0.1], l1_reduction=reduction)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2)[None])
        sae.W_dec.copy_(torch.eye(2)[None])
    return sae


def test_loss_terms_hand_computed():
    x = torch.tensor([[1.0, -1.0]])
    sae = _identity_sae("mean")
    x_hat, c = sae(x)
    # c = ReLU(I x) = (1, 0); x_hat = I c = (1, 0); squared error (0, 1) -> mean over d = 0.5.
    torch.testing.assert_close(c, torch.tensor([[[1.0, 0.0]]]))
    terms = sae.loss_terms(x, x_hat, c)
    assert terms["reconstruction"].item() == pytest.approx(0.5)
    assert terms["sparsity"].item() == pytest.approx(0.5)  # mean |c| over 2 latents = 1/2
    assert terms["loss"].item() == pytest.approx(0.5 + 0.1 * 0.5)
    sae_sum = _identity_sae("sum")
    assert sae_sum.loss_terms(x, *sae_sum(x))["sparsity"].item() == pytest.approx(1.0)  # sum over latents


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("decoder_bias", [False, True])
@pytest.mark.parametrize("members", [1, 3])
@pytest.mark.parametrize("decoder_norm", ["unit", "free"])
def test_fused_training_loss_matches_autograd(reduction, decoder_bias, members, decoder_norm):
    torch.manual_seed(0)
    sae = ReluSAE(12, 20, list(range(members)), [0.05 * (k + 1) for k in range(members)], reduction, decoder_bias, decoder_norm).double()
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        if decoder_bias:
            sae.b_dec.normal_(0, 0.3)
        if decoder_norm == "free":  # rows of norms 0.5 .. 2, so the weighting matters
            sae.W_dec.mul_(torch.rand(members, 20, 1, dtype=torch.float64) * 1.5 + 0.5)
    x = torch.randn(16, 12, dtype=torch.float64, requires_grad=True)
    fused = sae.training_loss(x)
    fused["loss"].sum().backward()
    grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    gx = x.grad.clone()
    sae.zero_grad()
    x.grad = None
    ref = sae.loss_terms(x, *sae(x))
    ref["loss"].sum().backward()
    for key in ("reconstruction", "sparsity", "loss"):
        torch.testing.assert_close(fused[key], ref[key])
    for n, p in sae.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, msg=n)
    torch.testing.assert_close(gx, x.grad)


def test_init_unit_decoder_encoder_transposed_and_seeded():
    sae = ReluSAE(8, 16, [3, 4], [0.1, 0.1])
    torch.testing.assert_close(sae.W_dec.norm(dim=2), torch.ones(2, 16))
    torch.testing.assert_close(sae.W_enc, sae.W_dec.transpose(1, 2))
    assert torch.equal(sae.W_dec[0], ReluSAE(8, 16, [3], [0.1]).W_dec[0])
    assert not torch.equal(sae.W_dec[0], sae.W_dec[1])
    assert sae.b_dec is None and torch.count_nonzero(sae.b_enc) == 0


def test_parallel_gradient_removed_and_rows_renormalised():
    sae = ReluSAE(8, 16, [0], [0.1])
    x = torch.rand(32, 8)
    sae.training_loss(x)["loss"].sum().backward()
    assert (sae.W_dec.grad * sae.W_dec).sum(dim=2).abs().max() > 1e-6  # there was a parallel part
    sae.remove_parallel_grad()
    torch.testing.assert_close((sae.W_dec.grad * sae.W_dec).sum(dim=2), torch.zeros(1, 16), atol=1e-7, rtol=0)
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.normalize_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=2), torch.ones(1, 16))


def test_members_are_independent():
    """Member k of an ensemble computes what the SAE with member k's seed and l1 computes alone."""
    x = torch.rand(10, 8)
    pair = ReluSAE(8, 16, [1, 2], [0.1, 0.3])
    alone = ReluSAE(8, 16, [2], [0.3])
    t_pair, t_alone = pair.training_loss(x), alone.training_loss(x)
    torch.testing.assert_close(t_pair["loss"][1], t_alone["loss"][0])
    t_pair["loss"].sum().backward()
    t_alone["loss"].sum().backward()
    torch.testing.assert_close(pair.W_enc.grad[1], alone.W_enc.grad[0])


def test_directions_are_unit_rows():
    sae = ReluSAE(8, 16, [0], [0.1])
    with torch.no_grad():
        sae.W_dec.mul_(2.0)
    torch.testing.assert_close(sae.directions().norm(dim=2), torch.ones(1, 16))


def test_resample_latents_reinitialises_only_the_dead():
    torch.manual_seed(0)
    sae = ReluSAE(8, 6, [0, 1], [0.1, 0.1])
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    x = torch.rand(32, 8)
    sae.training_loss(x)["loss"].sum().backward()
    opt.step()
    sae.normalize_decoder()
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    moments_before = opt.state[sae.W_dec]["exp_avg"].clone()
    assert moments_before.abs().sum() > 0
    dead = torch.zeros(2, 6, dtype=torch.bool)
    dead[0, [1, 4]] = True
    # Only one input has any reconstruction error worth sampling: make the others exactly reconstructable (zero).
    inputs = torch.zeros(5, 8)
    inputs[3] = torch.arange(1.0, 9.0)
    g = torch.Generator().manual_seed(0)
    assert sae.resample_latents(dead, inputs, opt, g) == 2
    direction = inputs[3] / inputs[3].norm()
    for j in (1, 4):
        torch.testing.assert_close(sae.W_dec[0, j], direction)  # the normalised high-loss input
        assert sae.b_enc[0, j].item() == 0.0
        for key in ("exp_avg", "exp_avg_sq"):
            assert opt.state[sae.W_dec][key][0, j].abs().sum() == 0
            assert opt.state[sae.W_enc][key][0, :, j].abs().sum() == 0
    live = [0, 2, 3, 5]
    # encoder column = direction * 0.2 * mean norm of the live encoder columns (Towards Monosemanticity)
    expected_scale = 0.2 * before["W_enc"][0][:, live].norm(dim=0).mean()
    torch.testing.assert_close(sae.W_enc[0][:, 1], direction * expected_scale)
    torch.testing.assert_close(sae.W_dec[0, live], before["W_dec"][0, live])
    torch.testing.assert_close(sae.W_dec[1], before["W_dec"][1])  # the other member is untouched
    torch.testing.assert_close(opt.state[sae.W_dec]["exp_avg"][:, live], moments_before[:, live])


def test_training_with_resampling_revives_dead_latents():
    from saekit.config import TrainConfig
    from saekit.sources import ToySource
    from saekit.train.loop import train

    src = ToySource(d=16, n_features=20, mean_active=2, seed=0)
    results = {}
    for every in (0, 20_000):
        sae = ReluSAE(16, 64, [0], [30.0])  # a penalty strong enough to kill latents
        state = train(sae, src, TrainConfig(samples=200_000, lr=3e-3, resample_every=every, resample_until=0.9), progress=False)
        results[every] = state.resampled
    assert results[0] == 0 and results[20_000] > 0
