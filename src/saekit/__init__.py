"""saekit: take features out of superposition with sparse autoencoders.

Sharkey, Braun & Millidge, "Taking features out of superposition with sparse
autoencoders" (interim report, 2022), built as a tool.

The notebook API::

    import saekit
    rows = saekit.train("configs/small.yaml", out="runs/small", sae__l1=[0.5, 1.0])
    saekit.estimate("runs/small")      # needs a sweep with two init seeds at some size
    saekit.report("runs/small")        # writes runs/small/report.html
    sae = saekit.load("runs/small/runs/RUN_ID")

Sources (`saekit.ToySource`, ...) and architectures (`saekit.ReluSAE`, `saekit.TopKSAE`, ...) are
importable from here too. Everything is imported on first use, so `import saekit` does not import torch.
"""

from __future__ import annotations

import functools
import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from saekit import api as _api

__version__ = "0.1.0"

if TYPE_CHECKING:
    from saekit.sae import SparseAutoencoder


# Names importable from `saekit`, and the module each one lives in (imported on first access).
_LAZY: dict[str, str] = {
    # sources
    "ToySource": "saekit.sources",
    "TMSSource": "saekit.sources",
    "ComputeSource": "saekit.sources",
    "TensorSource": "saekit.sources",
    "SynthSource": "saekit.sources",
    "ActivationSource": "saekit.sources.activations",
    "make_source": "saekit.sources",
    # architectures
    "SparseAutoencoder": "saekit.sae",
    "ReluSAE": "saekit.sae",
    "TopKSAE": "saekit.sae",
    "BatchTopKSAE": "saekit.sae",
    "MatryoshkaBatchTopKSAE": "saekit.sae",
    "JumpReLUSAE": "saekit.sae",
    "GatedSAE": "saekit.sae",
    "ARCHITECTURES": "saekit.sae",
    # configs and errors
    "Config": "saekit.config",
    "load_config": "saekit.config",
    "InputError": "saekit.errors",
}


class _FunctionOverPackage:
    """A public function that shares its name with a subpackage (`saekit.train`, `saekit.report`).

    Calling it runs the function. Any other attribute comes from the subpackage, so
    `saekit.train.loop` is still the module `saekit.train.loop`.
    """

    def __init__(self, function: Any, package: str) -> None:
        functools.update_wrapper(self, function)
        self._package = package

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__wrapped__(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        package = importlib.import_module(self._package)
        try:
            return getattr(package, name)
        except AttributeError:
            pass
        try:
            return importlib.import_module(f"{self._package}.{name}")
        except ModuleNotFoundError as err:
            raise AttributeError(f"{self.__name__!r} has no attribute {name!r}") from err

    def __repr__(self) -> str:
        return f"<function saekit.{self.__name__}>"


train = _FunctionOverPackage(_api.train, "saekit.train")
report = _FunctionOverPackage(_api.report, "saekit.report")
estimate = _api.estimate


class _Package(types.ModuleType):
    """The `saekit` module. Importing the subpackage `saekit.train` (or `saekit.report`) would set the
    attribute `saekit.train` to that subpackage and hide the function; this keeps the function."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("train", "report") and isinstance(value, types.ModuleType) and value.__name__ == f"saekit.{name}":
            return  # the subpackage stays in sys.modules; its attributes are reachable through the function
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def load(path: Any, device: Any = "cpu") -> SparseAutoencoder:
    """A saekit SAE (one member, acting on raw activations) from a saekit run folder, a SAELens folder or a
    dictionary_learning folder; see `saekit.interop.load`. Imported lazily so `import saekit` stays light."""
    from saekit.interop import load as _load

    return _load(path, device=device)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'saekit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["__version__", "estimate", "load", "report", "train", *_LAZY]
