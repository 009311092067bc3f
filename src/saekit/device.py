"""Choosing the torch device: `auto` is CUDA when present, else the CPU."""

from __future__ import annotations

import torch

from saekit.errors import InputError


def resolve_device(name: str, what: str = "device") -> torch.device:
    """`auto` -> CUDA when present, else CPU; anything else must be a device torch knows and this machine has.

    `what` names the setting in error messages (e.g. 'train.device').
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown {what} {name!r}: use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"{what} is {name!r} but CUDA is not available")
    return device
