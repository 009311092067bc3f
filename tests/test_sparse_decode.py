"""Sparse decoding of k-sparse codes: values by hand, gradients against autograd through the dense path."""

from __future__ import annotations

import pytest
import torch

from saekit.sae import sparse_decode as sd
from saekit.sae.sparse_decode import decode_path, decode_topk, dense_decode, prefers_sparse, sparse_decode


def _tiny() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K=1, B=2, m=4, d=3: W_dec rows r0..r3, sample 0 keeps latents (2, 0), sample 1 keeps (3, 1)."""
    W = torch.tensor([[[1.0, 0.0, 2.0], [0.0, 1.0, 0.0], [3.0, -1.0, 1.0], [1.0, 1.0, 1.0]]])
    values = torch.tensor([[[2.0, 0.5], [1.0, 3.0]]])
    indices = torch.tensor([[[2, 0], [3, 1]]])
    return values, indices, W


def test_forward_by_hand() -> None:
    values, indices, W = _tiny()
    out = sparse_decode(values, indices, W)
    # sample 0: 2*r2 + 0.5*r0 = (6, -2, 2) + (0.5, 0, 1) = (6.5, -2, 3)
    # sample 1: 1*r3 + 3*r1 = (1, 1, 1) + (0, 3, 0) = (1, 4, 1)
    expected = torch.tensor([[[6.5, -2.0, 3.0], [1.0, 4.0, 1.0]]])
    assert torch.equal(out, expected)
    assert torch.equal(dense_decode(values, indices, W), expected)


def test_members_use_their_own_decoder() -> None:
    # K=2: member 1's decoder is member 0's times 10, same codes, so its output is 10x member 0's (6.5, -2, 3), (1, 4, 1).
    values, indices, W = _tiny()
    out = sparse_decode(values.expand(2, -1, -1), indices.expand(2, -1, -1), torch.cat([W, 10 * W]))
    assert torch.equal(out[0], torch.tensor([[6.5, -2.0, 3.0], [1.0, 4.0, 1.0]]))
    assert torch.equal(out[1], torch.tensor([[65.0, -20.0, 30.0], [10.0, 40.0, 10.0]]))


def test_gradients_by_hand() -> None:
    values, indices, W = _tiny()
    values.requires_grad_()
    W.requires_grad_()
    g = torch.tensor([[[1.0, 2.0, 0.0], [0.0, 0.0, 1.0]]])  # dL/dout
    sparse_decode(values, indices, W).backward(g)
    # dL/dvalues[b, j] = g[b] . W[idx[b, j]]: g0.r2 = 3 - 2 = 1, g0.r0 = 1; g1.r3 = 1, g1.r1 = 0
    assert torch.equal(values.grad, torch.tensor([[[1.0, 1.0], [1.0, 0.0]]]))
    # dL/dW[r] = sum of values * g over the samples that kept r: r0 = 0.5*g0, r1 = 3*g1, r2 = 2*g0, r3 = 1*g1
    expected = torch.tensor([[[0.5, 1.0, 0.0], [0.0, 0.0, 3.0], [2.0, 4.0, 0.0], [0.0, 0.0, 1.0]]])
    assert torch.equal(W.grad, expected)


def _grads(fn, values: torch.Tensor, indices: torch.Tensor, W: torch.Tensor, weight: torch.Tensor):
    v = values.clone().requires_grad_()
    w = W.clone().requires_grad_()
    out = fn(v, indices, w)
    (out * weight).sum().backward()
    return out.detach(), v.grad, w.grad


# (K, B, m, d, k): K > 1, k = 1, k = m (every latent kept), and a batch where some latents are kept twice over
SHAPES = [(1, 7, 40, 5, 3), (3, 16, 64, 8, 4), (2, 9, 30, 6, 1), (4, 5, 12, 3, 12), (1, 64, 512, 32, 16)]


@pytest.mark.parametrize("shape", SHAPES)
def test_sparse_matches_autograd_through_dense(shape: tuple[int, int, int, int, int]) -> None:
    K, B, m, d, k = shape
    g = torch.Generator().manual_seed(sum(shape))
    W = torch.randn(K, m, d, generator=g)
    pre = torch.randn(K, B, m, generator=g)
    values, indices = pre.topk(k, dim=2)  # distinct indices per row, as TopK gives
    values = values * (torch.rand(K, B, k, generator=g) < 0.7)  # exact zeros, as a ReLU after TopK or a smaller member k gives
    assert (values == 0).any()
    weight = torch.randn(K, B, d, generator=g)
    out_s, gv_s, gw_s = _grads(sparse_decode, values, indices, W, weight)
    out_d, gv_d, gw_d = _grads(dense_decode, values, indices, W, weight)
    torch.testing.assert_close(out_s, out_d, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gv_s, gv_d, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw_s, gw_d, rtol=1e-5, atol=1e-5)


def test_repeated_indices_add_up() -> None:
    # Padding (value 0 at a repeated index, as a variable-count BatchTopK might produce) and true repeats
    # must both give what the dense reference's scatter_add gives.
    g = torch.Generator().manual_seed(0)
    K, B, m, d, k = 2, 6, 10, 4, 5
    W = torch.randn(K, m, d, generator=g, dtype=torch.float64)
    values = torch.randn(K, B, k, generator=g, dtype=torch.float64)
    indices = torch.randint(0, 3, (K, B, k), generator=g)  # 5 picks among 3 latents: repeats are certain
    weight = torch.randn(K, B, d, generator=g, dtype=torch.float64)
    for a, b in zip(_grads(sparse_decode, values, indices, W, weight), _grads(dense_decode, values, indices, W, weight)):
        torch.testing.assert_close(a, b)


def test_gradcheck_float64() -> None:
    g = torch.Generator().manual_seed(1)
    W = torch.randn(2, 20, 6, generator=g, dtype=torch.float64, requires_grad=True)
    values, indices = torch.randn(2, 5, 20, generator=g, dtype=torch.float64).topk(4, dim=2)
    values.requires_grad_()
    assert torch.autograd.gradcheck(lambda v, w: sparse_decode(v, indices, w), (values, W))


def test_gradient_of_one_input_only() -> None:
    values, indices, W = _tiny()
    w = W.clone().requires_grad_()
    sparse_decode(values, indices, w).sum().backward()
    # dL/dW[r] with dL/dout = ones: r0 = 0.5, r1 = 3, r2 = 2, r3 = 1 on every coordinate
    assert torch.equal(w.grad, torch.tensor([0.5, 3.0, 2.0, 1.0])[None, :, None].expand(1, 4, 3))
    v = values.clone().requires_grad_()
    sparse_decode(v, indices, W).sum().backward()
    # dL/dvalues = row sums of the kept rows: r2 = 3, r0 = 3, r3 = 3, r1 = 1
    assert torch.equal(v.grad, torch.tensor([[[3.0, 3.0], [3.0, 1.0]]]))


def test_values_grad_fallback_matches_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    # Devices without the per-sample-weights kernel gather the rows instead: same numbers.
    g = torch.Generator().manual_seed(2)
    W_rows, grad = torch.randn(30, 7, generator=g), torch.randn(6, 7, generator=g)
    rows = torch.randn(6, 30, generator=g).topk(4, dim=1).indices.reshape(-1)  # 4 entries for each of 6 bags
    bags = torch.arange(6).repeat_interleave(4)
    kernel = sd._weights_grad(grad, W_rows, rows, torch.arange(0, 24, 4), bags)
    monkeypatch.setattr(sd, "_PER_SAMPLE_WEIGHTS_BACKWARD_DEVICES", ())
    fallback = sd._weights_grad(grad, W_rows, rows, torch.arange(0, 24, 4), bags)
    expected = torch.einsum("nd,nd->n", W_rows[rows], grad[bags])  # g[bag] . W[row] by definition
    torch.testing.assert_close(kernel, expected)
    torch.testing.assert_close(fallback, expected)


def test_flat_forward_by_hand() -> None:
    # The _tiny codes in BatchTopK's layout: flat index = sample * m + latent with m = 4, entries in any order,
    # plus one entry of sample 1 more (value 1 on latent 0) so the samples hold 2 and 3 entries.
    _, _, W = _tiny()
    values = torch.tensor([[3.0, 2.0, 1.0, 0.5, 1.0]])
    flat = torch.tensor([[5, 2, 7, 0, 4]])  # s1 l1, s0 l2, s1 l3, s0 l0, s1 l0
    # sample 0: (6.5, -2, 3) as in test_forward_by_hand; sample 1: (1, 4, 1) + 1*r0 = (2, 4, 3)
    expected = torch.tensor([[[6.5, -2.0, 3.0], [2.0, 4.0, 3.0]]])
    assert torch.equal(sd.sparse_decode_flat(values, flat, W, 2), expected)
    assert torch.equal(sd.dense_decode_flat(values, flat, W, 2), expected)


@pytest.mark.parametrize("shape", [(1, 6, 40, 5, 12), (3, 8, 30, 4, 20), (2, 5, 16, 3, 80)])
def test_flat_matches_autograd_through_dense(shape: tuple[int, int, int, int, int]) -> None:
    # (K, B, m, d, n): n entries per member over the whole batch, as batch top-k picks them (n = B*m in the last:
    # every code kept), some samples with no entry at all in the first, and exact zeros among the values.
    K, B, m, d, n = shape
    g = torch.Generator().manual_seed(sum(shape))
    W = torch.randn(K, m, d, generator=g)
    pre = torch.randn(K, B * m, generator=g)
    if n < B * m:
        pre[:, : m * 2] -= 100.0  # samples 0 and 1 lose every entry to the others
    values, flat = pre.topk(n, dim=1)
    values = values * (torch.rand(K, n, generator=g) < 0.8)
    weight = torch.randn(K, B, d, generator=g)

    def grads(fn):
        v, w = values.clone().requires_grad_(), W.clone().requires_grad_()
        out = fn(v, flat, w, B)
        (out * weight).sum().backward()
        return out.detach(), v.grad, w.grad

    for a, b in zip(grads(sd.sparse_decode_flat), grads(sd.dense_decode_flat)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    if n < B * m:
        assert (grads(sd.sparse_decode_flat)[0][:, :2] == 0).all()  # the samples without entries decode to 0


def test_decode_batch_topk_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    # 8 entries over B = 2 samples of m = 4 at d = 3: 4 per sample, k/m = 1 -> dense unless forced.
    _, _, W = _tiny()
    values, flat = torch.arange(1.0, 9.0)[None], torch.arange(8)[None]
    expected = sd.dense_decode_flat(values, flat, W, 2)
    for path in ("auto", "sparse", "dense"):
        with decode_path(path):
            torch.testing.assert_close(sd.decode_batch_topk(values, flat, W, 2), expected)
    # Which path auto takes: 3 entries over B = 2 samples is 2 per sample (rounded up) at d = 3;
    # m = 64 gives k/m = 1/32 (sparse), m = 63 just above (dense).
    calls: list[str] = []
    monkeypatch.setattr(sd, "sparse_decode_flat", lambda *a: calls.append("sparse"))
    monkeypatch.setattr(sd, "dense_decode_flat", lambda *a: calls.append("dense"))
    for m in (64, 63):
        sd.decode_batch_topk(values[:, :3], flat[:, :3], torch.zeros(1, m, 3), 2)
    assert calls == ["sparse", "dense"]


def test_prefers_sparse_rule() -> None:
    # The documented thresholds: k/m <= 1/16 for d >= 64, k/m <= 1/32 below.
    assert prefers_sparse(32, 16384, 768, "cpu")
    assert prefers_sparse(64, 1024, 256, "cpu")  # exactly 1/16
    assert not prefers_sparse(65, 1024, 256, "cpu")
    assert prefers_sparse(128, 2048, 64, "cpu")  # exactly 1/16 at d = 64
    assert prefers_sparse(16, 512, 32, "cpu")  # exactly 1/32 at d = 32
    assert not prefers_sparse(17, 512, 32, "cpu")
    assert not prefers_sparse(32, 512, 32, "cpu")  # 1/16 is too dense at d = 32


def test_decode_topk_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    values, indices, W = _tiny()  # k/m = 1/2 at d = 3: auto decodes densely
    calls: list[str] = []
    monkeypatch.setattr(sd, "sparse_decode", lambda *a: calls.append("sparse") or dense_decode(*a))
    monkeypatch.setattr(sd, "dense_decode", lambda *a: calls.append("dense") or torch.zeros(1, 2, 3))
    decode_topk(values, indices, W)
    with decode_path("sparse"):
        decode_topk(values, indices, W)
    with decode_path("dense"):
        decode_topk(values, indices, W)
    decode_topk(values, indices, W)  # the forced path ends with its block
    assert calls == ["dense", "sparse", "dense", "dense"]
    with pytest.raises(ValueError, match="decode path"), decode_path("fast"):  # type: ignore[arg-type]
        pass


def test_decode_topk_values() -> None:
    values, indices, W = _tiny()
    expected = torch.tensor([[[6.5, -2.0, 3.0], [1.0, 4.0, 1.0]]])  # as in test_forward_by_hand
    for path in ("auto", "sparse", "dense"):
        with decode_path(path):
            assert torch.equal(decode_topk(values, indices, W), expected)


def test_interleaved_ratio_with_a_fake_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    from saekit import bench

    clock = [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    # call order: warm-up fast, warm-up slow, then (fast, slow) for each of 3 repeats of 1 step
    durations = iter([7.0, 7.0, 1.0, 3.0, 2.0, 2.0, 1.0, 5.0])

    def tick() -> None:
        clock[0] += next(durations)

    fast_s, slow_s, ratio = bench._interleaved_ratio(tick, tick, 1, 3, lambda: None)
    # fast 1, 2, 1 -> median 1; slow 3, 2, 5 -> median 3; per-repeat ratios 3, 1, 5 -> median 3 (warm-ups not timed)
    assert (fast_s, slow_s, ratio) == (1.0, 3.0, 3.0)


def test_bench_sparse_decode_reports_its_shape() -> None:
    from saekit.bench import bench_sparse_decode

    r = bench_sparse_decode(d=16, dict_size=256, k=4, batch_size=32, steps=1, repeats=1)
    assert (r["d"], r["dict_size"], r["k"], r["batch_size"]) == (16, 256, 4, 32)
    for key in ("sparse_decode_ms", "dense_decode_ms", "topk_step_ms", "topk_dense_decode_step_ms"):
        assert r[key] > 0, key
    # one repeat: the speedups are the quotients of the two timings they name
    assert r["sparse_decode_speedup"] == pytest.approx(r["dense_decode_ms"] / r["sparse_decode_ms"])
    assert r["topk_step_speedup"] == pytest.approx(r["topk_dense_decode_step_ms"] / r["topk_step_ms"])
