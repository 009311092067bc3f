"""Sweeps: ensembles equal lone SAEs, lockstep training, memory refusal, and resume after SIGKILL."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kill import kill_at_first_checkpoint
from saekit.config import Config, RunSpec, TrainConfig
from saekit.errors import InputError
from saekit.io import load_sae
from saekit.sae import ReluSAE
from saekit.sources import ToySource
from saekit.store import RunStore
from saekit.train.identity import run_id_for
from saekit.train.loop import make_state, train, train_lockstep
from saekit.train.plan import ensemble_memory_bytes, parse_bytes, plan_ensembles
from saekit.train.run import run_config


def test_each_member_ends_where_it_ends_alone():
    """An ensemble of 4 (2 seeds x 2 l1) trained in one batched step vs the same SAEs trained one by one."""
    src = ToySource(d=16, n_features=24, mean_active=3, seed=0)
    cfg = TrainConfig(batch_size=64, samples=64 * 150, lr=3e-3)
    seeds, l1s = [5, 6, 5, 6], [0.1, 0.1, 1.0, 1.0]
    ensemble = ReluSAE(16, 40, seeds, l1s)
    train(ensemble, src, cfg, progress=False)
    for k in range(4):
        alone = ReluSAE(16, 40, [seeds[k]], [l1s[k]])
        train(alone, src, cfg, progress=False)
        member = ensemble.member(k)
        for name, p in alone.state_dict().items():
            torch.testing.assert_close(member.state_dict()[name], p, atol=1e-6, rtol=0, msg=f"member {k} {name}")


def test_lockstep_ensembles_share_the_stream():
    """Two ensembles of different sizes trained in lockstep end where each ends trained alone."""
    src = ToySource(d=8, n_features=12, mean_active=2, seed=1)
    cfg = TrainConfig(batch_size=32, samples=32 * 40)
    a, b = ReluSAE(8, 8, [0], [0.1]), ReluSAE(8, 24, [1, 2], [0.1, 0.3])
    train_lockstep([make_state(a, cfg), make_state(b, cfg)], src, cfg, progress=False)
    a2, b2 = ReluSAE(8, 8, [0], [0.1]), ReluSAE(8, 24, [1, 2], [0.1, 0.3])
    train(a2, src, cfg, progress=False)
    train(b2, src, cfg, progress=False)
    torch.testing.assert_close(a.W_dec, a2.W_dec, atol=1e-6, rtol=0)
    torch.testing.assert_close(b.W_dec, b2.W_dec, atol=1e-6, rtol=0)


def test_plan_groups_by_size_and_skips_done():
    specs = [RunSpec(arch="relu", dict_size=m, sparsity=a, seed=s) for m in (8, 16) for a in (0.1, 0.2) for s in (0, 1)]
    ids = [f"r{i}" for i in range(len(specs))]
    plans = plan_ensembles(specs, ids, skip={"r0", "r5"})
    assert [(p.dict_size, p.run_ids) for p in plans] == [(8, ("r1", "r2", "r3")), (16, ("r4", "r6", "r7"))]
    assert plans[0].ensemble_id == plan_ensembles(specs, ids, skip={"r0", "r5"})[0].ensemble_id
    assert plans[0].ensemble_id != plan_ensembles(specs, ids)[0].ensemble_id


def test_memory_estimate_and_refusal(tmp_path):
    # K=2, d=10, m=20, B=5: params 2*(2*10*20 + 20 + 10) = 860 floats, x4 copies = 3440;
    # activations 2*5*(3*20 + 4*11) = 1040 floats; (3440 + 1040) * 4 bytes = 17920.
    assert ensemble_memory_bytes(2, 10, 20, 5) == 17920
    assert parse_bytes("2G") == 2 * 1024**3 and parse_bytes("500M") == 500 * 1024**2 and parse_bytes("1000") == 1000
    with pytest.raises(ValueError):
        parse_bytes("lots")
    cfg = Config.model_validate({"source": {"d": 8, "n_features": 12, "mean_active": 2}, "sae": {"dict_size": [8, 16]}})
    with pytest.raises(InputError, match="needs about .* more than --max-memory"):
        run_config(cfg, tmp_path / "out", progress=False, max_memory=1000)
    assert not (tmp_path / "out").exists()


SWEEP = [
    "source.d=16",
    "source.n_features=24",
    "source.mean_active=3",
    "sae.dict_size=[24,48]",
    "sae.l1=[0.3,1.0]",
    "train.batch_size=64",
    "train.samples=400000",
    "train.checkpoint_every=20000",
    "train.log_every=50",
    "train.eval_samples=5000",
    "train.lr=3e-3",
]


def _saekit(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "saekit.cli", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def _communicate(proc: subprocess.Popen, timeout: float) -> tuple[bytes, bytes]:
    """The process's output once it ends; past `timeout` seconds (a bound on a hang, not a timing assertion) it is
    killed and the test fails saying what it waited for."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=60)
        pytest.fail(f"`saekit {proc.args[3]}` did not finish within {timeout:.0f} s (killed)")


def _sets(items: list[str]) -> list[str]:
    return [a for s in items for a in ("--set", s)]


@pytest.mark.slow
def test_sigkill_then_rerun_loses_nothing_and_resumes(tmp_path):
    out = tmp_path / "out"
    # 1. A finished sweep of two sizes.
    first = _saekit(["train", *_sets(SWEEP), "--out", str(out), "--json", "--no-progress"])
    stdout, stderr = _communicate(first, 600)
    assert first.returncode == 0, stderr
    finished = {r["run_id"]: r for r in json.loads(stdout)}
    with RunStore(out) as store:
        before = {r["run_id"]: r for r in store.runs()}
    # 2. The same sweep with a larger size added: killed once its ensemble has a checkpoint.
    bigger = [s if not s.startswith("sae.dict_size") else "sae.dict_size=[24,48,96]" for s in SWEEP]
    # The trigger is the 96s' first checkpoint, 1/20 of their training (20,000 of 400,000 samples): the kill lands
    # mid-training unless this process stands still for the other 19/20.
    proc = _saekit(["train", *_sets(bigger), "--out", str(out), "--json", "--no-progress"])
    # the kill lands a little past the checkpoint (the settle is not needed for the test)
    kill_at_first_checkpoint(proc, out, within=300, poll=0.05, settle=0.3)
    ckpt = json.loads(next((out / "ensembles").glob("*/cfg.json")).read_text())
    assert 0 < ckpt["samples"] < 400000
    # 3. Re-run: finished runs untouched, the killed ensemble resumes from its checkpoint.
    again = _saekit(["train", *_sets(bigger), "--out", str(out), "--json", "--no-progress"])
    stdout, stderr = _communicate(again, 600)
    assert again.returncode == 0, stderr
    rows = {r["run_id"]: r for r in json.loads(stdout)}
    assert len(rows) == 6 and all(r["status"] == "done" for r in rows.values())
    with RunStore(out) as store:
        after = {r["run_id"]: r for r in store.runs()}
        for run_id, row in before.items():
            assert after[run_id] == row, "a finished run was retrained or changed"
            assert rows[run_id] == finished[run_id]
        new = [r for r in after.values() if r["dict_size"] == 96]
        assert len(new) == 2
        for r in new:
            assert r["metrics"]["resumed_from_samples"] > 0
            assert r["samples"] == 400000 and Path(r["checkpoint"], "sae.safetensors").is_file()
            load_sae(r["checkpoint"])
            hist = store.history(r["run_id"])
            assert [h["samples"] for h in hist] == sorted({h["samples"] for h in hist}) and hist[-1]["samples"] == 400000
    assert not list((out / "ensembles").glob("*")), "ensemble checkpoints are removed once their runs are done"


@pytest.mark.slow
def test_resumed_training_equals_uninterrupted(tmp_path):
    """Stopping after a checkpoint and resuming gives the weights an uninterrupted run gives (same batches, Adam state, lr)."""
    base = {
        "source": {"d": 8, "n_features": 12, "mean_active": 2},
        "sae": {"dict_size": 16, "l1": [0.1, 0.3]},
        "train": {"batch_size": 32, "samples": 32 * 60, "checkpoint_every": 32 * 20, "eval_samples": 1000, "lr": 3e-3},
    }
    whole, _ = run_config(Config.model_validate(base), tmp_path / "whole", progress=False)
    # Interrupted: train the first 20 steps (checkpoint), then copy that checkpoint to a fresh sweep folder and resume.
    short = json.loads(json.dumps(base))
    short["train"]["samples"] = 32 * 20
    cfg_short = Config.model_validate(short)
    import saekit.train.run as run_mod

    cfg_full = Config.model_validate(base)
    from saekit.config import expand_grid
    from saekit.io import save_checkpoint

    specs = expand_grid(cfg_full)
    ids = [run_id_for(cfg_full, s) for s in specs]
    plan = plan_ensembles(specs, ids)[0]
    sae = run_mod.build_ensemble(cfg_full, plan, 8, torch.device("cpu"))
    state = make_state(sae, cfg_full.train)
    train_lockstep([state], ToySource(d=8, n_features=12, mean_active=2), cfg_short.train, progress=False)
    save_checkpoint(
        tmp_path / "resumed" / "ensembles" / plan.ensemble_id, sae, samples=32 * 20, optimizer=state.optimizer, extra={"step": state.step}
    )
    resumed, _ = run_config(cfg_full, tmp_path / "resumed", progress=False)
    assert [r["resumed_from_samples"] for r in resumed] == [640, 640]
    for a, b in zip(whole, resumed):
        wa, wb = load_sae(a["checkpoint"]), load_sae(b["checkpoint"])
        torch.testing.assert_close(wa.W_dec, wb.W_dec, atol=1e-6, rtol=0)
        assert a["mmcs"] == pytest.approx(b["mmcs"], abs=1e-6)


@pytest.mark.slow
def test_reproduce_grid_end_to_end_small(tmp_path):
    """`saekit reproduce --preset grid` on a small toy (d=32, G=48): sweep, estimate within 15% of G, report page, JSON."""
    out = tmp_path / "rep"
    proc = _saekit(
        [
            "reproduce",
            "--preset",
            "grid",
            "--set",
            "source.d=32",
            "--set",
            "source.n_features=48",
            "--set",
            "source.seed=2",
            "--out",
            str(out),
            "--json",
            "--no-progress",
        ]
    )
    stdout, stderr = _communicate(proc, 900)
    assert proc.returncode == 0, stderr
    result = json.loads(stdout)
    est = result["estimate"]
    for key in ("n_features", "low", "high", "dict_size", "l1"):
        assert key in est
    # the grid from d=32: sizes 16..256, 4 L1 values, a second seed at 128 and 256 -> 5*4 + 2*4 = 28 SAEs
    assert len(result["runs"]) == 28 and all(r["status"] == "done" for r in result["runs"])
    assert abs(est["n_features"] - 48) <= 0.15 * 48, est["summary"]
    recommended = [r for r in result["runs"] if r["dict_size"] == est["dict_size"] and r["l1"] == est["l1"]]
    assert recommended and recommended[0]["mmcs"] >= 0.95
    page = (out / "report.html").read_text()
    assert "<img" in page and "http://" not in page
    # estimate and report also work on their own on the same folder
    again = subprocess.run(
        [sys.executable, "-m", "saekit.cli", "estimate", str(out), "--json"], capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0 and json.loads(again.stdout)["n_features"] == est["n_features"]
    (out / "report.html").unlink()
    rep = subprocess.run([sys.executable, "-m", "saekit.cli", "report", str(out)], capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0 and (out / "report.html").is_file()


def test_failed_final_save_leaves_the_whole_ensemble_resumable(tmp_path, monkeypatch):
    """A write failing at the second member's final save (a full disk) marks no member done and keeps the
    ensemble's checkpoint, so the re-run resumes all members at the end of training instead of retraining
    the unfinished ones from scratch (found by the fault tests; before, member 0 was done and member 1 restarted)."""
    import saekit.train.run as run_mod

    cfg = Config.model_validate(
        {
            "source": {"d": 8, "n_features": 12, "mean_active": 2},
            "sae": {"dict_size": 16, "l1": [0.1, 0.3]},
            "train": {"batch_size": 32, "samples": 32 * 20, "eval_samples": 500},
        }
    )
    real_save = run_mod.save_checkpoint
    final_saves = []

    def failing_save(folder, *args, **kwargs):
        if Path(folder).parent.name == "runs":
            final_saves.append(folder)
            if len(final_saves) == 2:
                raise OSError(28, "No space left on device", str(folder))
        return real_save(folder, *args, **kwargs)

    monkeypatch.setattr(run_mod, "save_checkpoint", failing_save)
    out = tmp_path / "out"
    with pytest.raises(OSError):
        run_config(cfg, out, progress=False)
    with RunStore(out) as store:
        assert [r["status"] for r in store.runs()] == ["running", "running"]
    assert len(list((out / "ensembles").iterdir())) == 1, "the ensemble checkpoint is kept until every member is done"
    monkeypatch.setattr(run_mod, "save_checkpoint", real_save)
    results, errors = run_config(cfg, out, progress=False)
    assert not errors
    assert [r["status"] for r in results] == ["done", "done"]
    assert [r["resumed_from_samples"] for r in results] == [32 * 20, 32 * 20]
    assert not list((out / "ensembles").iterdir())
