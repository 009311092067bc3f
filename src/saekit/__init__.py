"""saekit: take features out of superposition with sparse autoencoders.

Sharkey, Braun & Millidge, "Taking features out of superposition with sparse
autoencoders" (interim report, 2022), built as a tool.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from saekit.sae import SparseAutoencoder


def load(path: Any, device: Any = "cpu") -> SparseAutoencoder:
    """A saekit SAE (one member, acting on raw activations) from a saekit run folder, a SAELens folder or a
    dictionary_learning folder; see `saekit.interop.load`. Imported lazily so `import saekit` stays light."""
    from saekit.interop import load as _load

    return _load(path, device=device)


__all__ = ["__version__", "load"]
