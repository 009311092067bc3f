"""Extract a language model's activations at one (layer, site) over a text source into shards on disk.

The model runs only up to the hooked layer, on consecutive windows of the text's token stream (attention
mask all ones). Shards are written as the run goes, so memory stays bounded whatever the token count. A
run into a folder that already holds part of the same extraction continues where it stopped.
"""

from __future__ import annotations

import itertools
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from saekit.device import resolve_device
from saekit.errors import InputError
from saekit.lm.shards import DTYPES, MANIFEST, ShardWriter, read_manifest
from saekit.lm.sites import SITES

if TYPE_CHECKING:
    from saekit.lm.models import LanguageModel

IDENTITY_KEYS = ("model", "layer", "site", "window", "dtype", "text")  # what makes two extractions the same
FLOAT16_MAX = 65504.0


def check_request(layer: int, site: str, tokens: int, window: int, batch_windows: int, dtype: str, shard_rows: int) -> None:
    """Refuse bad arguments in one line, before the model is loaded or the disk touched."""
    if site not in SITES:
        raise InputError(f"unknown site {site!r}: choose one of {', '.join(SITES)}")
    if dtype not in DTYPES:
        raise InputError(f"dtype must be float16 or float32, got {dtype!r}")
    for name, value in (("window", window), ("batch_windows", batch_windows), ("shard_rows", shard_rows), ("tokens", tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise InputError(f"layer must be a non-negative integer, got {layer!r}")
    if tokens < window:
        raise InputError(f"tokens ({tokens}) must be at least one window ({window})")


def _previous(out: Path, request: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of an earlier run of the same extraction in `out`, None for a fresh folder; InputError otherwise."""
    if not (out / MANIFEST).exists():
        if out.exists() and (not out.is_dir() or any(p for p in out.iterdir() if not p.name.startswith("."))):
            raise InputError(f"{out} exists and is not an activations folder (no {MANIFEST}); choose a new --out")
        return None
    manifest = read_manifest(out)
    diff = [f"{k} {manifest[k]!r} (asked {request[k]!r})" for k in IDENTITY_KEYS if manifest[k] != request[k]]
    if diff:
        raise InputError(f"{out} holds another extraction: {', '.join(diff)}; choose a new --out")
    return manifest


def _batches(windows: Iterator[list[int]], first: int, n_windows: int, batch_windows: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(index of the batch's first window, ids (B, window)) for windows [first, n_windows), in batches that start
    at multiples of batch_windows so a continued run computes exactly the batches an uninterrupted one does."""
    start = (first // batch_windows) * batch_windows
    it = itertools.islice(windows, start, n_windows)
    index = start
    while True:
        batch = list(itertools.islice(it, batch_windows))
        if not batch:
            return
        yield index, torch.tensor(batch, dtype=torch.long)
        index += len(batch)


def _reusable(previous: dict[str, Any] | None, n_windows: int, text: str, tokens: int) -> dict[str, Any] | None:
    """The manifest of a complete earlier run that already holds `n_windows` windows (or all the text had), else None."""
    if previous is None or not previous["complete"]:
        return None
    text_ran_out = previous["tokens"] < previous["tokens_requested"]
    if previous["windows"] < n_windows and not text_ran_out:
        return None
    if text_ran_out and previous["windows"] < n_windows:
        _warn_short(text, previous["tokens"], tokens)
    return previous


def _extraction_meta(
    lm: LanguageModel, model: str, layer: int, site: str, text: str, *, tokens: int, window: int, dtype: str
) -> dict[str, Any]:
    """The manifest fields describing what is extracted, after checking `window` fits the model's positions."""
    from saekit.lm.sites import check_site, site_width

    check_site(lm, layer, site)
    max_positions = getattr(lm.model.config, "max_position_embeddings", None)
    if isinstance(max_positions, int) and window > max_positions:
        raise InputError(f"window {window} is longer than {lm.name}'s {max_positions} positions")
    return {
        "model": model, "model_name": lm.name, "model_class": lm.model_class, "causal": lm.causal, "layer": layer,
        "site": site, "d": site_width(lm, layer, site), "window": window, "dtype": dtype, "text": text,
        "tokens_requested": tokens,
    }  # fmt: skip


def _check_continuable(previous: dict[str, Any] | None, meta: dict[str, Any], out: Path, model: str) -> None:
    """Refuse to continue an earlier run in `out` whose activations differ in width or model class."""
    if previous is not None and (previous["d"], previous["model_class"]) != (meta["d"], meta["model_class"]):
        raise InputError(
            f"{out} holds {previous['model_class']} activations of width {previous['d']}, but {model!r} now gives "
            f"{meta['model_class']} of width {meta['d']}; choose a new --out"
        )


def _write_windows(
    lm: LanguageModel,
    writer: ShardWriter,
    dev: torch.device,
    *,
    layer: int,
    site: str,
    text: str,
    window: int,
    n_windows: int,
    batch_windows: int,
    progress: bool,
    on_batch: Callable[[int], None] | None,
) -> dict[str, Any]:
    """Append windows to `writer` until it holds `n_windows` (or the text runs out) and close it; its manifest."""
    from saekit.lm.text import token_windows

    done = writer.windows
    bar = _progress_bar(n_windows * window, done * window, progress)
    complete = False
    try:
        windows = token_windows(lm.tokenizer, text, window)
        for index, ids in _batches(windows, done, n_windows, batch_windows):
            # skip: windows of this batch already on disk (only in the first batch of a continued run)
            written = write_batch(lm, ids.to(dev), layer, site, writer, skip=max(0, done - index))
            done += written
            bar.update(written * window)
            if on_batch is not None:
                on_batch(writer.rows)
        complete = True
    finally:
        bar.close()
        manifest = writer.close(complete=complete)
    return manifest


def extract_activations(
    model: str,
    layer: int,
    site: str,
    text: str = "stdlib",
    *,
    tokens: int,
    out: str | Path,
    window: int = 128,
    batch_windows: int = 8,
    dtype: str = "float16",
    shard_rows: int = 65536,
    device: str = "cpu",
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Write at least `tokens` rows (whole windows) of activations at (layer, site) to `out`; returns the manifest.

    on_batch(rows_written) is called after every batch (a hook for progress reporting and tests).
    """
    from saekit.lm.models import load_model
    from saekit.lm.text import check_text_spec

    check_request(layer, site, tokens, window, batch_windows, dtype, shard_rows)
    check_text_spec(text)
    dev = resolve_device(device)
    out = Path(out)
    n_windows = math.ceil(tokens / window)
    previous = _previous(out, {"model": model, "layer": layer, "site": site, "window": window, "dtype": dtype, "text": text})
    reused = _reusable(previous, n_windows, text, tokens)
    if reused is not None:
        return reused

    lm = load_model(model, device=dev)
    meta = _extraction_meta(lm, model, layer, site, text, tokens=tokens, window=window, dtype=dtype)
    _check_continuable(previous, meta, out, model)
    writer = ShardWriter(out, meta, shard_rows, existing=previous)
    manifest = _write_windows(
        lm, writer, dev, layer=layer, site=site, text=text, window=window, n_windows=n_windows, batch_windows=batch_windows,
        progress=progress, on_batch=on_batch,
    )  # fmt: skip
    if manifest["windows"] < n_windows:
        _warn_short(text, manifest["tokens"], tokens)
    return manifest


def write_batch(lm: LanguageModel, ids: torch.Tensor, layer: int, site: str, writer: ShardWriter, skip: int = 0) -> int:
    """Run windows ids (B, T) up to (layer, site) and append the rows of windows [skip:] to `writer`; returns B - skip."""
    from saekit.lm.sites import run_to_site

    acts = run_to_site(lm, ids, torch.ones_like(ids), layer, site)  # (B, T, d)
    acts, ids = acts[skip:], ids[skip:]
    acts = acts.reshape(-1, acts.shape[-1])
    if writer.torch_dtype == torch.float16:
        _check_float16_range(acts, lm.name, layer, site)
    writer.append(acts.cpu(), ids.reshape(-1).cpu())
    return ids.shape[0]


def _check_float16_range(acts: torch.Tensor, name: str, layer: int, site: str) -> None:
    peak = float(acts.abs().amax())
    if not peak <= FLOAT16_MAX:
        raise InputError(f"{name} layer {layer} {site} reaches |x| = {peak:.4g}, beyond float16's range: use --dtype float32")


def _warn_short(text: str, got: int, asked: int) -> None:
    print(f"saekit: warning: text {text!r} gives only {got} tokens in whole windows ({asked} asked); wrote {got}", file=sys.stderr)


def _progress_bar(total: int, initial: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total, initial=initial, unit="tok", unit_scale=True, desc="activations", file=sys.stderr, disable=not enabled,
        dynamic_ncols=True,
    )  # fmt: skip
