"""Plan a sweep: group the grid's SAEs into ensembles (one per architecture and size) and size its memory."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch

from saekit.config import RunSpec

BYTES_PER_FLOAT = 4


@dataclass(frozen=True)
class EnsemblePlan:
    """SAEs of one architecture and size that train together as the members of one stacked model."""

    arch: str
    dict_size: int
    specs: tuple[RunSpec, ...]
    run_ids: tuple[str, ...]

    @property
    def ensemble_id(self) -> str:
        """Deterministic from its members: the same unfinished runs give the same id (and checkpoint)."""
        digest = hashlib.sha256("\n".join(self.run_ids).encode()).hexdigest()[:10]
        return f"{self.arch}-m{self.dict_size}-k{len(self.specs)}-{digest}"


def plan_ensembles(specs: list[RunSpec], run_ids: list[str], skip: set[str] = frozenset()) -> list[EnsemblePlan]:
    """One ensemble per (arch, dict_size) holding that size's runs not in `skip`, in grid order."""
    groups: dict[tuple[str, int], list[tuple[RunSpec, str]]] = {}
    for spec, run_id in zip(specs, run_ids):
        if run_id not in skip:
            groups.setdefault((spec.arch, spec.dict_size), []).append((spec, run_id))
    return [
        EnsemblePlan(arch, size, tuple(s for s, _ in members), tuple(r for _, r in members))
        for (arch, size), members in sorted(groups.items(), key=lambda kv: kv[0][1])
    ]


def ensemble_memory_bytes(n_members: int, d: int, dict_size: int, batch_size: int) -> int:
    """Peak bytes of one ensemble in training: parameters, gradients and Adam's two moments
    (4 copies of K(2dm + m + d) floats), plus the activations of a step (codes, their gradient and the
    ReLU mask-sized temporaries: about 3 K*B*m floats, and 4 K*B*(d+1) for inputs and errors)."""
    params = n_members * (2 * d * dict_size + dict_size + d)
    activations = n_members * batch_size * (3 * dict_size + 4 * (d + 1))
    return BYTES_PER_FLOAT * (4 * params + activations)


def sweep_memory_bytes(plans: list[EnsemblePlan], d: int, batch_size: int, eval_batch: int) -> int:
    """All ensembles are alive at once (they train in lockstep); evaluation adds one ensemble's codes for its batch."""
    training = sum(ensemble_memory_bytes(len(p.specs), d, p.dict_size, batch_size) for p in plans)
    evaluation = max((BYTES_PER_FLOAT * len(p.specs) * eval_batch * (p.dict_size + 2 * d) for p in plans), default=0)
    return training + evaluation


def available_memory_bytes(device: torch.device | str = "cpu") -> int:
    """Free memory where the sweep will live: the GPU's free memory for a CUDA device, else MemAvailable
    from /proc/meminfo (Linux), else total physical memory."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def parse_bytes(text: str) -> int:
    """'12G', '500M', '2.5GiB', '1000000' -> bytes (powers of 1024 for the unit letters)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    units = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
    scale = units.get(t[-1:], 1)
    number = t[:-1] if t[-1:] in units else t
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"cannot read a memory size from {text!r} (use e.g. 12G or 500M)") from None
    if value <= 0:
        raise ValueError(f"memory size must be positive, got {text!r}")
    return int(value * scale)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
