"""dictionary_learning folders (saprmarks/dictionary_learning): ae.pt (a torch state dict) + config.json.

ae.pt is read with `torch.load(..., weights_only=True)` only: a file that needs anything but tensors and plain
containers to unpickle is refused, and nothing in it runs. config.json names the class under
["trainer"]["dict_class"]. State-dict names and what the classes compute (nn.Linear stores weight (out, in)):

  AutoEncoder          encoder.weight (m, d), encoder.bias (m), decoder.weight (d, m), bias (d)
                       c = ReLU(enc(x - bias)), x_hat = dec(c) + bias                       -> relu
  AutoEncoderNew       encoder.weight, encoder.bias, decoder.weight, decoder.bias (d)
                       c = ReLU(enc(x)), x_hat = dec(c) + decoder.bias                      -> relu
  GatedAutoEncoder     encoder.weight (m, d) (no bias), gate_bias, mag_bias, r_mag (m), decoder.weight,
                       decoder_bias (d); gate and magnitude paths on enc(x - decoder_bias)   -> gated
  JumpReluAutoEncoder  W_enc (d, m), b_enc (m), W_dec (m, d), b_dec (d), threshold (m)
                       c = ReLU(pre * (pre > threshold)), pre = x W_enc + b_enc (b_dec not subtracted)
                                                                                            -> jumprelu
  AutoEncoderTopK      encoder.*, decoder.weight, b_dec, buffers k () and threshold ()
                       c = the top k of ReLU(enc(x - b_dec))                                -> topk
  BatchTopKSAE         as AutoEncoderTopK; c = a * (a > threshold), a = ReLU(enc(x - b_dec)) -> batchtopk
  MatryoshkaBatchTopKSAE  W_enc (d, m), b_enc (m), W_dec (m, d), b_dec (d), buffers k (), threshold () and
                       group_sizes (G) (the sizes of the nested groups, summing to m; config.json's trainer also
                       holds group_fractions, group_weights and group_sizes); c = a * (a > threshold),
                       a = ReLU((x - b_dec) W_enc + b_enc)                                   -> matryoshka

When dictionary_learning normalises activations in training it rescales the biases before saving, so ae.pt
acts on raw activations.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from saekit.errors import InputError
from saekit.interop.weights import ForeignSAE

WEIGHTS_NAME, CONFIG_NAME = "ae.pt", "config.json"
# dict_class -> (saekit arch, {their state-dict name: (saekit name, transpose)}, b_dec subtracted before encoding)
LINEAR_ENCODER = {"encoder.weight": ("W_enc", True), "encoder.bias": ("b_enc", False), "decoder.weight": ("W_dec", True)}
CLASSES: dict[str, tuple[str, dict[str, tuple[str, bool]], bool]] = {
    "AutoEncoder": ("relu", {**LINEAR_ENCODER, "bias": ("b_dec", False)}, True),
    "AutoEncoderNew": ("relu", {**LINEAR_ENCODER, "decoder.bias": ("b_dec", False)}, False),
    "GatedAutoEncoder": (
        "gated",
        {
            "encoder.weight": ("W_enc", True),
            "gate_bias": ("b_gate", False),
            "mag_bias": ("b_mag", False),
            "r_mag": ("r_mag", False),
            "decoder.weight": ("W_dec", True),
            "decoder_bias": ("b_dec", False),
        },
        True,
    ),
    "JumpReluAutoEncoder": (
        "jumprelu",
        {n: (n, False) for n in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")},
        False,
    ),
    "AutoEncoderTopK": ("topk", {**LINEAR_ENCODER, "b_dec": ("b_dec", False), "k": ("k", False), "threshold": ("", False)}, True),
    "BatchTopKSAE": (
        "batchtopk",
        {**LINEAR_ENCODER, "b_dec": ("b_dec", False), "k": ("k", False), "threshold": ("threshold", False)},
        True,
    ),
    "MatryoshkaBatchTopKSAE": (
        "matryoshka",
        {
            **{n: (n, False) for n in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")},
            "k": ("k", False),
            "group_sizes": ("group_sizes", False),
        },
        True,
    ),
}


def read_dictionary_learning(folder: Path) -> ForeignSAE:
    """The SAE in a dictionary_learning folder; InputError for unsafe, malformed or unknown files."""
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    trainer = _trainer_config(config_path)
    dict_class = trainer.get("dict_class")
    if not isinstance(dict_class, str) or dict_class not in CLASSES:
        known = ", ".join(CLASSES)
        raise InputError(f"{config_path}: dictionary_learning class {dict_class!r} has no saekit counterpart (saekit reads {known})")
    arch, names, b_dec_on_input = CLASSES[dict_class]
    state = safe_state_dict(weights_path)
    missing = [name for name in names if name not in state]
    if missing:
        raise InputError(f"{weights_path}: missing {missing[0]!r} for a {dict_class}")
    unexpected = sorted(set(state) - set(names))
    if unexpected:
        raise InputError(f"{weights_path}: unexpected tensor {unexpected[0]!r} for a {dict_class}")
    tensors, hyper, groups = {}, {}, None
    for theirs, (ours, transpose) in names.items():
        t = state[theirs]
        if ours == "k":
            hyper["k"] = [_k(t, trainer, weights_path)]
        elif ours == "group_sizes":
            groups = t
        elif ours:
            if transpose and t.ndim != 2:
                raise InputError(f"{weights_path}: {theirs} must be 2-dimensional, got shape {tuple(t.shape)}")
            tensors[ours] = t.T if transpose else t
    _check_sizes(tensors, trainer, weights_path)
    if groups is not None:
        hyper["prefix_fractions"] = _prefix_fractions(groups, trainer, weights_path, tensors["W_enc"].shape[1])
    source = {
        "format": "dictionary_learning",
        "dict_class": dict_class,
        "path": str(folder.resolve()),
        **{k: trainer[k] for k in ("trainer_class", "lm_name", "layer", "submodule_name") if k in trainer},
    }
    return ForeignSAE(arch, tensors, b_dec_on_input=b_dec_on_input, hyper=hyper, source=source)


def safe_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A torch state dict (str -> tensor) from `path`, unpickled with weights_only=True (never full pickle)."""
    if not path.is_file():
        raise InputError(f"not a dictionary_learning SAE: {path} is missing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        named = re.search(r"GLOBAL (\S+) was not an allowed global", str(err))
        if named:  # the file asks for a Python callable: loading it would run code
            raise InputError(f"{path}: refused, not a plain state dict (unpickling it would call {named.group(1)})") from None
        raise InputError(f"{path}: unreadable torch file (not a state dict torch.load can read with weights_only=True)") from None
    except Exception as err:  # truncated zip, not a torch file at all, ...
        raise InputError(f"{path}: unreadable torch file ({type(err).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise InputError(f"{path}: expected a state dict of name -> tensor")
    return dict(state)


def _trainer_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(f"not a dictionary_learning SAE: {path} is missing (it names the dictionary class)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: malformed JSON ({str(err).splitlines()[0]})") from None
    trainer = config.get("trainer") if isinstance(config, dict) else None
    if not isinstance(trainer, dict):
        raise InputError(f"{path}: expected an object with a 'trainer' object")
    return trainer


def _k(stored: torch.Tensor, trainer: dict[str, Any], where: Path) -> int:
    if stored.numel() != 1 or stored.is_floating_point():
        raise InputError(f"{where}: k must be one integer, got a {stored.dtype} tensor of shape {tuple(stored.shape)}")
    k = int(stored.item())
    if "k" in trainer and trainer["k"] != k:
        raise InputError(f"{where}: k = {k} but config.json says {trainer['k']!r}")
    return k


def _prefix_fractions(stored: torch.Tensor, trainer: dict[str, Any], where: Path, m: int) -> list[float]:
    """group_sizes (G) -> saekit's prefix_fractions: the running sums over m. The groups must be positive
    integers summing to m; config.json's group_sizes, when given, must be the same."""
    if stored.ndim != 1 or stored.numel() == 0 or stored.is_floating_point() or not bool((stored > 0).all()):
        raise InputError(f"{where}: group_sizes must be positive integers, got a {stored.dtype} tensor {stored.tolist()}")
    sizes = [int(v) for v in stored.tolist()]
    if "group_sizes" in trainer and trainer["group_sizes"] != sizes:
        raise InputError(f"{where}: group_sizes = {sizes} but config.json says {trainer['group_sizes']!r}")
    ends = [sum(sizes[: i + 1]) for i in range(len(sizes))]
    if ends[-1] != m:
        raise InputError(f"{where}: group_sizes {sizes} sum to {ends[-1]}, not dict_size {m}")
    return [end / m for end in ends]


def _check_sizes(tensors: dict[str, torch.Tensor], trainer: dict[str, Any], where: Path) -> None:
    """config.json's activation_dim and dict_size, when given, must match W_enc (d, m)."""
    d, m = tensors["W_enc"].shape
    for key, size in (("activation_dim", d), ("dict_size", m)):
        if key in trainer and trainer[key] != size:
            raise InputError(f"{where}: the tensors have {key} {size}, config.json says {trainer[key]!r}")
