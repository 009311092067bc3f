"""`saekit compare`: the knob grids, the matched-L0 choice, and a small end-to-end run."""

import json
import math

import pytest

from saekit.compare import PENALTY_FACTORS, knob_grid, markdown_table, nearest_l0, run_compare
from saekit.config import DEFAULT_L1
from saekit.errors import InputError

SMALL = [
    "source.d=32",
    "source.n_features=48",
    "source.mean_active=3",
    "sae.dict_size=96",
    "train.samples=200000",
    "train.lr=3e-3",
    "train.eval_samples=20000",
    "train.log_every=20",
]


def test_knob_grid():
    assert knob_grid("topk", 8, 1024) == [8]
    assert knob_grid("matryoshka", 5, 1024) == [5]  # k like topk and batchtopk
    assert knob_grid("relu", 8, 1024) == pytest.approx([DEFAULT_L1 * f for f in PENALTY_FACTORS])
    with pytest.raises(InputError, match="larger than dict_size"):
        knob_grid("batchtopk", 2000, 1024)


def test_nearest_l0_is_nearest_in_log_ratio():
    """Target 8: L0 4 is log-ratio 0.69 away, 15 is 0.63 away, so 15 wins; failed and silent rows are skipped."""
    rows = [
        {"status": "done", "l0": 4.0, "run_id": "a"},
        {"status": "done", "l0": 15.0, "run_id": "b"},
        {"status": "failed", "l0": 8.0, "run_id": "c"},
        {"status": "done", "l0": 0.0, "run_id": "d"},
    ]
    assert nearest_l0(rows, 8)["run_id"] == "b"
    with pytest.raises(InputError):
        nearest_l0(rows[2:], 8)


def test_markdown_table_row():
    row = {"arch": "topk", "knob": "k", "value": 8, "mmcs": 0.99123, "recovered_0_9": 1.0, "fvu": 0.0123, "l0": 8.0}
    row |= {"dead_fraction": 0.05, "samples_to_mmcs_0_95": 1_250_000}
    lines = markdown_table([row, {**row, "samples_to_mmcs_0_95": None}]).splitlines()
    # SynthSAEBench's columns show a dash where a run has no value (a source without true codes, an older run)
    assert lines[2] == "| topk | k = 8 | 0.991 | 1.000 | 0.012 | 8.0 | 5.0% | 1.25M | — | — | — | — |"
    assert lines[3].endswith("| not reached | — | — | — | — |")
    assert lines[0].count(" |") == len(lines[1].split("|")) - 2 == 12  # the separator has one cell per column


def test_markdown_table_truth_columns_and_absorption_only_when_present():
    row = {"arch": "relu", "knob": "l1", "value": 0.3, "mmcs": 0.9, "recovered_0_9": 0.5, "fvu": 0.1, "l0": 5.0}
    row |= {"dead_fraction": 0.0, "samples_to_mmcs_0_95": None, "mcc": 0.8766, "f1": 0.5, "split": 3, "shrinkage": 0.91}
    head, _, line = markdown_table([row]).splitlines()
    assert head.endswith("| MCC | F1 | split | shrinkage |") and line.endswith("| 0.877 | 0.500 | 3 | 0.910 |")
    head, _, line, other = markdown_table([{**row, "absorption": 0.125}, row]).splitlines()
    assert head.endswith("| MCC | F1 | absorption | split | shrinkage |")
    assert line.endswith("| 0.877 | 0.500 | 12.5% | 3 | 0.910 |") and other.endswith("| 0.877 | 0.500 | — | 3 | 0.910 |")


def test_compare_refuses_sae_keys_and_unknown_archs(tmp_path):
    with pytest.raises(InputError, match="only sae.dict_size"):
        run_compare(["sae.l1=0.5"], tmp_path, progress=False)
    with pytest.raises(InputError, match="unknown architecture 'nope'"):
        run_compare([], tmp_path, archs=["nope"], progress=False)
    assert not any(tmp_path.iterdir())


def test_compare_end_to_end_small(tmp_path):
    doc = run_compare(SMALL, tmp_path, archs=["relu"], target_l0=3, progress=False)
    assert len(doc["candidates"]) == len(PENALTY_FACTORS)
    (row,) = doc["rows"]
    l0s = [c["l0"] for c in doc["candidates"]]
    # the chosen coefficient is the one whose L0 is nearest 3 among the five trained
    assert row["l0"] == min(l0s, key=lambda v: abs(math.log(v / 3)))
    assert row["value"] in [c["l1"] for c in doc["candidates"]]
    assert 0 < row["mmcs"] <= 1 and row["knob"] == "l1"
    chosen = next(c for c in doc["candidates"] if c["run_id"] == row["run_id"])
    assert [row[c] for c in ("mcc", "f1", "split", "shrinkage")] == [chosen[c] for c in ("mcc", "f1", "split", "shrinkage")]
    assert "absorption" not in row  # the toy source has no parent features
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert saved["rows"] == doc["rows"]
    assert (tmp_path / "compare.md").read_text().startswith("| arch | knob | MMCS")
    # every candidate's MMCS was tracked during training, so the samples-to-0.95 column is filled where reached
    assert all("samples_to_mmcs_0_95" in c for c in doc["candidates"])


def test_default_target_l0_is_the_datas_mean_active_features():
    """toy: mean_active rounded (5 by default); tms: 80 features x (1 - 0.97) = 2.4 -> 2; a file source does not say -> 8."""
    from saekit.compare import default_target_l0
    from saekit.config import load_config

    assert default_target_l0(load_config(None)) == 5
    assert default_target_l0(load_config(None, ["source.mean_active=2.6"])) == 3
    assert default_target_l0(load_config(None, ["source.kind=tms"])) == 2
    assert default_target_l0(load_config(None, ["source.kind=file", "source.path=x.npy"])) == 8


def test_default_target_l0_of_synth_data_is_its_summed_firing_probability():
    """synth with constant firing: every one of 64 independent features fires with probability 0.1, so the mean
    number active is 64 x 0.1 = 6.4 -> 6; linear firing from 0.3 down to 0.1 over 40 features: mean 0.2 x 40 = 8."""
    from saekit.compare import default_target_l0
    from saekit.config import load_config

    flat = ["source.kind=synth", "source.d=16", "source.hierarchy_roots=0", "source.correlation_rank=0"]
    constant = [*flat, "source.n_features=64", "source.firing=constant", "source.firing_max=0.1"]
    assert default_target_l0(load_config(None, constant)) == 6
    linear = [*flat, "source.n_features=40", "source.firing=linear", "source.firing_max=0.3", "source.firing_min=0.1"]
    assert default_target_l0(load_config(None, linear)) == 8


def test_synth_preset_sizes_the_dictionary_as_synthsaebench_does_and_refuses_other_data(tmp_path):
    """--preset synth: source.kind synth, G/4 latents (SynthSAEBench: 4096 for 16,384 features), so 1024 at the
    source's defaults (4096 features in 256 dimensions) and 24 for 96 features; another source kind is refused."""
    from saekit.compare import compare_base

    base, why = compare_base([], "synth")
    assert base.source.kind == "synth" and (base.source.n_features, base.source.d) == (4096, 256)
    assert base.sae.dict_size == 1024 and "0.25·G" in why
    small, _ = compare_base(["source.n_features=96", "source.d=48"], "synth")
    assert small.sae.dict_size == 24
    with pytest.raises(InputError, match="synth preset"):
        compare_base(["source.kind=toy"], "synth")
    with pytest.raises(InputError, match="unknown compare preset 'big'"):
        run_compare([], tmp_path, preset="big", progress=False)
    assert not any(tmp_path.iterdir())


def test_compare_synth_preset_end_to_end_has_absorption_for_hierarchical_data(tmp_path):
    """A small synth compare with a hierarchy (4 trees of 1 + 3 features): every row has an absorption value in
    [0, 1], the target L0 is the data's summed firing probability, and the table has the absorption column."""
    from saekit.compare import default_target_l0
    from saekit.config import load_config

    sets = [
        "source.n_features=32",
        "source.d=16",
        "source.hierarchy_roots=4",
        "source.hierarchy_depth=1",
        "source.hierarchy_branching=3",
        "source.firing_max=0.3",
        "source.firing_min=0.02",
        "sae.dict_size=48",
        "train.samples=60000",
        "train.eval_samples=8000",
        "train.log_every=20",
    ]
    doc = run_compare(sets, tmp_path, archs=["batchtopk", "matryoshka"], preset="synth", progress=False)
    assert doc["target_l0"] == default_target_l0(load_config(None, ["source.kind=synth", *sets]))
    assert [r["arch"] for r in doc["rows"]] == ["batchtopk", "matryoshka"]
    assert all(0.0 <= r["absorption"] <= 1.0 and 0.0 <= r["mcc"] <= 1.0 for r in doc["rows"])
    assert "| absorption |" in doc["table"].splitlines()[0]


def test_penalties_and_thresholds_follow_the_datas_scale():
    """Data 10 times the toy data's scale: an L1 coefficient x 10 (it weighs activations, ∝ s, against a squared
    error, ∝ s²), JumpReLU's L0 coefficient x 100 (a count against the squared error), its bandwidth and initial
    threshold x 10 (activations); k is a count and stays. At scale 1 (the toy data) nothing changes."""
    from saekit.archspec import ARCH_SPECS
    from saekit.compare import compare_config
    from saekit.config import load_config

    assert knob_grid("relu", 8, 1024, 10.0) == pytest.approx([3.0 * f for f in PENALTY_FACTORS])
    assert knob_grid("jumprelu", 8, 1024, 10.0) == pytest.approx([3e-3 * f for f in PENALTY_FACTORS])
    assert knob_grid("gated", 8, 1024, 10.0) == pytest.approx([5e-3 * f for f in PENALTY_FACTORS])
    assert knob_grid("topk", 8, 1024, 10.0) == [8]
    assert ARCH_SPECS["jumprelu"].scaled_defaults(10.0) == {"l0_coef": 3e-3, "jump_bandwidth": 0.3, "jump_init_threshold": 0.5}
    toy = load_config(None, ["sae.dict_size=64"])
    jump = compare_config("jumprelu", toy, 5)
    assert (jump.sae.jump_bandwidth, jump.sae.jump_init_threshold) == (0.03, 0.05) and jump.sae.l0_coef == knob_grid("jumprelu", 5, 64)
    assert compare_config("relu", toy, 5).sae.decoder_bias is False  # the report's SAE on the report's offset-free data
    synth = load_config(None, ["source.kind=synth", "source.d=16", "source.n_features=32", "sae.dict_size=64"])
    scaled = compare_config("jumprelu", synth, 5, 10.0)
    assert (scaled.sae.jump_bandwidth, scaled.sae.jump_init_threshold) == (0.3, 0.5)
    relu = compare_config("relu", synth, 5, 10.0)  # data that may carry an offset: a decoder bias, as the presets give
    assert relu.sae.decoder_bias is True and relu.sae.decoder_bias_init == "geometric_median"
