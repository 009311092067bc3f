"""source.kind 'activations': shards on disk through a shuffle buffer, the held-out split, the scale, resume."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from saekit.config import SourceConfig, parse_config
from saekit.errors import InputError
from saekit.io import fold_input_scale
from saekit.lm.shards import ShardWriter
from saekit.sae import ReluSAE
from saekit.sources import make_source
from saekit.sources.activations import ActivationSource

WINDOW, D = 16, 8


def write_activations(
    folder: Path, n_windows: int, *, window: int = WINDOW, d: int = D, shard_rows: int = 64, scale: float = 3.0, trace: bool = True
) -> Path:
    """Synthetic shards of seeded Gaussians times `scale`; with `trace`, column 0 holds the global row number instead
    (so every served row can be traced back). float32, so row numbers stay exact."""
    meta = {
        "model": "synthetic", "model_name": "synthetic", "model_class": "None", "causal": False, "layer": 0, "site": "resid",
        "d": d, "window": window, "dtype": "float32", "text": "none", "tokens_requested": n_windows * window,
    }  # fmt: skip
    writer = ShardWriter(folder, meta, shard_rows=shard_rows)
    g = torch.Generator().manual_seed(0)
    n = n_windows * window
    acts = torch.randn(n, d, generator=g) * scale
    if trace:
        acts[:, 0] = torch.arange(n, dtype=torch.float32)
    writer.append(acts, torch.arange(n, dtype=torch.int32) % 50)
    writer.close(complete=True)
    return folder


def served_rows(x: torch.Tensor, source: ActivationSource) -> list[int]:
    return (x[:, 0] / source.input_scale).round().long().tolist()


def test_training_rows_are_distinct_training_positions_until_the_epoch_ends(tmp_path: Path) -> None:
    # 40 windows of 16: 2 held out (5%), 38 train; skip position 0 -> 38 * 15 = 570 training rows.
    src = ActivationSource(write_activations(tmp_path / "a", 40), buffer_size=100, skip_positions=1, seed=3)
    assert (src.train_windows, src.eval_windows, src.train_rows) == (38, 2, 570)
    rows = []
    for t in range((570 - 100) // 10):  # rows leave the buffer once each before the epoch wraps
        rows += served_rows(src.batch(10, t), src)
    assert len(rows) == len(set(rows)) == 470
    assert all(r < 38 * WINDOW and r % WINDOW != 0 for r in rows)  # no held-out window, no position 0


def test_batches_are_shuffled_not_in_disk_order(tmp_path: Path) -> None:
    src = ActivationSource(write_activations(tmp_path / "a", 40), buffer_size=200, seed=0)
    rows = served_rows(src.batch(32, 0), src)
    assert rows != sorted(rows)
    assert max(rows) - min(rows) > 32  # drawn from across the buffer, not one contiguous run


def test_batch_t_is_the_same_whether_reached_in_order_or_directly(tmp_path: Path) -> None:
    folder = write_activations(tmp_path / "a", 40)
    a = ActivationSource(folder, buffer_size=100, seed=1)
    in_order = [a.batch(16, t) for t in range(50)]  # wraps into a second epoch (50 * 16 > 570)
    b = ActivationSource(folder, buffer_size=100, seed=1)
    assert torch.equal(b.batch(16, 37), in_order[37])  # a resume: replayed on row ids, then loaded
    assert torch.equal(b.batch(16, 38), in_order[38])
    assert torch.equal(b.batch(16, 5), in_order[5])  # going back rebuilds from the start
    c = ActivationSource(folder, buffer_size=100, seed=2)
    assert not torch.equal(c.batch(16, 5), in_order[5])  # another seed, another order


def test_the_evaluation_stream_reads_the_held_out_windows_in_order(tmp_path: Path) -> None:
    src = ActivationSource(write_activations(tmp_path / "a", 40), skip_positions=2, seed=0)
    assert src.eval_rows == 2 * (WINDOW - 2)
    rows = served_rows(src.batch(src.eval_rows, 0, stream=1), src)
    expected = [w * WINDOW + p for w in (38, 39) for p in range(2, WINDOW)]
    assert rows == expected
    assert served_rows(src.batch(5, 6, stream=1), src) == [expected[(30 + i) % len(expected)] for i in range(5)]  # wraps


def test_normalize_scales_the_mean_squared_norm_to_d(tmp_path: Path) -> None:
    folder = write_activations(tmp_path / "a", 200, d=64, window=16, shard_rows=512, trace=False)
    src = ActivationSource(folder, buffer_size=400, skip_positions=0, seed=0, normalize=True)
    assert src.input_scale == pytest.approx(1 / 3, rel=0.02)  # rows are N(0, 9 I): E||x||^2 = 9 d, so s = sqrt(d / 9d)
    x = torch.cat([src.batch(256, t) for t in range(10)])
    assert x.pow(2).sum(1).mean().item() == pytest.approx(64, rel=0.03)
    raw = ActivationSource(folder, buffer_size=400, skip_positions=0, seed=0, normalize=False)
    assert raw.input_scale == 1.0
    assert torch.allclose(src.batch(8, 0), raw.batch(8, 0) * src.input_scale)


def test_random_streams_draw_training_rows(tmp_path: Path) -> None:
    src = ActivationSource(write_activations(tmp_path / "a", 40), seed=0)
    a, b = src.batch(64, 3, stream=2), src.batch(64, 3, stream=2)
    assert torch.equal(a, b)
    assert all(r < 38 * WINDOW and r % WINDOW != 0 for r in served_rows(a, src))


def test_bad_activation_folders_are_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="manifest"):
        ActivationSource(tmp_path / "missing")
    folder = write_activations(tmp_path / "a", 40)
    with pytest.raises(InputError, match="skip_positions"):
        ActivationSource(folder, skip_positions=WINDOW)
    with pytest.raises(InputError, match="at least 2"):
        ActivationSource(write_activations(tmp_path / "one", 1))
    nan = write_activations(tmp_path / "nan", 40, scale=float("nan"))
    with pytest.raises(InputError, match="NaN"):
        ActivationSource(nan)


def test_config_keys_of_the_activations_kind(tmp_path: Path) -> None:
    folder = write_activations(tmp_path / "a", 40)
    cfg = parse_config({"source": {"kind": "activations", "path": str(folder), "buffer_size": 50}})
    src = make_source(cfg.source)
    assert isinstance(src, ActivationSource) and src.d == D and src.buffer_rows == 50
    with pytest.raises(InputError, match="width"):
        make_source(parse_config({"source": {"kind": "activations", "path": str(folder), "d": 9}}).source)
    with pytest.raises(InputError, match="needs source.path"):
        parse_config({"source": {"kind": "activations"}})
    with pytest.raises(InputError, match="applies to kind 'activations' only"):
        parse_config({"source": {"kind": "toy", "buffer_size": 10}})
    assert set(SourceConfig(kind="activations", path="x").relevant()) >= {"path", "buffer_size", "skip_positions", "normalize"}


def test_fold_input_scale_gives_the_same_codes_and_raw_reconstructions() -> None:
    # Hand derivation in fold_input_scale's docstring: codes of s*x under the trained weights equal codes of x under the
    # folded weights, and the folded decoder returns x_hat(s x) / s.
    sae = ReluSAE(d=6, dict_size=10, seeds=[0], l1=[0.1], decoder_bias=True)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    s = 0.37
    x = torch.randn(20, 6)
    x_hat_scaled, c_scaled = sae(x * s)
    folded = ReluSAE(d=6, dict_size=10, seeds=[0], l1=[0.1], decoder_bias=True)
    folded.load_state_dict(fold_input_scale(dict(sae.state_dict()), s))
    x_hat_raw, c_raw = folded(x)
    assert torch.allclose(c_raw, c_scaled, atol=1e-5)
    assert torch.allclose(x_hat_raw, x_hat_scaled / s, atol=1e-5)
    assert math.isclose(s, 0.37)


def test_massive_activations_are_left_out_and_do_not_set_the_scale(tmp_path: Path) -> None:
    # Rows of N(0, 9 I) in d = 64 have norm ~24; every 100th row is made 1000x larger (like an attention sink's).
    folder = write_activations(tmp_path / "a", 100, d=64, shard_rows=512, trace=False)
    from safetensors.torch import load_file, save_file

    from saekit.atomic import sha256_of_file

    manifest_path = folder / "manifest.json"
    import json

    manifest = json.loads(manifest_path.read_text())
    row = 0
    for shard in manifest["shards"]:
        tensors = load_file(str(folder / shard["file"]))
        big = (torch.arange(row, row + shard["rows"]) % 100) == 50
        tensors["activations"][big] *= 1000
        save_file(tensors, str(folder / shard["file"]))
        shard["sha256"] = sha256_of_file(folder / shard["file"])
        row += shard["rows"]
    manifest_path.write_text(json.dumps(manifest))
    src = ActivationSource(folder, buffer_size=300, skip_positions=0, seed=0, max_norm_ratio=10)
    assert src.norm_threshold == pytest.approx(10 * 24, rel=0.05)  # 10 x the median norm, sqrt(64 * 9) = 24
    assert src.input_scale == pytest.approx(1 / 3, rel=0.03)  # as without the massive rows
    for stream in (0, 1, 2):
        x = torch.cat([src.batch(100, t, stream) for t in range(5)])
        assert x.norm(dim=1).max() < 3 * math.sqrt(64)  # scaled ordinary rows only (norm ~8)
        assert x.shape[0] < 500  # the massive rows were dropped, not replaced
    held_out = range(src.train_windows * WINDOW, 100 * WINDOW)  # windows 95..99: rows 1520..1599, of which 1550 is massive
    assert src.eval_rows_kept == src.eval_rows - sum(1 for r in held_out if r % 100 == 50) == 79
    kept_all = ActivationSource(folder, buffer_size=300, skip_positions=0, seed=0, max_norm_ratio=0)
    assert math.isinf(kept_all.norm_threshold) and kept_all.input_scale < 0.05  # 1% of rows at 1000x dominate


def test_the_downstream_splice_leaves_massive_rows_clean() -> None:
    from saekit.lm.downstream import sae_splice

    sae = ReluSAE(d=4, dict_size=8, seeds=[0], l1=[0.1])
    x = torch.tensor([[1.0, 0.0, 0.0, 0.0], [500.0, 0.0, 0.0, 0.0]])
    out = sae_splice(sae, 0, input_scale=2.0, norm_threshold=100.0)(x.clone())
    assert torch.equal(out[1], x[1])  # above the threshold: passed through
    x_hat, _ = sae(x[:1] * 2.0)
    assert torch.allclose(out[0], x_hat[0, 0] / 2.0)  # below: the SAE's reconstruction in raw scale
