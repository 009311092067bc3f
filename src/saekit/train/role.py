"""What one process does in `saekit train`, decided once from how it was launched and `train.parallel`.

alone               trains every run, writes OUT/runs.sqlite, checkpoints and evaluations
parallel=members    rank r trains its share of the runs (whole batches) and writes its own runs.rank{r}.sqlite;
                    rank 0 merges the rank files into runs.sqlite at the end
parallel=data       every rank trains every run on its slice of each batch; rank 0 alone evaluates,
                    checkpoints and records into runs.sqlite
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from saekit.config import RunSpec
from saekit.distributed import DistEnv, assign_ranks
from saekit.store import rank_filename
from saekit.train.plan import EnsemblePlan, plan_ensembles

Share = Literal["all", "rank_share", "all_on_slice"]


@dataclass(frozen=True)
class Role:
    """One process's part of a sweep."""

    env: DistEnv
    trains: Share  # every run, its rank's share of them, or every run on its slice of each batch
    writes: bool  # evaluates, checkpoints and records into a run store
    store_file: str | None  # the file of its run store in OUT (None: runs.sqlite)

    @property
    def data_parallel(self) -> bool:
        """Its ensembles train on this rank's rows of each batch, gradients averaged over the ranks."""
        return self.trains == "all_on_slice"

    @property
    def rank_stores(self) -> bool:
        """Every rank records into its own file, which rank 0 merges at the end (and leaves in place at the start)."""
        return self.store_file is not None

    @property
    def rank_name(self) -> str | None:
        """'rank r of N' among several processes, else None."""
        return f"rank {self.env.rank} of {self.env.world_size}" if self.env.enabled else None

    def batch_rows(self, batch_size: int) -> int:
        """The rows of a training batch this process computes on."""
        return batch_size // self.env.world_size if self.data_parallel else batch_size

    def plans(self, specs: list[RunSpec], run_ids: list[str], skip: set[str]) -> list[EnsemblePlan]:
        """The ensembles this process trains: of its runs (every run, or its rank's share of the whole grid),
        those not in `skip`."""
        if self.trains != "rank_share":
            return plan_ensembles(specs, run_ids, skip=skip)
        rank_of = assign_ranks([p.run_ids for p in plan_ensembles(specs, run_ids)], self.env.world_size)
        mine = [i for i, rid in enumerate(run_ids) if rank_of[rid] == self.env.rank]
        return plan_ensembles([specs[i] for i in mine], [run_ids[i] for i in mine], skip=skip)


def role_for(env: DistEnv, parallel: str) -> Role:
    """The role of the process `env` describes in a sweep with `train.parallel` = `parallel`."""
    if not env.enabled:
        return Role(env, "all", writes=True, store_file=None)
    if parallel == "data":
        return Role(env, "all_on_slice", writes=env.is_main, store_file=None)
    return Role(env, "rank_share", writes=True, store_file=rank_filename(env.rank))
