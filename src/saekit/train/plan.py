"""Plan a sweep: group the grid's SAEs into ensembles (one per architecture and size) and check its memory."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

import torch

from saekit.config import RunSpec
from saekit.distributed import DistEnv

BYTES_PER_FLOAT = 4
RAM_SHARE = 0.8  # without --max-memory, a sweep may use this share of the memory available to it


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


def evaluation_memory_bytes(n_members: int, d: int, dict_size: int, eval_batch: int) -> int:
    """Bytes an ensemble's evaluation adds: its codes, inputs and reconstructions for one evaluation batch."""
    return BYTES_PER_FLOAT * n_members * eval_batch * (dict_size + 2 * d)


def sweep_memory_bytes(plans: list[EnsemblePlan], d: int, batch_size: int, eval_batch: int) -> int:
    """All ensembles are alive at once (they train in lockstep); evaluation adds one ensemble's codes for its batch."""
    training = sum(ensemble_memory_bytes(len(p.specs), d, p.dict_size, batch_size) for p in plans)
    evaluation = max((evaluation_memory_bytes(len(p.specs), d, p.dict_size, eval_batch) for p in plans), default=0)
    return training + evaluation


def memory_refusal(
    plans: list[EnsemblePlan], source: Any, batch_rows: int, eval_batch: int, limit: int, rank_name: str | None = None
) -> str | None:
    """The one-line reason to refuse a sweep estimated to need more than `limit` bytes (None: it fits).

    `batch_rows` are the rows of a training step in this process, `eval_batch` those of an evaluation batch
    (0 when it does not evaluate); a source reading activations from disk adds its shuffle buffer."""
    need = sweep_memory_bytes(plans, source.d, batch_rows, eval_batch)
    need += BYTES_PER_FLOAT * getattr(source, "buffer_rows", 0) * source.d
    if need <= limit:
        return None
    reason = (
        f"the sweep needs about {format_bytes(need)} of memory, more than --max-memory {format_bytes(limit)}; "
        "train fewer sizes or L1 values at once, or a smaller train.batch_size"
    )
    return reason if rank_name is None else f"{reason} (on {rank_name})"


def memory_limit(max_memory: int | None, device: torch.device, env: DistEnv) -> int:
    """--max-memory when given, else RAM_SHARE of the memory available to this process (a GPU's, or its
    share of the node's RAM when several ranks train on the CPUs of one node)."""
    if max_memory is not None:
        return max_memory
    sharing = 1 if device.type == "cuda" or not env.enabled else env.local_world_size
    return int(RAM_SHARE * available_memory_bytes(device) / sharing)


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
