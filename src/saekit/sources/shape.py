"""The shape of the data a source config describes: its width d and, where the data knows it, G.

Presets and `saekit compare` size their grids from it, so they follow the data actually given rather
than the config's defaults. Each kind is asked as cheaply as it allows:

- `file`: the file's header (no data loaded); G is the row count of its `ground_truth` tensor, if any;
- `activations`: the folder's manifest (G unknown);
- kinds whose data is generated from their own `d` and `n_features` keys (toy, tms, compute): the config;
- any other kind: the built source, asked for `d` and the rows of its `ground_truth`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from saekit.config import SourceConfig
from saekit.errors import InputError


@dataclass(frozen=True)
class DataShape:
    """What the grids need to know about the data."""

    d: int  # width of the activations
    n_features: int | None  # G, the number of true features; None when the data does not know it
    origin: str  # where d was read: "config", "file header", "manifest" or "source"


def data_shape(cfg: SourceConfig) -> DataShape:
    """The width (and G where known) of the data `cfg` describes; refuses an explicit `source.d` that
    differs from the data's width, and bad files, in one line (InputError)."""
    reader = _READERS.get(cfg.kind)
    if reader is not None:
        shape = reader(cfg)
    elif "d" in cfg.relevant() and cfg.path is None:
        g = cfg.n_features if "n_features" in cfg.relevant() else None
        shape = DataShape(cfg.d, g, "config")
    else:
        shape = _built_shape(cfg)
    check_given_width(cfg, shape.d)
    return shape


def check_given_width(cfg: SourceConfig, width: int) -> None:
    """Refuse a `source.d` the user gave that differs from the width the data has."""
    if "d" in cfg.model_fields_set and cfg.d != width:
        where = cfg.path if cfg.path is not None else f"the {cfg.kind} source"
        raise InputError(f"source.d is {cfg.d} but {where} has width {width}")


def _file_shape(cfg: SourceConfig) -> DataShape:
    from saekit.sources.tensor_file import tensor_file_shape

    (_, d), g = tensor_file_shape(str(cfg.path))
    return DataShape(d, g, "file header")


def _activations_shape(cfg: SourceConfig) -> DataShape:
    from saekit.lm.shards import read_manifest

    return DataShape(int(read_manifest(str(cfg.path))["d"]), None, "manifest")


def _built_shape(cfg: SourceConfig) -> DataShape:
    """Build the source on the CPU and ask it (what a kind without a cheaper reader costs)."""
    from saekit.sources import make_source

    source = make_source(cfg)
    truth = source.ground_truth
    return DataShape(int(source.d), None if truth is None else int(truth.shape[0]), "source")


_READERS: dict[str, Callable[[SourceConfig], DataShape]] = {"file": _file_shape, "activations": _activations_shape}
