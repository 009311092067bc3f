"""torch.distributed: a sweep dealt to 2 ranks, data-parallel training on 2 ranks, resume after a rank is killed.

The multi-process tests start 2 processes with torchrun (`python -m torch.distributed.run`, gloo on 127.0.0.1, its
c10d rendezvous on a port the OS picks) around the real CLI (`python -m saekit.cli train`), one thread each, and compare
what they write with one process training the same config here (`run_config`): every SAE's weights and
buffers (OUT/runs/ID/sae.safetensors) and metrics within 1e-5. Configs are tiny (d=16, 32 true features,
dictionaries of 32-64, a few thousand samples); each test takes about 10-30 s on 2 busy cores, most of it
the two processes importing torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from saekit.config import Config, expand_grid
from saekit.distributed import DistEnv, assign_ranks, backend_for, device_for_rank, distributed_env, timeout
from saekit.errors import InputError
from saekit.io import load_sae
from saekit.sae import ReluSAE
from saekit.sources import ToySource, make_source
from saekit.store import RunStore, merge_rank_stores, rank_filename
from saekit.train.data_parallel import check_data_parallel
from saekit.train.identity import run_id_for
from saekit.train.loop import train
from saekit.train.plan import plan_ensembles
from saekit.train.run import build_ensemble, run_config

pytestmark = pytest.mark.distributed

TOL = 1e-5  # the brief's bound; measured differences are 0 (sweeps) and below 1e-6 (data-parallel, float sums in another order)
METRICS = ("mse", "fvu", "l0", "mmcs", "dead_fraction")
SOURCE = {"d": 16, "n_features": 32, "mean_active": 3, "seed": 1}
TRAIN = {"batch_size": 64, "samples": 64 * 60, "lr": 3e-3, "log_every": 20, "eval_samples": 2000, "checkpoint_every": 1280}


# -- helpers ------------------------------------------------------------------------------------------------


# The c10d rendezvous on port 0: torchrun's agent binds its rendezvous store and the store it shares with the workers
# (MASTER_PORT, TORCHELASTIC_USE_AGENT_STORE=True) to ports the OS picks and keeps them bound, so no other process can
# take them first. (`--master_port 0` is not an option: the static rendezvous hands port 0 to the workers, which then
# wait for ever; a port found free and released before torchrun binds it can be taken in between.)
TORCHRUN = [
    sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
    "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0", "--local-addr", "127.0.0.1",
]  # fmt: skip


def torchrun_cmd(config: Path, out: Path, *extra: str) -> list[str]:
    return [*TORCHRUN, "-m", "saekit.cli", "train", str(config), "--out", str(out), "--json", "--no-progress", *extra]


def torchrun_env() -> dict[str, str]:
    # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 would make torchrun find MASTER_PORT free and release it (the race above)
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def stop_torchrun(proc: subprocess.Popen) -> tuple[str, str]:
    """Stop torchrun and its workers; returns what they wrote. torchrun stops its workers on SIGTERM; they run in
    sessions of their own and hold its stdout, so if it does not, they are killed by pid (a killed torchrun alone
    would leave them running, and reading its output would wait for them)."""
    workers = _children(proc.pid)
    proc.terminate()
    try:
        return proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        for pid in (*workers, proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return proc.communicate(timeout=60)


def run_torchrun(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a torchrun command to its end; past `timeout` seconds, stop it and its workers and fail saying so.
    The generous timeout only bounds a hang (the suite shares 2 cores with other jobs)."""
    proc = subprocess.Popen(cmd, env=torchrun_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _, stderr = stop_torchrun(proc)
        pytest.fail(f"torchrun did not finish within {timeout:.0f} s (stopped): {shlex.join(cmd[3:])}\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def torchrun(config: Path, out: Path, *extra: str, timeout: float = 600) -> list[dict]:
    """`saekit train CONFIG --out OUT --json` on 2 ranks; its stdout must be one JSON list (rank 0's)."""
    proc = run_torchrun(torchrun_cmd(config, out, *extra), timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread in the block, like each rank (OMP_NUM_THREADS=1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def single(data: dict, out: Path) -> list[dict]:
    """The same config trained by this one process."""
    with one_thread():
        rows, errors = run_config(Config.model_validate(data), out, progress=False)
    assert not errors
    return rows


def differences(reference: list[dict], rows: list[dict]) -> tuple[float, float]:
    """(max |weight or buffer difference|, max |metric difference|) over the SAEs of two runs of one grid."""
    ref = {r["run_id"]: r for r in reference}
    got = {r["run_id"]: r for r in rows}
    assert got.keys() == ref.keys()
    weights = metrics = 0.0
    for run_id, r in ref.items():
        a = load_file(str(Path(r["checkpoint"]) / "sae.safetensors"))
        b = load_file(str(Path(got[run_id]["checkpoint"]) / "sae.safetensors"))
        assert a.keys() == b.keys()
        for name in a:
            weights = max(weights, (a[name].double() - b[name].double()).abs().max().item())
        for m in METRICS:
            if r.get(m) is not None:
                metrics = max(metrics, abs(r[m] - got[run_id][m]))
    return weights, metrics


def check_store(out: Path, rows: list[dict]) -> None:
    """Every SAE is done in OUT/runs.sqlite with its history, its checkpoint is OUT/runs/ID, no rank file is left."""
    assert not list(out.glob("runs.rank*.sqlite*")), "rank files are removed after the merge"
    with RunStore(out) as store:
        for r in rows:
            row = store.get(r["run_id"])
            assert row is not None and row["status"] == "done"
            assert row["checkpoint"] == str(out / "runs" / r["run_id"]) == r["checkpoint"]
            assert (out / "runs" / r["run_id"] / "sae.safetensors").is_file()
            assert store.history(r["run_id"])[-1]["samples"] == row["samples"] == r["samples"]
    assert not list((out / "ensembles").glob("*")), "ensemble checkpoints are removed once their runs are done"


# -- pieces (no processes) ----------------------------------------------------------------------------------


def test_torchrun_environment_is_read_and_one_process_is_not_distributed():
    assert distributed_env({}) == DistEnv()
    assert distributed_env({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}) == DistEnv()
    env = distributed_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.enabled, env.is_main) == (3, 4, 1, 2, True, False)
    with pytest.raises(InputError, match="bad torchrun environment"):
        distributed_env({"WORLD_SIZE": "2", "RANK": "2"})


def test_backend_device_and_timeout_follow_the_training_device_and_the_environment(monkeypatch):
    two = DistEnv(rank=1, world_size=2, local_rank=1, local_world_size=2)
    assert backend_for(torch.device("cpu")) == "gloo" and backend_for(torch.device("cuda", 0)) == "nccl"
    assert device_for_rank(torch.device("cpu"), two) == torch.device("cpu")
    assert device_for_rank(torch.device("cuda", 3), two) == torch.device("cuda", 3)  # an explicit GPU is kept
    assert device_for_rank(torch.device("cuda"), DistEnv()) == torch.device("cuda")  # one process: untouched
    monkeypatch.delenv("SAEKIT_DIST_TIMEOUT_MINUTES", raising=False)
    assert timeout() == timedelta(hours=24)
    monkeypatch.setenv("SAEKIT_DIST_TIMEOUT_MINUTES", "90")
    assert timeout() == timedelta(minutes=90)
    monkeypatch.setenv("SAEKIT_DIST_TIMEOUT_MINUTES", "soon")
    with pytest.raises(InputError, match="SAEKIT_DIST_TIMEOUT_MINUTES"):
        timeout()


def test_run_config_without_dist_env_refuses_to_run_as_one_of_several(tmp_path, monkeypatch):
    """`saekit reproduce` or `compare` under torchrun would run N copies of one sweep into one folder: refused."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(InputError, match="only `saekit train` and `saekit count` share their work"):
        run_config(Config.model_validate({"source": SOURCE}), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_runs_are_dealt_round_robin_over_the_full_grid():
    # two ensembles (sizes) of 3 runs, 2 ranks: one count runs on across groups, so each rank gets 3 runs and
    # both sizes; it depends only on the grid, not on which runs are done.
    ranks = assign_ranks([["a1", "a2", "a3"], ["b1", "b2", "b3"]], 2)
    assert ranks == {"a1": 0, "a2": 1, "a3": 0, "b1": 1, "b2": 0, "b3": 1}
    assert set(assign_ranks([["a1", "a2", "a3"]], 4).values()) == {0, 1, 2}


def test_data_parallel_refuses_a_batch_that_does_not_split():
    check_data_parallel(64, DistEnv(rank=0, world_size=2))
    with pytest.raises(InputError, match="divisible by the number of processes"):
        check_data_parallel(64, DistEnv(rank=0, world_size=3))


def test_a_member_resamples_alike_alone_and_in_an_ensemble():
    """Resampling draws each member's inputs with its own generator (seeded by its init seed and the step), so a
    member's training does not depend on which members share its ensemble (which ranks deal it to). With one
    generator shared by the members (before), members 1 and 2 ended 0.88 apart (max |W_dec| difference)."""
    src = ToySource(**SOURCE)
    cfg = Config.model_validate({"train": {**TRAIN, "resample_every": 640, "resample_duplicates": True, "duplicate_cosine": 0.7}}).train
    seeds, l1s = [0, 1, 2], [3.0, 10.0, 3.0]
    ensemble = ReluSAE(16, 64, seeds, l1s)
    assert train(ensemble, src, cfg, progress=False).resampled > 0
    for k in range(3):
        alone = ReluSAE(16, 64, [seeds[k]], [l1s[k]])
        train(alone, src, cfg, progress=False)
        for name, p in alone.state_dict().items():
            torch.testing.assert_close(ensemble.member(k).state_dict()[name], p, atol=1e-6, rtol=0, msg=f"member {k} {name}")


def test_a_topk_member_beside_a_larger_k_differs_only_by_rounding():
    """The one way a member depends on its ensemble: TopK decodes sparsely or densely by the ensemble's largest k
    (prefers_sparse). k=2 of 64 latents at d=16 decodes sparsely alone and densely beside k=4, so the sums run in
    another order: measured 2.4e-7 after 100 steps (in docs/guides/distributed.md as the exception)."""
    from saekit.sae import TopKSAE
    from saekit.sae.sparse_decode import prefers_sparse

    assert prefers_sparse(2, 64, 16, "cpu") and not prefers_sparse(4, 64, 16, "cpu")
    src = ToySource(**SOURCE)
    cfg = Config.model_validate({"train": {**TRAIN, "samples": 64 * 100}}).train
    with one_thread():
        pair = TopKSAE(16, 64, [0, 1], [2, 4], dead_after=640)
        train(pair, src, cfg, progress=False)
        alone = TopKSAE(16, 64, [0], [2], dead_after=640)
        train(alone, src, cfg, progress=False)
    worst = (pair.member(0).W_dec - alone.W_dec).abs().max().item()
    assert worst <= TOL


def test_merge_keeps_done_rows_and_removes_rank_files(tmp_path):
    def add(store: RunStore, run_id: str, done: bool, value: float) -> None:
        store.start_run(run_id, arch="relu", dict_size=8, knob="l1", knob_value=0.1, seed=0, config={}, checkpoint=f"ckpt/{run_id}")
        store.log_history(run_id, 10, {"loss": value})
        if done:
            store.finish_run(run_id, samples=10, seconds=1.0, metrics={"mse": value})

    with RunStore(tmp_path) as main:
        add(main, "x", True, 1.0)  # done in the main store: a stale running copy elsewhere must not replace it
    with RunStore(tmp_path, rank_filename(0)) as r0:
        add(r0, "a", True, 2.0)
        add(r0, "x", False, 9.0)
    with RunStore(tmp_path, rank_filename(1)) as r1:
        add(r1, "b", False, 3.0)
    assert merge_rank_stores(tmp_path) == 2
    assert not list(tmp_path.glob("runs.rank*"))
    with RunStore(tmp_path) as main:
        assert {r["run_id"]: r["status"] for r in main.runs()} == {"x": "done", "a": "done", "b": "running"}
        assert main.get("x")["mse"] == 1.0 and main.history("x")[0]["loss"] == 1.0
        assert main.history("a")[0]["loss"] == 2.0 and main.history("b")[0]["loss"] == 3.0


def test_one_process_skips_and_merges_runs_done_in_a_rank_file(tmp_path):
    """A rank file left by an interrupted distributed sweep: a single-process re-run counts its done runs as done
    (no retraining), merges it into OUT/runs.sqlite and removes it."""
    data = {"source": SOURCE, "sae": {"arch": "relu", "dict_size": 32, "l1": [0.3, 1.0]}, "train": {**TRAIN, "samples": 64 * 10}}
    first = single(data, tmp_path)
    (tmp_path / "runs.sqlite").rename(tmp_path / rank_filename(1))
    for suffix in ("-wal", "-shm"):
        Path(f"{tmp_path / 'runs.sqlite'}{suffix}").unlink(missing_ok=True)
    again = single(data, tmp_path)
    assert again == first  # the same rows, seconds included: nothing was trained again
    assert not list(tmp_path.glob("runs.rank*"))


# -- 2 ranks ------------------------------------------------------------------------------------------------


TMS = {"kind": "tms", "d": 16, "n_features": 32, "model_steps": 300, "seed": 1}
SWEEPS = {
    # toy data, 4 L1 values x 2 sizes, resampling on (large L1s leave dead latents) to exercise its per-member generators
    "relu": (SOURCE, {"arch": "relu", "dict_size": [32, 64], "l1": [0.3, 1.0, 3.0, 10.0]}),
    # a tms source (rank 0 trains and caches its model, then the other rank reads it), members with different k in
    # one ensemble (a rank's ensemble takes max(k) over its own members)
    "topk": (TMS, {"arch": "topk", "dict_size": [32, 64], "k": [2, 4, 3], "dead_after": 640}),
}


@pytest.mark.parametrize("arch", sorted(SWEEPS))
def test_sweep_on_two_ranks_equals_one_process(tmp_path, arch):
    resample = {"resample_every": 640, "resample_duplicates": True, "duplicate_cosine": 0.7} if arch == "relu" else {}
    source, sae = SWEEPS[arch]
    data = {"source": source, "sae": sae, "train": {**TRAIN, **resample}}
    reference = single(data, tmp_path / "single")
    rows = torchrun(write_config(tmp_path / "cfg.yaml", data), tmp_path / "out")
    assert [r["run_id"] for r in rows] == [r["run_id"] for r in reference]
    weights, metrics = differences(reference, rows)
    print(f"\n{arch} sweep, 2 ranks vs 1 process: max |weight difference| {weights:.3g}, max |metric difference| {metrics:.3g}")
    assert weights <= TOL and metrics <= TOL
    check_store(tmp_path / "out", rows)
    if source is TMS:
        assert len(list((tmp_path / "out" / "sources").glob("*.safetensors"))) == 1


DATA_PARALLEL = {
    "relu": {"arch": "relu", "dict_size": 64, "l1": [0.3, 1.0]},
    # resampling too: the window of fired latents is the union over ranks, rank 0 resamples and broadcasts
    "topk": {"arch": "topk", "dict_size": 64, "k": [3], "dead_after": 640},
    "batchtopk": {"arch": "batchtopk", "dict_size": 64, "k": [3, 2], "dead_after": 640},
    "jumprelu": {"arch": "jumprelu", "dict_size": 64, "l0_coef": [0.001]},
    "gated": {"arch": "gated", "dict_size": 64, "l1": [0.01]},
    # the batch top k over every rank's rows, then each rank's prefix losses on its own rows
    "matryoshka": {"arch": "matryoshka", "dict_size": 64, "k": [3, 2], "dead_after": 640},
}


@pytest.mark.parametrize("arch", sorted(DATA_PARALLEL))
def test_data_parallel_on_two_ranks_equals_one_process(tmp_path, arch):
    """Each rank trains on its half of every batch; the result is the one-process SAE's (same batches)."""
    resample = {"resample_every": 640, "resample_duplicates": True, "duplicate_cosine": 0.7} if arch == "topk" else {}
    data = {"source": SOURCE, "sae": DATA_PARALLEL[arch], "train": {**TRAIN, **resample, "parallel": "data"}}
    reference = single(data, tmp_path / "single")
    rows = torchrun(write_config(tmp_path / "cfg.yaml", data), tmp_path / "out")
    weights, metrics = differences(reference, rows)
    print(f"\n{arch} data-parallel, 2 ranks vs 1 process: max |weight difference| {weights:.3g}, max |metric difference| {metrics:.3g}")
    assert weights <= TOL and metrics <= TOL
    check_store(tmp_path / "out", rows)
    with RunStore(tmp_path / "single") as a, RunStore(tmp_path / "out") as b:  # history: means over the whole batch
        for r in reference:
            for h1, h2 in zip(a.history(r["run_id"]), b.history(r["run_id"]), strict=True):
                assert h1.keys() == h2.keys()
                assert all(abs(h1[k] - h2[k]) <= TOL for k in h1)


RANK_SCRIPT = """
import gc, json, os, sys
from pathlib import Path
import torch
from saekit.config import Config
from saekit.distributed import distributed_env
from saekit.train.run import run_config

torch.set_num_threads(1)
cfg = Config.model_validate(json.loads(sys.argv[1]))
rows, errors = run_config(cfg, sys.argv[2], progress=False, dist_env=distributed_env())
gc.collect()
workers = sum(Path(t, "comm").read_text().strip() == "pt_gloo_runloop" for t in Path("/proc/self/task").iterdir())
report = {"errors": errors, "gloo_workers_left": workers}
Path(sys.argv[3], f"report{os.environ['RANK']}.json").write_text(json.dumps(report))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts gloo's worker threads through /proc")
def test_the_process_group_and_its_gloo_workers_are_gone_when_a_rank_returns(tmp_path):
    """When `run_config` returns on a rank, `destroy_process_group` has freed the group and joined gloo's worker
    threads. A worker still alive when the interpreter shuts down can release a finished collective then, take
    the GIL to free its tensors and abort the rank after it wrote its results ('terminate called without an active
    exception'; a core dump of such a rank shows ~AsyncAllgatherWork under ~AsyncBarrierWork in
    ProcessGroupGloo::runLoop). Without `import_dynamo_first` both workers of each rank are left here."""
    data = {"source": SOURCE, "sae": DATA_PARALLEL["batchtopk"], "train": {**TRAIN, "samples": 64 * 10, "parallel": "data"}}
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    # Each rank writes its own report file: two ranks printing to one shared stdout can interleave their lines.
    proc = run_torchrun([*TORCHRUN, str(script), json.dumps(data), str(tmp_path / "out"), str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads((tmp_path / f"report{rank}.json").read_text()) for rank in (0, 1)]
    assert reports == [{"errors": [], "gloo_workers_left": 0}] * 2


def test_data_parallel_activations_read_each_ranks_own_shards(tmp_path):
    """On activations on disk, rank r trains on the shard files i with i % 2 == r; the result is the SAE one process
    trains on the two ranks' batches concatenated (and the scale is rank 0's measurement on all training rows)."""
    from test_activations_source import write_activations

    folder = write_activations(tmp_path / "acts", 40, shard_rows=64, trace=False)  # 10 shards of 4 windows of 16
    data = {
        "source": {"kind": "activations", "path": str(folder), "buffer_size": 200, "eval_fraction": 0.1},
        "sae": {"arch": "relu", "dict_size": 32, "l1": 0.3},
        "train": {**TRAIN, "samples": 64 * 40, "parallel": "data"},
    }
    rows = torchrun(write_config(tmp_path / "cfg.yaml", data), tmp_path / "out")
    cfg = Config.model_validate(data)
    ranks = [make_source(cfg.source, shard=(0, 2))]
    ranks.append(make_source(cfg.source, shard=(1, 2), norms=ranks[0].norms))
    assert ranks[0].norms == make_source(cfg.source).norms  # the scale of one process on the whole folder
    # 36 training windows: shards 0,2,4,6,8 (20 windows) to rank 0, shards 1,3,5,7 and the training part of 9 to rank 1
    assert (ranks[0].train_windows, ranks[1].train_windows) == (20, 16)

    class Concatenated:
        d, ground_truth = ranks[0].d, None

        def batch(self, batch_size: int, step: int, stream: int = 0) -> torch.Tensor:
            assert stream == 0
            return torch.cat([r.batch(batch_size // 2, step, 0) for r in ranks])

    spec = expand_grid(cfg)[0]
    sae = build_ensemble(cfg, plan_ensembles([spec], [run_id_for(cfg, spec)])[0], ranks[0].d, torch.device("cpu"))
    with one_thread():
        train(sae, Concatenated(), cfg.train, progress=False)
    trained = load_sae(rows[0]["checkpoint"])
    worst = max((a - b).abs().max().item() for a, b in zip(sae.state_dict().values(), trained.state_dict().values()))
    print(f"\nactivations data-parallel, 2 ranks vs 1 process on the concatenated batches: max |weight difference| {worst:.3g}")
    assert worst <= TOL
    assert json.loads((tmp_path / "out" / "source.json").read_text())["shard"] == [0, 2]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds torchrun's worker processes through /proc")
def test_a_sweep_resumes_after_a_rank_is_killed(tmp_path):
    """SIGKILL one rank once both ranks have checkpoints; torchrun stops the other. The same command again skips
    the runs that finished, resumes each rank's ensembles from their checkpoints (same world size, same share)
    and ends where one uninterrupted process ends.

    The kill must land before either rank finishes its share (a finished ensemble's checkpoint is removed). Both
    ranks start training together (after the rendezvous and rank 0's broadcasts); the trigger is each ensemble's
    first checkpoint, after 25 of its 600 steps, so a rank would have to run 24 times as far as the other, or the
    test stand still for 23/24 of a rank's training, for the kill to come too late: a count of steps, not seconds."""
    data = {
        "source": SOURCE,
        "sae": {"arch": "relu", "dict_size": [32, 64], "l1": [0.3, 1.0]},
        "train": {**TRAIN, "samples": 64 * 600, "checkpoint_every": 64 * 25, "log_every": 50},
    }
    config, out = write_config(tmp_path / "cfg.yaml", data), tmp_path / "out"
    proc = subprocess.Popen(torchrun_cmd(config, out), env=torchrun_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait = 300  # a bound on the wait (2 ranks importing torch on busy cores), not a timing assertion
        deadline = time.monotonic() + wait
        while proc.poll() is None and len(list((out / "ensembles").glob("*/cfg.json"))) < 4:
            assert time.monotonic() < deadline, f"fewer than 4 ensemble checkpoints (2 per rank) after {wait} s"
            time.sleep(0.05)
        assert proc.poll() is None, "the sweep finished before a rank could be killed; make it longer"
        workers = _children(proc.pid)
        assert len(workers) == 2, f"torchrun has {len(workers)} workers, not 2, when both ranks have checkpoints"
        os.kill(workers[-1], signal.SIGKILL)
        try:
            proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            pytest.fail("torchrun did not stop within 300 s of one of its ranks being killed")
    finally:
        if proc.poll() is None:
            stop_torchrun(proc)
    assert proc.returncode != 0
    assert list(out.glob("runs.rank*.sqlite")), "each rank's rows stay in its file until the merge"
    ckpts = [json.loads(p.read_text()) for p in (out / "ensembles").glob("*/cfg.json")]
    assert ckpts and all(0 < c["samples"] < data["train"]["samples"] for c in ckpts)
    rows = torchrun(config, out)
    assert len(rows) == 4 and all(r["status"] == "done" for r in rows)
    assert sum(r["resumed_from_samples"] > 0 for r in rows) >= 2, "the killed sweep's ensembles resume from their checkpoints"
    check_store(out, rows)
    reference = single(data, tmp_path / "single")
    weights, metrics = differences(reference, rows)
    print(
        f"\nresumed 2-rank sweep vs 1 uninterrupted process: max |weight difference| {weights:.3g}, max |metric difference| {metrics:.3g}"
    )
    assert weights <= TOL and metrics <= TOL
    with sqlite3.connect(out / "runs.sqlite") as db:  # no history row lost across the kill
        for r in rows:
            samples = sorted(s for (s,) in db.execute("SELECT DISTINCT samples FROM history WHERE run_id=?", (r["run_id"],)))
            assert samples == list(range(64 * 50, data["train"]["samples"] + 1, 64 * 50))
