"""Batched matrix products at the precision `train.matmul_precision` asks for.

On a GPU, torch's float32 matmul precision setting already chooses TF32 or bfloat16 inside its kernels. On a CPU
it changes nothing, so with `medium` these products cast their operands to bfloat16 where the CPU multiplies
bfloat16 natively (AVX512-BF16 or AMX), and return float32: about 2-3x the float32 rate on such CPUs. Parameters,
optimiser state, losses and evaluation stay float32.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (oneDNN's check)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def low_precision(t: torch.Tensor) -> bool:
    """Whether products on `t` run in bfloat16 now: matmul precision `medium`, a float32 CPU tensor, a bf16 CPU."""
    return t.device.type == "cpu" and t.dtype == torch.float32 and torch.get_float32_matmul_precision() == "medium" and cpu_has_bf16()


def bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch.bmm(a, b), in bfloat16 with a float32 result where `low_precision` says so."""
    if low_precision(a):
        return torch.bmm(a.to(torch.bfloat16), b.to(torch.bfloat16)).to(torch.float32)
    return torch.bmm(a, b)
