"""Checkpoints: round trip, optimizer state, checksums, malformed files, atomic writes."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from saekit import atomic
from saekit.errors import InputError
from saekit.io import atomic_write_bytes, load_optimizer_state, load_sae, read_cfg, save_checkpoint
from saekit.sae import ReluSAE

D, M = 8, 16


def _trained(decoder_bias: bool = False) -> tuple[ReluSAE, torch.optim.Adam]:
    """A tiny SAE after one Adam step, so that weights and Adam state are non-trivial."""
    torch.manual_seed(0)
    sae = ReluSAE(d=D, dict_size=M, seeds=[3], l1=[0.1], decoder_bias=decoder_bias)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    x = torch.randn(4, D)
    sae.training_loss(x)["loss"].sum().backward()
    opt.step()
    opt.zero_grad()
    return sae, opt


def _save(tmp_path: Path, **kwargs) -> tuple[Path, ReluSAE, torch.optim.Adam]:
    sae, opt = _trained(**kwargs)
    folder = save_checkpoint(tmp_path / "ck", sae, samples=100, config={"a": 1}, optimizer=opt)
    return folder, sae, opt


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


def test_round_trip_tensors_and_metadata(tmp_path):
    """load_sae rebuilds the exact tensors and hyperparameters."""
    folder, sae, _ = _save(tmp_path)
    loaded = load_sae(folder)
    assert isinstance(loaded, ReluSAE)
    original, restored = sae.state_dict(), loaded.state_dict()
    assert set(original) == set(restored)
    for name, tensor in original.items():
        assert torch.equal(tensor, restored[name]), name
    assert loaded.seeds == [3]
    # l1 = [0.1] stored as float32 in the buffer, read back through cfg.json: 0.1 up to float32 precision
    assert loaded.l1_coef.tolist() == pytest.approx([0.1])
    assert (loaded.d, loaded.dict_size, loaded.n_members) == (D, M, 1)
    assert loaded.l1_reduction == "mean"
    assert loaded.b_dec is None


def test_round_trip_with_decoder_bias(tmp_path):
    """The decoder bias is saved and restored too."""
    folder, sae, _ = _save(tmp_path, decoder_bias=True)
    loaded = load_sae(folder)
    assert loaded.b_dec is not None
    assert torch.equal(loaded.b_dec, sae.b_dec)


def test_cfg_json_contents(tmp_path):
    """cfg.json records samples, the experiment config and a checksum per file."""
    folder, _, _ = _save(tmp_path)
    cfg = read_cfg(folder)
    assert cfg["samples"] == 100
    assert cfg["config"] == {"a": 1}
    assert cfg["arch"] == "relu"
    for name in ("sae.safetensors", "optimizer.safetensors"):
        assert cfg["sha256"][name] == hashlib.sha256((folder / name).read_bytes()).hexdigest()


def test_optimizer_state_round_trip(tmp_path):
    """load_optimizer_state gives a fresh Adam the same exp_avg, exp_avg_sq and step."""
    folder, sae, opt = _save(tmp_path)
    loaded = load_sae(folder)
    fresh = torch.optim.Adam(loaded.parameters(), lr=1e-2)
    assert len(fresh.state) == 0
    load_optimizer_state(folder, loaded, fresh)
    orig_params = dict(sae.named_parameters())
    new_params = dict(loaded.named_parameters())
    assert set(orig_params) == {"W_enc", "b_enc", "W_dec"}
    for name, p in orig_params.items():
        before, after = opt.state[p], fresh.state[new_params[name]]
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(torch.as_tensor(before[key]), torch.as_tensor(after[key])), (name, key)
        # one step was taken, so the state is not the initial zeros
        assert before["exp_avg"].abs().sum() > 0
        # step == 1 after one optimizer step
        assert float(after["step"]) == 1.0


def test_resumed_optimizer_steps_like_the_original(tmp_path):
    """A second Adam step after restoring matches a second step of the original optimizer."""
    folder, sae, opt = _save(tmp_path)
    loaded = load_sae(folder)
    fresh = torch.optim.Adam(loaded.parameters(), lr=1e-2)
    load_optimizer_state(folder, loaded, fresh)
    x = torch.randn(4, D, generator=torch.Generator().manual_seed(5))
    for model, optim in ((sae, opt), (loaded, fresh)):
        model.training_loss(x)["loss"].sum().backward()
        optim.step()
    for name, p in sae.named_parameters():
        assert torch.equal(p, dict(loaded.named_parameters())[name]), name


def test_no_leftover_temporary_files(tmp_path):
    """Only the three checkpoint files remain; no dot-files from the temp-file-and-rename dance."""
    folder, sae, opt = _save(tmp_path)
    save_checkpoint(folder, sae, samples=200, optimizer=opt)  # overwrite once more
    names = sorted(p.name for p in folder.iterdir())
    assert not [n for n in names if n.startswith(".")]
    assert names == ["cfg.json", "optimizer.safetensors", "sae.safetensors"]


def test_flipped_byte_fails_checksum(tmp_path):
    """One altered byte in the weights file is caught."""
    folder, _, _ = _save(tmp_path)
    path = folder / "sae.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(InputError) as err:
        load_sae(folder)
    assert "checksum" in _one_line(err)


def test_truncated_file_refused(tmp_path):
    """A truncated weights file is refused."""
    folder, _, _ = _save(tmp_path)
    path = folder / "sae.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(InputError) as err:
        load_sae(folder)
    _one_line(err)


def test_truncated_file_with_matching_checksum_is_unreadable(tmp_path):
    """Even if cfg.json's checksum is patched to match, a truncated safetensors file is InputError, not a crash."""
    folder, _, _ = _save(tmp_path)
    path = folder / "sae.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    _patch_cfg(folder, lambda cfg: cfg["sha256"].__setitem__("sae.safetensors", hashlib.sha256(path.read_bytes()).hexdigest()))
    with pytest.raises(InputError) as err:
        load_sae(folder)
    assert "unreadable" in _one_line(err)


def test_deleted_weights_missing(tmp_path):
    """A missing weights file is reported as missing."""
    folder, _, _ = _save(tmp_path)
    (folder / "sae.safetensors").unlink()
    with pytest.raises(InputError) as err:
        load_sae(folder)
    assert "missing" in _one_line(err)


def test_deleted_cfg_missing(tmp_path):
    """A folder without cfg.json is not a checkpoint."""
    folder, _, _ = _save(tmp_path)
    (folder / "cfg.json").unlink()
    with pytest.raises(InputError) as err:
        load_sae(folder)
    assert "missing" in _one_line(err)


def test_corrupt_optimizer_state_refused(tmp_path):
    """The optimizer file is checksummed too."""
    folder, sae, _ = _save(tmp_path)
    path = folder / "optimizer.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(InputError) as err:
        load_optimizer_state(folder, sae, torch.optim.Adam(sae.parameters()))
    assert "checksum" in _one_line(err)


def _patch_cfg(folder: Path, change) -> None:
    path = folder / "cfg.json"
    cfg = json.loads(path.read_text())
    change(cfg)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "text",
    [
        "this is not json",
        "[1, 2, 3]",
        '"a string"',
    ],
)
def test_malformed_cfg_json_text(tmp_path, text):
    """cfg.json that is not JSON, or not a JSON object."""
    folder, _, _ = _save(tmp_path)
    (folder / "cfg.json").write_text(text)
    with pytest.raises(InputError) as err:
        load_sae(folder)
    _one_line(err)


def test_cfg_json_not_utf8(tmp_path):
    """Binary garbage in cfg.json."""
    folder, _, _ = _save(tmp_path)
    (folder / "cfg.json").write_bytes(b"\xff\xfe\x80\x81")
    with pytest.raises(InputError):
        load_sae(folder)


@pytest.mark.parametrize("key", ["arch", "d", "dict_size", "seeds", "l1", "sha256"])
def test_cfg_json_missing_key(tmp_path, key):
    """Each required key of cfg.json is checked."""
    folder, _, _ = _save(tmp_path)
    _patch_cfg(folder, lambda cfg: cfg.pop(key))
    with pytest.raises(InputError) as err:
        load_sae(folder)
    assert key in _one_line(err)


def test_cfg_json_unknown_arch(tmp_path):
    """An architecture saekit does not know."""
    folder, _, _ = _save(tmp_path)
    _patch_cfg(folder, lambda cfg: cfg.__setitem__("arch", "nope"))
    with pytest.raises(InputError) as err:
        load_sae(folder)
    assert "nope" in _one_line(err)


@pytest.mark.parametrize(
    "key,value",
    [
        ("d", "eight"),  # int("eight") -> ValueError
        ("l1", [0.1, 0.2]),  # two coefficients for one seed -> ValueError in ReluSAE
        ("seeds", 3),  # not a list -> TypeError
    ],
)
def test_cfg_json_bad_values(tmp_path, key, value):
    """Values of the wrong type or count."""
    folder, _, _ = _save(tmp_path)
    _patch_cfg(folder, lambda cfg: cfg.__setitem__(key, value))
    with pytest.raises(InputError) as err:
        load_sae(folder)
    _one_line(err)


def test_shapes_not_matching_cfg(tmp_path):
    """A weights file of another dict_size, with its checksum patched into cfg.json, is refused."""
    folder, _, _ = _save(tmp_path)
    other = ReluSAE(d=D, dict_size=M * 2, seeds=[3], l1=[0.1])
    path = folder / "sae.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    _patch_cfg(folder, lambda cfg: cfg["sha256"].__setitem__("sae.safetensors", digest))
    with pytest.raises(InputError) as err:
        load_sae(folder)
    assert "do not match" in _one_line(err)


def test_atomic_write_bytes_writes(tmp_path):
    """The happy path writes the bytes (creating parents) and leaves no temp file."""
    path = tmp_path / "sub" / "f.bin"
    atomic_write_bytes(path, b"hello")
    assert path.read_bytes() == b"hello"
    atomic_write_bytes(path, b"world")
    assert path.read_bytes() == b"world"
    assert [p.name for p in path.parent.iterdir()] == ["f.bin"]


def test_atomic_write_bytes_keeps_old_file_on_failure(tmp_path, monkeypatch):
    """If the final rename fails, the old content survives and the temporary file is removed."""
    path = tmp_path / "f.bin"
    path.write_bytes(b"old content")

    def failing_replace(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk on fire"):
        atomic_write_bytes(path, b"new content")
    monkeypatch.undo()
    assert path.read_bytes() == b"old content"
    assert sorted(os.listdir(tmp_path)) == ["f.bin"]


def test_save_checkpoint_failure_keeps_previous_checkpoint(tmp_path, monkeypatch):
    """A failed re-save leaves the previous checkpoint loadable and no temp files."""
    folder, sae, opt = _save(tmp_path)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with torch.no_grad():
        sae.W_enc.add_(1.0)

    def failing_replace(src, dst):
        raise OSError("no")

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    with pytest.raises(OSError):
        save_checkpoint(folder, sae, samples=200, optimizer=opt)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert read_cfg(folder)["samples"] == 100
    load_sae(folder)


@pytest.mark.parametrize(
    "key,value",
    [
        ("dict_size", -1),  # torch.randn(-1, d) -> RuntimeError
        ("d", -2),  # torch.randn(m, -2) -> RuntimeError
        ("sha256", []),  # [].get(...) -> AttributeError
        ("arch", ["relu"]),  # ["relu"] in dict -> TypeError: unhashable
    ],
)
def test_cfg_json_impossible_values(tmp_path, key, value):
    """Bad values in a valid-JSON cfg.json should be InputError, like the cases above."""
    folder, _, _ = _save(tmp_path)
    _patch_cfg(folder, lambda cfg: cfg.__setitem__(key, value))
    with pytest.raises(InputError):
        load_sae(folder)


def test_written_files_are_readable_by_others(tmp_path):
    """mkstemp creates 0600 files; a checkpoint's cfg.json and safetensors are meant to be shared (0644, umask 022)."""
    old = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "ck", ReluSAE(d=4, dict_size=6, seeds=[0], l1=[0.1]), samples=1)
    finally:
        os.umask(old)
    for name in ("cfg.json", "sae.safetensors"):
        assert (tmp_path / "ck" / name).stat().st_mode & 0o777 == 0o644, name
