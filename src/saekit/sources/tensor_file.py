"""Activations from a file on disk: a (N, d) tensor in .safetensors or .npy, optionally with ground truth."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

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
    p = _data_file(path)
    truth = None
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(p))
            data = tensors[_activations_name(list(tensors), p)]
            truth = tensors.get("ground_truth")
        else:
            data = torch.from_numpy(np.load(p, allow_pickle=False))
    except InputError:
        raise
    except Exception as err:  # corrupt file: the loaders raise many kinds
        raise _unreadable(p, err) from None
    data = check_activations(data, str(p))
    if truth is not None:
        truth = check_activations(truth, f"{p} ground_truth").float()
        if truth.shape[1] != data.shape[1]:
            raise InputError(f"{p}: ground_truth has width {truth.shape[1]}, activations {data.shape[1]}")
        truth = truth / truth.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return data, truth


def check_activations(data: torch.Tensor, name: str) -> torch.Tensor:
    """Refuse anything but a finite floating (N, d) tensor with N, d > 0."""
    check_shape(tuple(data.shape), data.is_floating_point(), str(data.dtype), name)
    bad = (~torch.isfinite(data)).sum().item()
    if bad:
        raise InputError(f"{name}: data contains {bad} NaN/Inf values")
    return data


def _data_file(path: str | Path) -> Path:
    """`path` as a Path, refused unless it is an existing .safetensors or .npy file."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"data file not found: {p}")
    if p.suffix not in (".safetensors", ".npy"):
        raise InputError(f"{p}: unsupported data file type {p.suffix!r} (use .safetensors or .npy)")
    return p


def _activations_name(names: list[str], p: Path) -> str:
    """The tensor of a .safetensors file that holds the activations: 'activations', or the only tensor."""
    if "activations" in names:
        return "activations"
    if len(names) == 1:
        return names[0]
    raise InputError(f"{p}: expected a tensor named 'activations', found {sorted(names)}")


def _unreadable(p: Path, err: Exception) -> InputError:
    """The one-line refusal of a file a reader choked on."""
    return InputError(f"{p}: cannot read data file ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'corrupt'})")


def check_shape(shape: tuple[int, ...], floating: bool, dtype: str, name: str) -> None:
    """Refuse anything but a floating (N, d) shape with N, d > 0 (`dtype` names the type in the message)."""
    if len(shape) != 2:
        raise InputError(f"{name}: expected a 2-D tensor (N, d), got shape {shape}")
    if shape[0] == 0 or shape[1] == 0:
        raise InputError(f"{name}: empty tensor of shape {shape}")
    if not floating:
        raise InputError(f"{name}: expected floating-point data, got {dtype}")


def tensor_file_shape(path: str | Path) -> tuple[tuple[int, int], int | None]:
    """((N, d), G) of a data file read from its header alone: the activations' shape and the ground truth's row
    count (None without ground truth). Refuses what `load_tensor_file` refuses for names, shapes and dtypes;
    NaN/Inf values are found only when the data is loaded."""
    p = _data_file(path)
    try:
        shape, floating, dtype, truth = _safetensors_header(p) if p.suffix == ".safetensors" else _npy_header(p)
    except InputError:
        raise
    except Exception as err:  # a corrupt header: the readers raise many kinds
        raise _unreadable(p, err) from None
    check_shape(shape, floating, dtype, str(p))
    if truth is not None:
        check_shape(truth[0], truth[1], truth[2], f"{p} ground_truth")
        if truth[0][1] != shape[1]:
            raise InputError(f"{p}: ground_truth has width {truth[0][1]}, activations {shape[1]}")
    return (shape[0], shape[1]), None if truth is None else truth[0][0]


_SAFETENSORS_FLOATS = ("F64", "F32", "F16", "BF16")  # and the F8_* types


def _safetensors_header(p: Path) -> tuple[tuple[int, ...], bool, str, tuple | None]:
    """(shape, floating, dtype, ground truth's (shape, floating, dtype) or None) from a .safetensors header."""
    from safetensors import safe_open

    def describe(f: Any, name: str) -> tuple[tuple[int, ...], bool, str]:
        part = f.get_slice(name)
        dtype = part.get_dtype()
        return tuple(part.get_shape()), dtype in _SAFETENSORS_FLOATS or dtype.startswith("F8"), dtype

    with safe_open(str(p), framework="pt") as f:
        names = list(f.keys())
        data = describe(f, _activations_name(names, p))
        truth = describe(f, "ground_truth") if "ground_truth" in names else None
    return (*data, truth)


def _npy_header(p: Path) -> tuple[tuple[int, ...], bool, str, None]:
    """(shape, floating, dtype, None) from a .npy header; refuses a file too short for the array it declares."""
    fmt = np.lib.format
    with open(p, "rb") as f:
        version = fmt.read_magic(f)
        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, _, dtype = read(f)
        start = f.tell()
    need = start + math.prod(shape) * dtype.itemsize
    if p.stat().st_size < need:
        raise InputError(f"{p}: truncated data file ({p.stat().st_size} bytes, the header promises {need})")
    return tuple(shape), bool(np.issubdtype(dtype, np.floating)), str(dtype), None


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
