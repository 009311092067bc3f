"""`saekit train` under torchrun: the process group, collectives on Python objects, and which rank trains what.

torchrun (`python -m torch.distributed.run`) starts one process per rank and sets RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT; `distributed_env` reads them. Without
WORLD_SIZE (or with WORLD_SIZE=1) everything here is a no-op and training runs as a single process.

The backend follows the training device: NCCL for CUDA, gloo for the CPU. Each rank of a node takes
the GPU `cuda:LOCAL_RANK` when `train.device` is `auto` or `cuda`.

Two ways to use the ranks (`train.parallel`):
- `members`: the grid's SAEs are dealt to ranks (`assign_ranks`); each rank trains its share as usual.
- `data`: every SAE trains on every rank, each rank on its slice of every batch, gradients averaged by
  DistributedDataParallel (`saekit.train.data_parallel`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from saekit.errors import InputError

T = TypeVar("T")

# How long a collective (e.g. the barrier at the end of a sweep, where ranks that finished their share wait
# for the slowest one) may wait before the process group gives up. torchrun stops every rank when one dies,
# so a long limit only matters for a node that hangs. SAEKIT_DIST_TIMEOUT_MINUTES overrides it.
DEFAULT_TIMEOUT_MINUTES = 24 * 60


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits among torchrun's: rank in 0..world_size-1, and its index on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def enabled(self) -> bool:
        """More than one process: collectives are needed."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes OUT/runs.sqlite and prints results."""
        return self.rank == 0


def distributed_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """The DistEnv torchrun's variables describe (os.environ by default); a single process without them."""
    env = os.environ if environ is None else environ
    if not env.get("WORLD_SIZE"):
        return DistEnv()
    try:
        world_size = int(env["WORLD_SIZE"])
        rank = int(env.get("RANK", "0"))
        local_rank = int(env.get("LOCAL_RANK", "0"))
        local_world_size = int(env.get("LOCAL_WORLD_SIZE", "1"))
    except ValueError:
        raise InputError("bad torchrun environment: RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE must be integers") from None
    if world_size < 1 or not 0 <= rank < world_size or not 0 <= local_rank < max(local_world_size, 1):
        raise InputError(f"bad torchrun environment: RANK={rank} WORLD_SIZE={world_size} LOCAL_RANK={local_rank}")
    if world_size == 1:
        return DistEnv()
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, local_world_size=max(local_world_size, 1))


def backend_for(device: torch.device) -> str:
    """NCCL when the training device is a GPU, gloo on the CPU."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def device_for_rank(device: torch.device, env: DistEnv) -> torch.device:
    """A CUDA device without an index becomes `cuda:LOCAL_RANK` (one GPU per rank); others are kept."""
    device = torch.device(device)
    if not env.enabled or device.type != "cuda" or device.index is not None:
        return device
    if env.local_rank >= torch.cuda.device_count():
        raise InputError(
            f"LOCAL_RANK {env.local_rank} but this node has {torch.cuda.device_count()} GPU(s): start fewer processes per node"
        )
    return torch.device("cuda", env.local_rank)


def timeout() -> timedelta:
    raw = os.environ.get("SAEKIT_DIST_TIMEOUT_MINUTES", "")
    try:
        minutes = float(raw) if raw else DEFAULT_TIMEOUT_MINUTES
    except ValueError:
        raise InputError(f"SAEKIT_DIST_TIMEOUT_MINUTES must be a number of minutes, got {raw!r}") from None
    return timedelta(minutes=minutes)


@contextmanager
def process_group(env: DistEnv, device: torch.device) -> Iterator[None]:
    """torch.distributed's default process group for the block (from torchrun's MASTER_ADDR/MASTER_PORT),
    destroyed after it. A no-op for a single process or when the caller already initialised one."""
    if not env.enabled or dist.is_initialized():
        yield
        return
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    import_dynamo_first()
    dist.init_process_group(backend=backend_for(device), rank=env.rank, world_size=env.world_size, timeout=timeout())
    try:
        yield
        dist.barrier()  # no rank tears its connections down while another still uses them
    finally:
        dist.destroy_process_group()


def import_dynamo_first() -> None:
    """Import torch._dynamo before the process group exists, so that `destroy_process_group` can free the group.

    torch.optim imports torch._dynamo on first use; imported after `init_process_group`, it keeps references to
    the default group (torch 2.13: ten, from walking torch's namespaces), and `destroy_process_group` then leaves
    the group and gloo's worker threads alive until the interpreter shuts down. A worker that releases a finished
    collective during that shutdown takes the GIL to free the collective's tensors, and the rank aborts with
    'terminate called without an active exception' after it has written its results. Imported first, the group
    is freed at `destroy_process_group`, which joins its workers."""
    import torch._dynamo  # noqa: F401


def barrier(env: DistEnv) -> None:
    """Wait until every rank gets here (nothing for a single process)."""
    if not env.enabled:
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def broadcast_object(obj: T, env: DistEnv) -> T:
    """Rank 0's `obj` on every rank (any picklable object; other ranks' argument is ignored)."""
    if not env.enabled:
        return obj
    box = [obj if env.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[return-value]


def all_gather_objects(obj: T, env: DistEnv) -> list[T]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not env.enabled:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def raise_if_any(message: str | None, env: DistEnv) -> None:
    """Raise InputError on every rank when any rank has a message (the lowest rank's), so that a check that
    fails on one rank stops them all in the same place instead of leaving the others waiting."""
    messages = [m for m in all_gather_objects(message, env) if m]
    if messages:
        raise InputError(messages[0])


def assign_ranks(groups: Sequence[Sequence[str]], world_size: int) -> dict[str, int]:
    """Which rank trains each run: the runs of each group (one group per ensemble: architecture and size, in
    their training order), dealt round-robin with one count running on across groups, so that every rank gets
    about the same number of each size and at most one more run than any other.

    It depends only on the full grid and the world size, not on which runs are already done, so a re-run with
    the same number of ranks gives each rank the same ensembles (and resumes their checkpoints)."""
    ranks: dict[str, int] = {}
    i = 0
    for group in groups:
        for run_id in group:
            if run_id not in ranks:
                ranks[run_id] = i % world_size
                i += 1
    return ranks
