"""Producers of activation batches.

Every source has `d`, `ground_truth` ((G, d) unit rows, or None), and
`batch(batch_size, step, stream)` returning float32 (B, d); batch `step` of a
stream is deterministic, so training can restart at any step. `Stream` names the
streams: training, evaluation, resampling and the decoder bias's initialisation.

Sources built from known features may also have `batch_with_codes(batch_size, step, stream)`: the same x as
`batch` and the true feature activations (B, G) (or None when they are not known), and `parent` (G,) int64
(each feature's parent, -1 for none). The final evaluation scores the latents against them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import torch

from saekit.config import SourceConfig
from saekit.errors import InputError
from saekit.sources.compute import ComputeSource
from saekit.sources.shape import DataShape, check_given_width, data_shape
from saekit.sources.streams import Stream
from saekit.sources.synth import SynthSource
from saekit.sources.tensor_file import TensorSource, load_tensor_file
from saekit.sources.tms import TMSSource
from saekit.sources.toy import ToySource


class Source(Protocol):
    d: int
    ground_truth: torch.Tensor | None

    def batch(self, batch_size: int, step: int, stream: int = Stream.TRAIN) -> torch.Tensor: ...


def stream_batches(source: Source, batch_size: int, stream: int = Stream.TRAIN, start_step: int = 0) -> Iterator[torch.Tensor]:
    """An endless iterator over the batches of one stream, from `start_step` on."""
    step = start_step
    while True:
        yield source.batch(batch_size, step, stream)
        step += 1


def make_source(
    cfg: SourceConfig,
    device: str | torch.device = "cpu",
    cache_dir: str | Path | None = None,
    *,
    shard: tuple[int, int] | None = None,
    norms: tuple[float, float] | None = None,
) -> Source:
    """Build the source a config describes (reads and checks files; raises InputError on bad data).

    `tms` and `compute` train their model on first use and keep it in `cache_dir` (None: no cache); so does `synth`
    its orthogonalised feature directions.
    `activations` only: `shard` = (rank, world size) trains on the shard files i with i % world size == rank;
    `norms` = (norm_threshold, input_scale) measured elsewhere (another rank's `source.norms`) instead of here.
    """
    # the keys that apply to a kind (the ones its run ids hash) are exactly its source's arguments
    kwargs = {key: value for key, value in cfg.relevant().items() if key != "kind"}
    if cfg.kind == "tms":
        return TMSSource(**kwargs, device=device, cache_dir=cache_dir)
    if cfg.kind == "compute":
        return ComputeSource(**kwargs, device=device, cache_dir=cache_dir)
    if cfg.kind == "toy":
        return ToySource(**kwargs, device=device)
    if cfg.kind == "synth":
        return _synth_source(cfg, device, cache_dir, kwargs)
    if cfg.kind == "activations":
        from saekit.sources.activations import ActivationSource  # reads shards; needs no language-model packages

        source = ActivationSource(**kwargs, device=device, shard=shard, norms=norms)
        check_given_width(cfg, source.d)
        return source
    data, truth = load_tensor_file(cfg.path)
    check_given_width(cfg, data.shape[1])
    return TensorSource(data, truth, seed=cfg.seed, device=device)


def _synth_source(cfg: SourceConfig, device: str | torch.device, cache_dir: str | Path | None, kwargs: dict) -> SynthSource:
    """A generated synth model, or the SAELens folder in source.path (whose sizes must match d and n_features if given)."""
    if cfg.path is None:
        return SynthSource(**kwargs, device=device, cache_dir=cache_dir)
    source = SynthSource.from_folder(cfg.path, seed=cfg.seed, device=device)
    for key, value in (("d", source.d), ("n_features", source.n_features)):
        if key in cfg.model_fields_set and getattr(cfg, key) != value:
            raise InputError(f"source.{key} is {getattr(cfg, key)} but the synthetic model in {cfg.path} has {value}")
    return source


__all__ = [
    "ComputeSource",
    "DataShape",
    "Source",
    "Stream",
    "SynthSource",
    "TMSSource",
    "TensorSource",
    "ToySource",
    "data_shape",
    "load_tensor_file",
    "make_source",
    "stream_batches",
]
