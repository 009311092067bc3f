"""The training loop on ground-truth toy data: recovery, checkpoints, divergence, schedules, the run store."""

import pytest
import torch

from saekit.config import Config, TrainConfig, expand_grid
from saekit.io import load_sae, read_cfg
from saekit.sae import ReluSAE
from saekit.sources import ToySource, make_source
from saekit.store import RunStore
from saekit.train.evaluate import evaluate
from saekit.train.identity import run_id_for
from saekit.train.loop import TrainingDiverged, lr_factor, train
from saekit.train.run import run_config

# A small version of the report's setup that trains in seconds: d=32, G=48, ~3 active features,
# a dictionary of 2G latents. The setting (l1=1.0 with the mean reduction, lr 3e-3, 1M samples)
# reached MMCS 0.998 on seeds 0, 1, 2 when it was chosen (docs/results.md, "Small case").
SMALL = {
    "source": {"d": 32, "n_features": 48, "mean_active": 3},
    "sae": {"dict_size": 96, "l1": 1.0},
    "train": {"batch_size": 256, "lr": 3e-3, "samples": 1_000_000, "eval_samples": 20_000},
}


@pytest.mark.parametrize(("seed", "precision"), [(11, "highest"), (12, "highest"), (13, "medium")])
def test_small_case_recovers_the_true_features(seed, precision):
    # precision "medium": bfloat16 matmul products (float32 accumulation and weights) must not cost recovery
    torch.manual_seed(0)
    train_cfg = {**SMALL["train"], "matmul_precision": precision}
    cfg = Config.model_validate({**SMALL, "source": {**SMALL["source"], "seed": seed}, "train": train_cfg})
    src = make_source(cfg.source)
    sae = ReluSAE(32, 96, [seed + 1000], [1.0])
    train(sae, src, cfg.train, progress=False)
    metrics = evaluate(sae, src, 20_000, 4096)[0]
    assert metrics["mmcs"] >= 0.97, metrics
    assert metrics["recovered_0_9"] >= 0.9, metrics
    assert torch.get_float32_matmul_precision() == "highest"  # restored after training


class _BreaksAfter:
    """A toy source whose batches become Inf from step `bad_step` on."""

    def __init__(self, bad_step: int) -> None:
        self.inner = ToySource(d=8, n_features=12, mean_active=2, seed=0)
        self.d, self.ground_truth, self.bad_step = 8, self.inner.ground_truth, bad_step

    def batch(self, batch_size: int, step: int, stream: int = 0) -> torch.Tensor:
        x = self.inner.batch(batch_size, step, stream)
        return x * float("inf") if step >= self.bad_step and stream == 0 else x


def test_divergence_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = TrainConfig(batch_size=64, samples=64 * 40, checkpoint_every=64 * 10, log_every=5)
    sae = ReluSAE(8, 16, [0], [0.1])
    saved = []

    def on_checkpoint(state, samples):
        from saekit.io import save_checkpoint

        save_checkpoint(tmp_path / "ck", sae, samples=samples, optimizer=state.optimizer)
        saved.append(samples)

    with pytest.raises(TrainingDiverged, match="NaN/Inf"):
        train(sae, _BreaksAfter(bad_step=25), cfg, on_checkpoint=on_checkpoint, progress=False)
    # Checkpoints at 640 and 1280 samples (steps 10, 20); the loss is Inf from step 26 on and is caught at
    # the next log step (25 steps done -> fine; 30 -> caught) before the checkpoint due at step 30.
    assert saved == [640, 1280]
    assert read_cfg(tmp_path / "ck")["samples"] == 1280
    loaded = load_sae(tmp_path / "ck")
    assert all(torch.isfinite(p).all() for p in loaded.parameters())


def test_checkpoints_every_n_samples_and_at_the_end(tmp_path):
    cfg = TrainConfig(batch_size=100, samples=1050, checkpoint_every=400, log_every=3)
    sae = ReluSAE(8, 16, [0], [0.1])
    saved, logged = [], []
    train(
        sae,
        ToySource(d=8, n_features=12, mean_active=2),
        cfg,
        on_checkpoint=lambda state, samples: saved.append(samples),
        on_log=lambda samples, row: logged.append((samples, sorted(row))),
        progress=False,
    )
    # 11 steps of 100: the 400- and 800-sample marks are crossed at steps 4 and 8; the end is 1050.
    assert saved == [400, 800, 1050]
    assert [s for s, _ in logged] == [300, 600, 900, 1100]
    assert logged[0][1] == ["l0", "loss", "lr", "reconstruction", "sparsity"]


def test_lr_schedules():
    const = TrainConfig(lr_decay="none")
    assert [lr_factor(s, 10, const) for s in (0, 9)] == [1.0, 1.0]
    lin = TrainConfig(lr_decay="linear", lr_decay_fraction=0.2)
    # 10 steps, decay over the last 2: steps 0..7 at 1, step 8 at 2/2, step 9 at 1/2.
    assert [lr_factor(s, 10, lin) for s in range(10)] == [1.0] * 9 + [0.5]


def test_decoder_rows_stay_unit_norm_during_training():
    sae = ReluSAE(8, 16, [0], [0.1])
    train(sae, ToySource(d=8, n_features=12, mean_active=2), TrainConfig(batch_size=64, samples=640), progress=False)
    torch.testing.assert_close(sae.W_dec.norm(dim=2), torch.ones(1, 16))


def test_run_config_fills_the_store(tmp_path):
    cfg = Config.model_validate(
        {
            "source": {"d": 8, "n_features": 12, "mean_active": 2},
            "sae": {"dict_size": [8, 16], "l1": 0.1},
            "train": {"batch_size": 128, "samples": 1280, "eval_samples": 1000, "log_every": 2},
        }
    )
    rows, errors = run_config(cfg, tmp_path, progress=False)
    assert errors == [] and len(rows) == 2
    with RunStore(tmp_path) as store:
        runs = store.runs()
        assert [r["status"] for r in runs] == ["done", "done"]
        assert {r["run_id"] for r in runs} == {run_id_for(cfg, s) for s in expand_grid(cfg)}
        hist = store.history(runs[0]["run_id"])
        assert [h["samples"] for h in hist] == [256, 512, 768, 1024, 1280]
        assert runs[0]["config"]["sae"]["dict_size"] == 8 and runs[0]["samples"] == 1280
        assert runs[0]["metrics"]["eval_samples"] == 1000
    from saekit.io import load_latent_stats

    stats = load_latent_stats(runs[0]["checkpoint"])
    # fire counts of the final evaluation, and the decoder at 80% of training (1024 of 1280 samples: step 8)
    assert stats["fire_counts"].shape == (8,) and int(stats["eval_samples"]) == 1000
    assert stats["late_directions"].shape == (8, 8)
    torch.testing.assert_close(stats["late_directions"].norm(dim=1), torch.ones(8))


def test_duplicate_latents_keeps_the_first_of_each_copy_group():
    from saekit.train.loop import duplicate_latents

    s = 0.6**0.5  # a row at cosine 0.6**0.5 = 0.775 with e1: similar, not a copy at threshold 0.9
    rows = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0.99, 0.141, 0], [s, 0.4**0.5, 0], [1.0, 0, 0]])
    rows = rows / rows.norm(dim=1, keepdim=True)
    # Latent 2 has cosine 0.99 with latent 0 and latent 4 is an exact copy of it; latent 3 (0.775) is not a copy.
    assert duplicate_latents(rows[None], 0.9).tolist() == [[False, False, True, False, True]]
