"""Decoding k-sparse codes (TopK, BatchTopK) without materialising the dense (K, B, m) code tensor.

With k latents per sample, x_hat = sum_j values[j] * W_dec[indices[j]] costs B*k*d
instead of the B*m*d of a dense matmul (Gao et al. 2024, "Scaling and evaluating
sparse autoencoders", on sparse decoder kernels). Two layouts:

- TopK: values and indices (K, B, k), k latents per sample -> `sparse_decode`, `decode_topk`;
- BatchTopK: values and flat indices (K, n) into each member's flattened (B, m) codes, any number
  per sample -> `sparse_decode_flat`, `decode_batch_topk`.

`dense_decode` / `dense_decode_flat` are the references (scatter, then a matmul); `decode_topk` and
`decode_batch_topk` pick the faster path by `prefers_sparse`, or as `decode_path` forces.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Literal

import torch
from torch import Tensor


def dense_decode(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """The reference: scatter to dense codes (K, B, m), then bmm with W_dec (K, m, d) -> (K, B, d).

    values (K, B, k) float, indices (K, B, k) int64 in [0, m). Differentiable through autograd.
    Repeated indices in a row add up (scatter_add), as in the sparse path.
    """
    K, B, _ = values.shape
    m = W_dec.shape[1]
    codes = values.new_zeros(K, B, m).scatter_add(2, indices, values)
    return torch.bmm(codes, W_dec)


_PER_SAMPLE_WEIGHTS_BACKWARD_DEVICES = ("cpu", "cuda")  # devices with a kernel for aten._embedding_bag_per_sample_weights_backward


def _weights_grad(g: Tensor, W_rows: Tensor, rows: Tensor, offsets: Tensor, bags: Tensor) -> Tensor:
    """dL/dweights[e] = g[bags[e]] . W_rows[rows[e]]: g (n_bags, d), W_rows (R, d), rows and bags (n,) -> (n,).

    The embedding-bag kernel for per-sample-weight gradients reads each kept row once and never
    materialises the (n, d) gathered rows; other devices gather the rows.
    """
    if g.device.type not in _PER_SAMPLE_WEIGHTS_BACKWARD_DEVICES:
        return (W_rows[rows] * g[bags]).sum(dim=1)
    return torch.ops.aten._embedding_bag_per_sample_weights_backward(g, W_rows, rows, offsets, bags, 0, -1)


def _rows_grad(g: Tensor, weights: Tensor, rows: Tensor, bags: Tensor, n_rows: int, members: int) -> Tensor:
    """dL/dW_rows[r] = sum over entries e with rows[e] = r of weights[e] * g[bags[e]]: -> (n_rows, d).

    g (n_bags, d); weights, rows, bags (n,), in `members` equal blocks, block i holding the entries of
    member i, whose rows lie in [i*n_rows/members, (i+1)*n_rows/members). The transpose of the forward:
    an embedding bag over the rows of g, one bag per decoder row (entries sorted by row), so each output
    row is written once and rows nobody chose come out zero.
    """
    n = rows.shape[0]
    # Each member's entries are sorted as one row of a 2-D tensor (members' row ranges are disjoint, so
    # the blocks concatenate to a global order). torch's 1-D CPU sort of integers is a parallel radix sort
    # that on this busy 2-core machine took ~250 ms for 32k entries at 2 threads (0.5 ms at 1 thread);
    # a row of a 2-D tensor is sorted on one thread: ~3.5 ms for 32k entries, at any thread count.
    block = n // members
    order = rows.view(members, block).argsort(dim=1, stable=True)
    order = (order + (torch.arange(members, device=g.device) * block)[:, None]).view(-1)
    starts = torch.zeros(n_rows, dtype=torch.long, device=g.device)
    starts[1:] = torch.bincount(rows, minlength=n_rows).cumsum(0)[:-1]
    return torch.nn.functional.embedding_bag(bags[order], g, starts, mode="sum", per_sample_weights=weights[order])


class _EntriesDecode(torch.autograd.Function):
    """out[b] = sum over entries e with bags[e] = b of weights[e] * W_rows[rows[e]], with a hand-written backward.

    Entries are grouped by bag (bags non-decreasing; `offsets` (n_bags,) where each bag starts) and come in
    `members` equal blocks of disjoint row ranges (see `_rows_grad`). Forward and both gradients are
    embedding bags: no dense code tensor and no (n, d) gathered rows are made.
    """

    @staticmethod
    def forward(ctx, weights: Tensor, rows: Tensor, bags: Tensor, offsets: Tensor, W_rows: Tensor, members: int) -> Tensor:
        out = torch.nn.functional.embedding_bag(rows, W_rows, offsets, mode="sum", per_sample_weights=weights)
        ctx.save_for_backward(weights, rows, bags, offsets, W_rows)
        ctx.members = members
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):
        weights, rows, bags, offsets, W_rows = ctx.saved_tensors
        g = g.contiguous()
        g_weights = g_W_rows = None
        if ctx.needs_input_grad[0]:
            g_weights = _weights_grad(g, W_rows, rows, offsets, bags)
        if ctx.needs_input_grad[4]:
            g_W_rows = _rows_grad(g, weights, rows, bags, W_rows.shape[0], ctx.members)
        return g_weights, None, None, None, g_W_rows, None


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """sum_j values[..., j] * W_dec[indices[..., j]]: values (K, B, k), indices (K, B, k) int64 in [0, m),
    W_dec (K, m, d) -> (K, B, d). Differentiable w.r.t. values and W_dec; repeated indices add up.

    Members are decoded together by viewing W_dec as K*m rows and offsetting member i's indices by i*m.
    """
    K, B, k = values.shape
    m, d = W_dec.shape[1:]
    dev = indices.device
    rows = (indices + (torch.arange(K, device=dev) * m)[:, None, None]).reshape(-1)
    bags = torch.arange(K * B, device=dev)
    offsets, bags = bags * k, bags.repeat_interleave(k)
    out = _EntriesDecode.apply(values.reshape(-1), rows, bags, offsets, W_dec.reshape(K * m, d), K)
    return out.view(K, B, d)


def sparse_decode_flat(values: Tensor, flat_indices: Tensor, W_dec: Tensor, batch_size: int) -> Tensor:
    """BatchTopK's layout: values (K, n) and flat_indices (K, n) int64 into each member's flattened (B, m)
    codes (as `codes.view(K, B*m).topk(n)` gives; a sample may hold any number of the n entries),
    W_dec (K, m, d) -> (K, B, d). Differentiable w.r.t. values and W_dec; repeated indices add up."""
    K, n = values.shape
    m, d = W_dec.shape[1:]
    dev = flat_indices.device
    order = flat_indices.argsort(dim=1, stable=True)  # sample-major within each member (a 2-D sort: see _rows_grad)
    flat = flat_indices.gather(1, order)
    sample = torch.div(flat, m, rounding_mode="floor")
    member = torch.arange(K, device=dev)[:, None]
    rows = (flat - sample * m + member * m).reshape(-1)
    bags = (sample + member * batch_size).reshape(-1)
    offsets = torch.zeros(K * batch_size, dtype=torch.long, device=dev)
    offsets[1:] = torch.bincount(bags, minlength=K * batch_size).cumsum(0)[:-1]
    out = _EntriesDecode.apply(values.gather(1, order).reshape(-1), rows, bags, offsets, W_dec.reshape(K * m, d), K)
    return out.view(K, batch_size, d)


def dense_decode_flat(values: Tensor, flat_indices: Tensor, W_dec: Tensor, batch_size: int) -> Tensor:
    """The reference for `sparse_decode_flat`: scatter to dense codes (K, B, m), then bmm -> (K, B, d)."""
    K, _ = values.shape
    m = W_dec.shape[1]
    codes = values.new_zeros(K, batch_size * m).scatter_add(1, flat_indices, values)
    return torch.bmm(codes.view(K, batch_size, m), W_dec)


def prefers_sparse(k: int, dict_size: int, d: int, device: torch.device | str) -> bool:
    """Whether `decode_topk` takes the sparse path: k/m <= 1/16 when d >= 64, k/m <= 1/32 below.

    Measured on a 2-core AMD EPYC CPU shared with other jobs (load ~8), one thread, forward + backward
    (gradients for values and W_dec) of sparse_decode against dense_decode, the median of 3 per-repeat time
    ratios dense/sparse at k/m = 1/32, 1/16, 1/8, 1/4:

        d=32  m=512   B=1024: 1.17 0.68 0.43 0.22      d=256 m=1024 B=256 K=8: 3.41 1.74 1.05 0.50
        d=64  m=2048  B=1024: 1.86 0.98 0.58 0.26      d=768 m=4096  B=512:    3.39 1.97 0.94 0.44
        d=256 m=1024  B=256:  4.99 1.50 0.80 0.44      d=768 m=16384 B=256:    1.90 1.11 0.59 0.33
        d=256 m=1024  B=1024: 3.18 1.44 0.93 0.47

    so the sparse path wins up to k/m = 1/16 at d >= 64 (0.98, a tie, at d = 64) and up to 1/32 at d = 32,
    where the dense matmul is cheap. At k/m = 1/512 (d=768, m=16384, k=32, batch 1024) it is 12-18x faster
    (`saekit bench`'s sparse_decode_speedup at 1-2 threads). The rule depends only on the shapes, so a run
    takes the same path every time. It has not been measured on GPUs: the same thresholds apply there
    (`device` is in the signature so that a device-specific rule can be added without callers changing).
    """
    if d >= 64:
        return k * 16 <= dict_size
    return k * 32 <= dict_size


_FORCED_PATH: ContextVar[str] = ContextVar("saekit_decode_path", default="auto")


@contextmanager
def decode_path(path: Literal["auto", "sparse", "dense"]) -> Iterator[None]:
    """Within the block, `decode_topk` and `decode_batch_topk` use `path` ("sparse", "dense", or "auto" = `prefers_sparse`)."""
    if path not in ("auto", "sparse", "dense"):
        raise ValueError(f"decode path must be 'auto', 'sparse' or 'dense', got {path!r}")
    token = _FORCED_PATH.set(path)
    try:
        yield
    finally:
        _FORCED_PATH.reset(token)


def decode_topk(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """Decode k-sparse codes, values and indices (K, B, k) with W_dec (K, m, d) -> (K, B, d), with
    `sparse_decode` or `dense_decode` as `prefers_sparse` says (or as `decode_path` forces)."""
    path = _FORCED_PATH.get()
    if path == "auto":
        _, m, d = W_dec.shape
        path = "sparse" if prefers_sparse(values.shape[2], m, d, W_dec.device) else "dense"
    return sparse_decode(values, indices, W_dec) if path == "sparse" else dense_decode(values, indices, W_dec)


def decode_batch_topk(values: Tensor, flat_indices: Tensor, W_dec: Tensor, batch_size: int) -> Tensor:
    """Decode BatchTopK's codes, values and flat_indices (K, n) into the flattened (B, m) codes, with W_dec
    (K, m, d) -> (K, B, d), with `sparse_decode_flat` or `dense_decode_flat` as `prefers_sparse` says for the
    mean number of entries per sample n/B (or as `decode_path` forces)."""
    decode = sparse_decode_flat if batch_topk_path(values.shape[1], batch_size, W_dec) == "sparse" else dense_decode_flat
    return decode(values, flat_indices, W_dec, batch_size)


def batch_topk_path(n_entries: int, batch_size: int, W_dec: Tensor) -> str:
    """'sparse' or 'dense': the path `decode_batch_topk` takes for n_entries kept entries of a batch of
    batch_size rows with W_dec (K, m, d): `prefers_sparse` at the mean number of entries per row (rounded up),
    unless `decode_path` forces one."""
    path = _FORCED_PATH.get()
    if path == "auto":
        _, m, d = W_dec.shape
        path = "sparse" if prefers_sparse(-(-n_entries // batch_size), m, d, W_dec.device) else "dense"
    return path
