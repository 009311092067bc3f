"""Activations from a file on disk: a (N, d) tensor in .safetensors or .npy, optionally with ground truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from saekit.errors import InputError
from saekit.sources.seeding import EpochSampler
from saekit.sources.streams import Stream


def load_tensor_file(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Read activations (N, d) and optional ground truth (G, d) from `path`; refuse bad files in one line.

    .safetensors: tensor 'activations' (or the only tensor), optional 'ground_truth'.
    .npy: one (N, d) array, read without pickle.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"data file not found: {p}")
    truth = None
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(p))
            if "activations" in tensors:
                data = tensors["activations"]
            elif len(tensors) == 1:
                data = next(iter(tensors.values()))
            else:
                raise InputError(f"{p}: expected a tensor named 'activations', found {sorted(tensors)}")
            truth = tensors.get("ground_truth")
        elif p.suffix == ".npy":
            data = torch.from_numpy(np.load(p, allow_pickle=False))
        else:
            raise InputError(f"{p}: unsupported data file type {p.suffix!r} (use .safetensors or .npy)")
    except InputError:
        raise
    except Exception as err:  # corrupt file: the loaders raise many kinds
        raise InputError(
            f"{p}: cannot read data file ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'corrupt'})"
        ) from None
    data = check_activations(data, str(p))
    if truth is not None:
        truth = check_activations(truth, f"{p} ground_truth").float()
        if truth.shape[1] != data.shape[1]:
            raise InputError(f"{p}: ground_truth has width {truth.shape[1]}, activations {data.shape[1]}")
        truth = truth / truth.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return data, truth


def check_activations(data: torch.Tensor, name: str) -> torch.Tensor:
    """Refuse anything but a finite floating (N, d) tensor with N, d > 0."""
    if data.ndim != 2:
        raise InputError(f"{name}: expected a 2-D tensor (N, d), got shape {tuple(data.shape)}")
    if data.shape[0] == 0 or data.shape[1] == 0:
        raise InputError(f"{name}: empty tensor of shape {tuple(data.shape)}")
    if not data.is_floating_point():
        raise InputError(f"{name}: expected floating-point data, got {data.dtype}")
    bad = (~torch.isfinite(data)).sum().item()
    if bad:
        raise InputError(f"{name}: data contains {bad} NaN/Inf values")
    return data


class TensorSource:
    """A fixed dataset (N, d) served in shuffled epochs; `ground_truth` as given (or None)."""

    def __init__(
        self, data: torch.Tensor, ground_truth: torch.Tensor | None = None, seed: int = 0, device: str | torch.device = "cpu"
    ) -> None:
        self.device = torch.device(device)
        self.data = check_activations(data, "data").float().to(self.device)
        self.n_samples, self.d = self.data.shape
        self.ground_truth = None if ground_truth is None else ground_truth.float().to(self.device)
        self.seed = seed
        self._epochs = EpochSampler(self.data, seed)

    def batch(self, batch_size: int, step: int, stream: int = Stream.TRAIN) -> torch.Tensor:
        """Batch number `step` of stream `stream`: the next rows of a per-epoch permutation, (B, d)."""
        return self._epochs.batch(batch_size, step, stream)
