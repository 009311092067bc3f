"""Decoding k-sparse codes (TopK, BatchTopK) without materialising the dense (K, B, m) code tensor.

With k latents per sample, x_hat = sum_j values[j] * W_dec[indices[j]] costs B*k*d
instead of the B*m*d of a dense matmul (Gao et al. 2024, "Scaling and evaluating
sparse autoencoders", section on sparse kernels).
"""

from __future__ import annotations

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


class _SparseDecode(torch.autograd.Function):
    """x_hat[K, B] = sum_j values[K, B, j] * W_dec[K, indices[K, B, j]] with a hand-written backward."""

    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
        K, B, k = values.shape
        m, d = W_dec.shape[1:]
        flat_idx = (indices + (torch.arange(K, device=indices.device) * m)[:, None, None]).reshape(K * B, k)
        out = torch.nn.functional.embedding_bag(flat_idx, W_dec.reshape(K * m, d), mode="sum", per_sample_weights=values.reshape(K * B, k))
        ctx.save_for_backward(values, flat_idx, W_dec)
        return out.view(K, B, d)

    @staticmethod
    def backward(ctx, g: Tensor):
        values, flat_idx, W_dec = ctx.saved_tensors
        K, B, k = values.shape
        m, d = W_dec.shape[1:]
        g_flat = g.reshape(K * B, d)
        g_values = g_W_dec = None
        if ctx.needs_input_grad[0]:
            rows = W_dec.reshape(K * m, d)[flat_idx]  # (K*B, k, d)
            g_values = torch.bmm(rows, g_flat.unsqueeze(2)).view(K, B, k)
        if ctx.needs_input_grad[2]:
            contrib = (values.reshape(K * B, k, 1) * g_flat.unsqueeze(1)).reshape(K * B * k, d)
            g_W_dec = W_dec.new_zeros(K * m, d).index_add_(0, flat_idx.reshape(-1), contrib).view(K, m, d)
        return g_values, None, g_W_dec


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """sum_j values[..., j] * W_dec[indices[..., j]]: values (K, B, k), indices (K, B, k) int64 in [0, m),
    W_dec (K, m, d) -> (K, B, d). Differentiable w.r.t. values and W_dec."""
    return _SparseDecode.apply(values, indices, W_dec)


def prefers_sparse(k: int, dict_size: int, d: int, device: torch.device | str) -> bool:
    """Whether `decode_topk` takes the sparse path for these shapes (placeholder rule: k/m <= 1/8)."""
    return k * 8 <= dict_size


def decode_topk(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """Decode k-sparse codes with whichever of `sparse_decode` / `dense_decode` is faster (see `prefers_sparse`)."""
    K, m, d = W_dec.shape
    if prefers_sparse(values.shape[2], m, d, W_dec.device):
        return sparse_decode(values, indices, W_dec)
    return dense_decode(values, indices, W_dec)
