"""SAE architectures behind one interface (`SparseAutoencoder`), registered by name (from saekit.archspec)."""

from __future__ import annotations

from saekit.archspec import ARCH_SPECS
from saekit.sae.base import SparseAutoencoder, random_unit_rows
from saekit.sae.batchtopk import BatchTopKSAE
from saekit.sae.gated import GatedSAE
from saekit.sae.jumprelu import JumpReLUSAE
from saekit.sae.matryoshka import MatryoshkaBatchTopKSAE
from saekit.sae.relu import ReluSAE
from saekit.sae.topk import TopKSAE

ARCHITECTURES: dict[str, type[SparseAutoencoder]] = {name: spec.load() for name, spec in ARCH_SPECS.items()}

__all__ = [
    "ARCHITECTURES",
    "BatchTopKSAE",
    "GatedSAE",
    "JumpReLUSAE",
    "MatryoshkaBatchTopKSAE",
    "ReluSAE",
    "SparseAutoencoder",
    "TopKSAE",
    "random_unit_rows",
]
