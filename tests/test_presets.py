"""Presets and `saekit compare` size their grids from the data actually given (saekit.sources.data_shape)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from saekit.compare import compare_base
from saekit.config import SourceConfig, load_config
from saekit.errors import InputError
from saekit.presets import describe, geometric_sizes, preset_config
from saekit.sources import data_shape, make_source
from saekit.sources import shape as shape_module
from saekit.sources.tensor_file import load_tensor_file, tensor_file_shape
from test_activations_source import write_activations
from test_cli import saekit, with_sets

# quick on width 160: sizes d/2 .. 8 d by factors of 2 = 80, 160, 320, 640, 1280 (presets.QUICK_MAX_SIZE_PER_D = 8)
QUICK_160 = [80, 160, 320, 640, 1280]
# paper on width 160 without ground truth: G assumed 2 d = 320 (the toy data's 512 / 256); sizes G/4 .. 32 G
PAPER_160 = [80, 160, 320, 640, 1280, 2560, 5120, 10240]


def _safetensors(path: Path, n: int = 64, d: int = 160, truth: int | None = None) -> Path:
    tensors = {"activations": torch.randn(n, d, generator=torch.Generator().manual_seed(0))}
    if truth is not None:
        tensors["ground_truth"] = torch.randn(truth, d, generator=torch.Generator().manual_seed(1))
    save_file(tensors, str(path))
    return path


def _npy(path: Path, n: int = 64, d: int = 160) -> Path:
    np.save(path, np.random.default_rng(0).standard_normal((n, d)).astype(np.float32))
    return path


def _file_sets(path: Path) -> list[str]:
    return ["source.kind=file", f"source.path={path}"]


@pytest.mark.parametrize(
    "sets, d",
    [
        ([], 256),  # the toy defaults
        (["source.d=40", "source.n_features=90"], 40),
        (["source.kind=tms"], 20),  # config.KIND_DEFAULTS
        (["source.kind=tms", "source.d=12"], 12),
        (["source.kind=compute"], 48),
        (["source.kind=compute", "source.d=24"], 24),
    ],
)
def test_quick_follows_the_width_of_generated_data(sets: list[str], d: int) -> None:
    cfg = preset_config("grid", sets)
    assert cfg.sae.dict_size == geometric_sizes(d / 2, 8 * d)
    assert cfg.train.seeds_min_size == 4 * d  # two seeds at the two largest sizes
    assert f"width d = {d} (from the config)" in describe("grid", cfg)


@pytest.mark.parametrize("sets, g", [([], 512), (["source.kind=tms"], 80), (["source.kind=compute", "source.n_features=40"], 40)])
def test_paper_follows_the_true_feature_count_of_generated_data(sets: list[str], g: int) -> None:
    cfg = preset_config("paper", sets)
    assert cfg.sae.dict_size == geometric_sizes(g / 4, 32 * g)  # the report's sizes G/4 .. 32 G
    assert cfg.train.seeds_min_size == 8 * g
    assert f"its {g} true features" in describe("paper", cfg)


@pytest.mark.parametrize("kind", ["toy", "tms", "compute"])
def test_the_config_width_of_generated_kinds_is_the_built_sources_width(kind: str) -> None:
    # what data_shape reads from the config without building must be what the source has once built
    sets = {"toy": ["source.d=24", "source.n_features=40"], "tms": ["source.d=6"], "compute": ["source.d=10"]}[kind]
    steps = [] if kind == "toy" else [f"source.kind={kind}", "source.model_steps=20"]
    cfg = load_config(None, sets + steps).source
    assert data_shape(cfg).d == make_source(cfg).d == cfg.d


@pytest.mark.parametrize("writer", [_safetensors, _npy])
def test_a_width_160_file_gives_grids_scaled_from_160_not_256(tmp_path: Path, writer) -> None:
    path = writer(tmp_path / ("acts.safetensors" if writer is _safetensors else "acts.npy"))
    quick = preset_config("grid", _file_sets(path))
    assert quick.sae.dict_size == QUICK_160 and quick.train.seeds_min_size == 640
    paper = preset_config("paper", _file_sets(path))
    assert paper.sae.dict_size == PAPER_160 and paper.train.seeds_min_size == 8 * 320
    text = describe("paper", paper)
    assert "width d = 160 (from the file header)" in text and "assumes G = 2·d = 320" in text


def test_a_file_with_ground_truth_sizes_paper_from_its_feature_count(tmp_path: Path) -> None:
    path = _safetensors(tmp_path / "t.safetensors", truth=300)
    cfg = preset_config("paper", _file_sets(path))
    assert cfg.sae.dict_size == geometric_sizes(300 / 4, 32 * 300)  # 75, 150, ..., 9600
    assert "its 300 true features" in describe("paper", cfg)


def test_an_activations_folder_gives_grids_scaled_from_its_manifests_width(tmp_path: Path) -> None:
    folder = write_activations(tmp_path / "acts", n_windows=4, d=12)
    sets = ["source.kind=activations", f"source.path={folder}"]
    quick = preset_config("grid", sets)
    assert quick.sae.dict_size == [6, 12, 24, 48, 96]  # d/2 .. 8 d with d = 12
    paper = preset_config("paper", sets)
    assert paper.sae.dict_size == geometric_sizes(24 / 4, 32 * 24)  # G assumed 2 d = 24
    assert "width d = 12 (from the manifest)" in describe("paper", paper) and "G = 2·d = 24" in describe("paper", paper)


def test_an_explicit_width_that_disagrees_with_the_data_is_refused(tmp_path: Path) -> None:
    path = _npy(tmp_path / "acts.npy")
    with pytest.raises(InputError, match="source.d is 256 but .*acts.npy has width 160"):
        preset_config("grid", [*_file_sets(path), "source.d=256"])
    assert preset_config("grid", [*_file_sets(path), "source.d=160"]).sae.dict_size == QUICK_160
    folder = write_activations(tmp_path / "acts", n_windows=4, d=12)
    with pytest.raises(InputError, match="source.d is 8 but .* has width 12"):
        preset_config("paper", ["source.kind=activations", f"source.path={folder}", "source.d=8"])


def test_the_cli_refuses_a_width_mismatch_in_one_line(tmp_path: Path) -> None:
    path = _safetensors(tmp_path / "acts.safetensors")
    r = saekit("reproduce", "--preset", "grid", *with_sets(*_file_sets(path), "source.d=256"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"saekit: error: source.d is 256 but {path} has width 160"]


def test_a_kind_without_a_cheaper_reader_is_built_and_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a kind data_shape has no reader for (as a newly added kind would be) falls back to building the source
    path = _safetensors(tmp_path / "t.safetensors", d=20, truth=7)
    monkeypatch.setattr(shape_module, "_READERS", {})
    shape = data_shape(load_config(None, _file_sets(path)).source)
    assert (shape.d, shape.n_features, shape.origin) == (20, 7, "source")
    assert preset_config("grid", _file_sets(path)).sae.dict_size == [10, 20, 40, 80, 160]


def test_the_lm_preset_is_not_built_here() -> None:
    with pytest.raises(InputError, match="lm preset"):
        preset_config("lm")


# -- the file header ---------------------------------------------------------------------------------------------


def test_the_header_shape_is_the_loaded_shape_without_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    st = _safetensors(tmp_path / "t.safetensors", n=30, d=9, truth=5)
    npy = _npy(tmp_path / "a.npy", n=30, d=9)
    loaded = load_tensor_file(st)
    assert (loaded[0].shape, loaded[1].shape) == ((30, 9), (5, 9))
    import safetensors.torch

    def no_loading(*args, **kwargs):
        raise AssertionError("data loaded")

    monkeypatch.setattr(safetensors.torch, "load_file", no_loading)
    monkeypatch.setattr(np, "load", no_loading)
    assert tensor_file_shape(st) == ((30, 9), 5)
    assert tensor_file_shape(npy) == ((30, 9), None)


def test_bad_headers_are_refused_in_one_line(tmp_path: Path) -> None:
    np.save(tmp_path / "ints.npy", np.zeros((4, 3), dtype=np.int64))
    np.save(tmp_path / "flat.npy", np.zeros(5, dtype=np.float32))
    _npy(tmp_path / "short.npy", n=10, d=4)
    (tmp_path / "short.npy").write_bytes((tmp_path / "short.npy").read_bytes()[:-8])  # 2 of 40 floats cut off
    save_file({"a": torch.zeros(3, 2), "b": torch.zeros(3, 2)}, str(tmp_path / "two.safetensors"))
    save_file({"activations": torch.zeros(3, 2), "ground_truth": torch.zeros(4, 5)}, str(tmp_path / "truth.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 40)
    cases = {
        "ints.npy": "expected floating-point data, got int64",
        "flat.npy": "expected a 2-D tensor",
        "short.npy": "truncated data file",
        "two.safetensors": "expected a tensor named 'activations'",
        "truth.safetensors": "ground_truth has width 5, activations 2",
        "junk.safetensors": "cannot read data file",
        "missing.npy": "data file not found",
    }
    for name, message in cases.items():
        with pytest.raises(InputError, match=message) as err:
            tensor_file_shape(tmp_path / name)
        assert "\n" not in str(err.value)


# -- saekit compare ------------------------------------------------------------------------------------------------


def test_compare_sizes_its_dictionary_from_the_data(tmp_path: Path) -> None:
    # SIZE_PER_FEATURE = 2 latents per true feature: the report's data 2 x 512 = 1024, unchanged
    assert compare_base([])[0].sae.dict_size == 1024
    assert compare_base(["source.kind=tms"])[0].sae.dict_size == 160  # 2 x 80
    base, basis = compare_base(_file_sets(_npy(tmp_path / "acts.npy")))
    assert base.sae.dict_size == 640 and "d = 160" in basis  # 2 x G, G assumed 2 x 160
    assert compare_base(_file_sets(_safetensors(tmp_path / "t.safetensors", truth=100)))[0].sae.dict_size == 200
    assert compare_base(["sae.dict_size=96", *_file_sets(tmp_path / "acts.npy")])[0].sae.dict_size == 96
    with pytest.raises(InputError, match="has width 160"):
        compare_base([*_file_sets(tmp_path / "acts.npy"), "source.d=32"])


@pytest.mark.slow
def test_reproduce_quick_on_a_file_trains_the_sizes_of_its_width(tmp_path: Path) -> None:
    path = _npy(tmp_path / "acts.npy", n=512, d=12)
    sets = with_sets(*_file_sets(path), "sae.l1=[0.6]", "train.samples=1024", "train.eval_samples=512", "train.batch_size=128")
    r = saekit("reproduce", "--preset", "grid", *sets, "--out", str(tmp_path / "o"), "--json", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "width d = 12 (from the file header)" in r.stderr
    runs = json.loads(r.stdout)["runs"]
    assert sorted({row["dict_size"] for row in runs}) == [6, 12, 24, 48, 96]  # d/2 .. 8 d with d = 12
    assert SourceConfig.model_fields["d"].default == 256  # the default the sizes must not come from


def test_sweep_presets_give_data_that_may_have_an_offset_a_decoder_bias(tmp_path: Path) -> None:
    # The in-house generators build data without an offset: the report's SAE (no decoder bias) stays. Files and
    # other data may be centred, biased or neither, so the SAEs get a decoder bias from the data's geometric median.
    for preset in ("grid", "paper"):
        assert preset_config(preset).sae.decoder_bias is False
        assert preset_config(preset, ["source.kind=tms"]).sae.decoder_bias is False
    path = tmp_path / "a.npy"
    np.save(path, np.random.default_rng(0).normal(size=(50, 12)).astype(np.float32) + 3.0)
    cfg = preset_config("grid", ["source.kind=file", f"source.path={path}"])
    assert cfg.sae.decoder_bias is True and cfg.sae.decoder_bias_init == "geometric_median"
    assert "decoder bias" in describe("grid", cfg)
    # An explicit choice wins.
    assert preset_config("grid", ["source.kind=file", f"source.path={path}", "sae.decoder_bias=false"]).sae.decoder_bias is False


def test_the_quick_l1_values_follow_the_datas_scale(tmp_path: Path) -> None:
    # The L1 term grows with the data's scale and the MSE with its square: the same data times 10 needs L1 values
    # 10 times larger. A file of the report's toy data has about the toy data's scale (factor near 1).
    toy = make_source(SourceConfig(d=12, n_features=24)).batch(4096, 0)
    for factor in (1.0, 10.0):
        path = tmp_path / f"x{factor:g}.npy"
        np.save(path, (toy * factor).numpy())
        cfg = preset_config("grid", ["source.kind=file", f"source.path={path}"])
        ratios = [a / b for a, b in zip(cfg.sae.l1, preset_config("grid").sae.l1)]
        assert all(r == pytest.approx(ratios[0], rel=1e-2) for r in ratios)  # values rounded to 3 significant figures
        assert ratios[0] == pytest.approx(factor, rel=0.15)
        assert "L1 values follow it" in describe("grid", cfg)
    # Given L1 values are kept as given.
    assert preset_config("grid", ["source.kind=file", f"source.path={path}", "sae.l1=[0.5]"]).sae.l1 == [0.5]


def test_the_synth_preset_is_quick_on_synthsaebench_shaped_data() -> None:
    # --preset synth: source.kind synth with its defaults (4096 features in 256 dimensions), quick's sizes for that
    # width (128 .. 2048), a decoder bias (the data has one) and quick's L1 values times the data's measured scale.
    cfg = preset_config("synth")
    assert cfg.source.kind == "synth" and (cfg.source.n_features, cfg.source.d) == (4096, 256)
    assert cfg.sae.dict_size == geometric_sizes(128, 2048) and cfg.train.seeds_min_size == 1024
    assert cfg.sae.decoder_bias is True and cfg.sae.decoder_bias_init == "geometric_median"
    quick = preset_config("grid").sae.l1
    ratios = [a / b for a, b in zip(cfg.sae.l1, quick)]
    assert all(r == pytest.approx(ratios[0], rel=1e-2) for r in ratios) and ratios[0] > 3  # synth data is far larger than toy data
    text = describe("synth", cfg)
    assert text.startswith("saekit reproduce --preset synth: 28 SAEs") and "L1 values follow it" in text
    # Source keys change the synth data; the width sets the sizes.
    small = preset_config("synth", ["source.d=48", "source.n_features=192"])
    assert small.sae.dict_size == [24, 48, 96, 192, 384] and small.source.n_features == 192
    with pytest.raises(InputError, match="synth preset"):
        preset_config("synth", ["source.kind=file", "source.path=x.npy"])


def test_the_quick_preset_is_the_search_with_its_recipe_and_the_data_of_the_overrides(tmp_path: Path) -> None:
    from saekit.count import COUNT_TRAIN
    from saekit.presets import search_config

    cfg = search_config(["source.d=32", "source.n_features=64"])
    assert (cfg.source.kind, cfg.source.d, cfg.source.n_features, cfg.sae.decoder_bias) == ("toy", 32, 64, False)
    assert (cfg.train.lr, cfg.train.samples) == (COUNT_TRAIN["lr"], COUNT_TRAIN["samples"])
    path = tmp_path / "a.npy"
    np.save(path, np.random.default_rng(0).normal(size=(50, 12)).astype(np.float32) + 3.0)
    assert search_config(["source.kind=file", f"source.path={path}"]).sae.decoder_bias is True  # data that may have an offset
    with pytest.raises(InputError, match="adaptive search"):
        preset_config("quick")
