"""SAE architectures behind one interface (`SparseAutoencoder`), registered by name."""

from __future__ import annotations

from saekit.sae.base import SparseAutoencoder, random_unit_rows
from saekit.sae.relu import ReluSAE

ARCHITECTURES: dict[str, type[SparseAutoencoder]] = {"relu": ReluSAE}

__all__ = ["ARCHITECTURES", "ReluSAE", "SparseAutoencoder", "random_unit_rows"]
