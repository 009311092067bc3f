"""One SAE read from another library's files, in a neutral form, and the saekit SAE (K = 1) built from it.

Readers of foreign formats (SAELens, dictionary_learning) turn their files into a
`ForeignSAE`: a saekit architecture name and unbatched tensors under saekit's
names, already in saekit's layout (W_enc (d, m), W_dec (m, d)). `build_sae`
checks the tensors, rewrites what saekit does differently (a decoder bias that is
not subtracted before encoding), and returns an ordinary saekit SAE whose encode
and decode give the foreign file's codes and reconstructions.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch

from saekit.config import SPARSITY_KNOBS
from saekit.errors import InputError
from saekit.sae import ARCHITECTURES, SparseAutoencoder

# The tensors each architecture needs (unbatched shapes: d = input width, m = latents).
REQUIRED: dict[str, tuple[str, ...]] = {
    "relu": ("W_enc", "b_enc", "W_dec"),
    "topk": ("W_enc", "b_enc", "W_dec"),
    "batchtopk": ("W_enc", "b_enc", "W_dec", "threshold"),
    "matryoshka": ("W_enc", "b_enc", "W_dec", "threshold"),
    "jumprelu": ("W_enc", "b_enc", "W_dec", "threshold"),
    "gated": ("W_enc", "b_gate", "r_mag", "b_mag", "W_dec"),
}
SHAPES: dict[str, str] = {
    "W_enc": "dm",
    "W_dec": "md",
    "b_dec": "d",
    "b_enc": "m",
    "b_gate": "m",
    "r_mag": "m",
    "b_mag": "m",
    "threshold": "m",  # jumprelu: per latent; batchtopk, matryoshka: one value, stored as shape ()
}
ONE_THRESHOLD = ("batchtopk", "matryoshka")  # architectures with one inference threshold for all latents
# A JumpReLU threshold must be positive (saekit stores log theta). A foreign threshold <= 0 fires wherever the
# pre-activation is positive (their codes pass through a ReLU), which this tiny positive threshold reproduces
# up to codes smaller than itself.
SMALLEST_THRESHOLD = 1e-30
UNIT_NORM_TOLERANCE = 1e-4  # decoder rows within this of norm 1 count as a unit-norm decoder


@dataclass
class ForeignSAE:
    """An SAE read from another format, in saekit's layout, not yet checked.

    tensors: unbatched, saekit names: W_enc (d, m), b_enc (m), W_dec (m, d), b_dec (d) or absent;
    jumprelu: threshold (m) (theta itself, not its log); batchtopk, matryoshka: threshold () (one value);
    gated: b_gate, r_mag, b_mag (m) instead of b_enc.
    b_dec_on_input: whether the source subtracts b_dec from the input before encoding (saekit always does).
    hyper: saekit init kwargs known from the source (k, seeds, l1, ...); the rest get neutral values.
    source: what to record about where it came from (format, architecture, paths, the source's config).
    """

    arch: str
    tensors: dict[str, torch.Tensor]
    b_dec_on_input: bool = True
    hyper: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)


def build_sae(foreign: ForeignSAE, where: str) -> SparseAutoencoder:
    """The saekit SAE (K = 1) that computes what `foreign` computes; InputError (naming `where`) if it cannot."""
    if foreign.arch not in ARCHITECTURES:
        raise InputError(f"{where}: saekit has no {foreign.arch!r} architecture")
    tensors = _checked_tensors(foreign, where)
    if "b_dec" in tensors and not foreign.b_dec_on_input:
        tensors = _move_decoder_bias_into_encoder(tensors)
    d, m = tensors["W_enc"].shape
    kwargs = _init_kwargs(foreign, tensors, d, m, where)
    cls = ARCHITECTURES[foreign.arch]
    try:
        sae = cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise InputError(f"{where}: cannot build a saekit {foreign.arch} SAE ({str(err).splitlines()[0]})") from None
    state = sae.state_dict()
    for name, value in _saekit_tensors(foreign.arch, tensors).items():
        if name not in state:
            raise InputError(f"{where}: saekit's {foreign.arch} SAE has no tensor {name!r}")
        state[name] = value.unsqueeze(0).to(state[name].dtype)
    sae.load_state_dict(state)
    return sae


def _checked_tensors(foreign: ForeignSAE, where: str) -> dict[str, torch.Tensor]:
    """Float32 copies with the expected names and shapes, all finite."""
    tensors = dict(foreign.tensors)
    for name in REQUIRED[foreign.arch]:
        if name not in tensors:
            raise InputError(f"{where}: missing tensor {name!r} for a {foreign.arch} SAE")
    allowed = set(REQUIRED[foreign.arch]) | {"b_dec"}
    extra = sorted(set(tensors) - allowed)
    if extra:
        raise InputError(f"{where}: unexpected tensor {extra[0]!r} for a {foreign.arch} SAE")
    w_enc = tensors["W_enc"]
    if w_enc.ndim != 2:
        raise InputError(f"{where}: W_enc must be 2-dimensional (d, m), got shape {tuple(w_enc.shape)}")
    d, m = w_enc.shape
    sizes = {"d": d, "m": m}
    out = {}
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise InputError(f"{where}: {name} must hold floating-point numbers, got {t.dtype}")
        expected = () if (name == "threshold" and foreign.arch in ONE_THRESHOLD) else tuple(sizes[c] for c in SHAPES[name])
        if tuple(t.shape) != expected:
            raise InputError(f"{where}: {name} has shape {tuple(t.shape)}, expected {expected} (d={d}, m={m})")
        t = t.detach().to(device="cpu", dtype=torch.float32).clone()
        if not torch.isfinite(t).all():
            raise InputError(f"{where}: {name} holds NaN or infinite values")
        out[name] = t
    return out


def _move_decoder_bias_into_encoder(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Source encodes x (not x - b_dec): W_enc^T x + b = W_enc^T (x - b_dec) + (b + b_dec W_enc), so add b_dec W_enc
    to the encoder bias (gated: to b_gate, and times exp(r_mag) to b_mag, whose path uses W_enc exp(r_mag))."""
    out = dict(tensors)
    shift = tensors["b_dec"] @ tensors["W_enc"]  # (m,)
    if "b_enc" in out:
        out["b_enc"] = tensors["b_enc"] + shift
    if "b_gate" in out:
        out["b_gate"] = tensors["b_gate"] + shift
        out["b_mag"] = tensors["b_mag"] + shift * tensors["r_mag"].exp()
    return out


def _unit_rows(w_dec: torch.Tensor) -> bool:
    return bool(((w_dec.norm(dim=1) - 1).abs() <= UNIT_NORM_TOLERANCE).all())


def _init_kwargs(foreign: ForeignSAE, tensors: dict[str, torch.Tensor], d: int, m: int, where: str) -> dict[str, Any]:
    """Constructor arguments: shapes from the tensors, known hyperparameters from `hyper`, neutral values for the
    rest (seed 0; an L1 or L0 coefficient of 0 when the source does not give saekit's); decoder_bias when there is
    a nonzero b_dec (or `hyper` says so); decoder_norm 'free' when the decoder rows are not unit norm."""
    cls = ARCHITECTURES[foreign.arch]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "device"}
    knob = SPARSITY_KNOBS[foreign.arch]
    kwargs: dict[str, Any] = {"seeds": [0], knob: [0.0]}
    kwargs.update({k: v for k, v in foreign.hyper.items() if k in accepted})
    kwargs.update(d=d, dict_size=m)
    if len(kwargs["seeds"]) != 1 or not isinstance(kwargs[knob], list) or len(kwargs[knob]) != 1:
        raise InputError(f"{where}: expected one SAE (one seed and one {knob})")
    has_b_dec = "b_dec" in tensors and bool(tensors["b_dec"].any())
    kwargs["decoder_bias"] = bool(foreign.hyper.get("decoder_bias", False)) or has_b_dec
    if "decoder_norm" in accepted:
        wanted = foreign.hyper.get("decoder_norm", "unit")
        kwargs["decoder_norm"] = "unit" if wanted == "unit" and _unit_rows(tensors["W_dec"]) else "free"
    return kwargs


def _saekit_tensors(arch: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Unbatched tensors under the names of the saekit SAE's state dict."""
    out = {k: v for k, v in tensors.items() if k != "threshold"}
    if arch == "jumprelu":
        out["log_threshold"] = tensors["threshold"].clamp_min(SMALLEST_THRESHOLD).log()
    elif arch in ONE_THRESHOLD:
        out["threshold"] = tensors["threshold"]
    if "b_dec" in out and not out["b_dec"].any():
        del out["b_dec"]  # a zero decoder bias is no decoder bias (built without one unless `hyper` asked)
    return out
