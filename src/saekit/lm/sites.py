"""Where in a transformer block an activation is read (or replaced): the residual stream, the MLP's output,
or the MLP's hidden layer.

resid       the block's output (the residual stream after block L; for the last block, before any final norm)
mlp_out     the MLP's output, before it is added to the residual (BERT: `output.dense`, before add and LayerNorm)
mlp_hidden  the MLP's hidden activation: the input of its down projection (BERT: the `intermediate` output)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from saekit.errors import InputError
from saekit.lm.models import LanguageModel

SITES = ("resid", "mlp_out", "mlp_hidden")

# Per site, (path inside the block, "output" or "input") for the architectures we know; first match wins.
SITE_MODULES: dict[str, tuple[tuple[str, str], ...]] = {
    "resid": (("", "output"),),
    "mlp_out": (("mlp", "output"), ("output.dense", "output")),
    "mlp_hidden": (
        ("mlp.down_proj", "input"),  # Llama, Mistral, Qwen, ...
        ("mlp.c_proj", "input"),  # GPT-2
        ("mlp.dense_4h_to_h", "input"),  # GPT-NeoX
        ("mlp.fc2", "input"),  # OPT-like, Phi
        ("intermediate", "output"),  # BERT
    ),
}


class _StopForward(Exception):
    """Raised from a hook once the activation is captured, so no later layer runs."""


class Capture:
    """Holds the captured activation: `.value` (B, T, d), or None before the forward pass reaches the site."""

    value: torch.Tensor | None = None


def check_site(lm: LanguageModel, layer: int, site: str) -> None:
    """InputError naming the valid choices for a bad site or layer index."""
    if site not in SITES:
        raise InputError(f"unknown site {site!r}: choose one of {', '.join(SITES)}")
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < lm.n_layers:
        raise InputError(f"layer {layer} out of range: {lm.name} has {lm.n_layers} layers (0 to {lm.n_layers - 1})")


def site_module(lm: LanguageModel, layer: int, site: str) -> tuple[nn.Module, str]:
    """The module whose output (or input) is the activation at (layer, site), and which of the two it is."""
    check_site(lm, layer, site)
    block = lm.layers()[layer]
    for path, side in SITE_MODULES[site]:
        module: Any = block
        for part in filter(None, path.split(".")):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.Module):
            return module, side
    raise InputError(f"site {site!r} is not known for {type(block).__name__} blocks; use resid")


def site_width(lm: LanguageModel, layer: int, site: str) -> int:
    """d of the activation at (layer, site), read from the module's shape (or one probe token when it cannot be)."""
    module, side = site_module(lm, layer, site)
    if site in ("resid", "mlp_out") and side == "output" and not isinstance(module, nn.Linear):
        return lm.d_model
    target = module
    if not isinstance(target, nn.Linear) and hasattr(target, "dense") and isinstance(target.dense, nn.Linear):
        target = target.dense  # BERT's intermediate: dense then activation
    if isinstance(target, nn.Linear):
        return target.in_features if side == "input" else target.out_features
    weight = getattr(target, "weight", None)
    if type(target).__name__ == "Conv1D" and weight is not None:  # GPT-2's transposed linear: weight (in, out)
        return int(weight.shape[0] if side == "input" else weight.shape[1])
    probe = torch.zeros(1, 1, dtype=torch.long, device=lm.device)
    return int(run_to_site(lm, probe, torch.ones_like(probe), layer, site).shape[-1])


def _first(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, (tuple, list)) else x


def _input_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    if args:
        return args[0]
    return next(v for v in kwargs.values() if isinstance(v, torch.Tensor))


@contextmanager
def capture(lm: LanguageModel, layer: int, site: str, stop: bool = True) -> Iterator[Capture]:
    """Record the activation at (layer, site) into `.value` (B, T, d) during a forward pass.

    With stop=True the hook raises a private exception once it has the value, so no later layer runs:
    use `run_to_site`, which catches it. With stop=False the forward pass completes and `.value` is a copy.
    """
    module, side = site_module(lm, layer, site)
    box = Capture()

    def keep(value: torch.Tensor) -> None:
        box.value = value.detach() if stop else value.detach().clone()
        if stop:
            raise _StopForward

    if side == "output":
        handle = module.register_forward_hook(lambda _m, _args, out: keep(_first(out)))
    else:
        handle = module.register_forward_pre_hook(lambda _m, args, kwargs: keep(_input_of(args, kwargs)), with_kwargs=True)
    try:
        yield box
    finally:
        handle.remove()


@contextmanager
def replace(lm: LanguageModel, layer: int, site: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Splice `fn` (B, T, d) -> (B, T, d) into every forward pass at (layer, site) while the context is open."""
    module, side = site_module(lm, layer, site)

    def swap(value: torch.Tensor) -> torch.Tensor:
        new = fn(value)
        if new.shape != value.shape:
            raise ValueError(f"replace: fn must keep the shape {tuple(value.shape)}, returned {tuple(new.shape)}")
        return new

    def on_output(_m: nn.Module, _args: Any, out: Any) -> Any:
        if isinstance(out, tuple):
            return (swap(out[0]), *out[1:])
        if isinstance(out, list):
            return [swap(out[0]), *out[1:]]
        return swap(out)

    def on_input(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if args:
            return (swap(args[0]), *args[1:]), kwargs
        key = next(k for k, v in kwargs.items() if isinstance(v, torch.Tensor))
        return args, {**kwargs, key: swap(kwargs[key])}

    if side == "output":
        handle = module.register_forward_hook(on_output)
    else:
        handle = module.register_forward_pre_hook(on_input, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def forward(lm: LanguageModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Any:
    """One plain forward pass: no cache, no hidden states, no attentions."""
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    if lm.causal:
        kwargs["use_cache"] = False
    return lm.model(**kwargs)


def run_to_site(lm: LanguageModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, layer: int, site: str) -> torch.Tensor:
    """The activation (B, T, d) at (layer, site) for input_ids (B, T), running only the layers up to it."""
    with torch.inference_mode(), capture(lm, layer, site, stop=True) as box:
        try:
            forward(lm, input_ids, attention_mask)
        except _StopForward:
            pass
    if box.value is None:
        raise RuntimeError(f"the forward pass of {lm.name} never reached layer {layer} {site}")
    return box.value
