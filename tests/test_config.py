"""Config defaults, validation messages, YAML loading, --set overrides and grid expansion."""

from __future__ import annotations

import itertools

import pytest

from saekit import config as config_module
from saekit.config import Config, RunSpec, expand_grid, load_config, parse_config
from saekit.errors import InputError
from saekit.sae import ARCHITECTURES


def _error(fn, *args, **kwargs) -> str:
    """Call fn, expect InputError, check its message is one line, and return it."""
    with pytest.raises(InputError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert msg.strip(), "empty message"
    return msg


# -- defaults -------------------------------------------------------------------------------


def test_defaults():
    """The defaults documented for the report's toy data."""
    cfg = Config()
    # values from the Field defaults in saekit/config.py (the report's setup)
    assert cfg.source.kind == "toy"
    assert cfg.source.d == 256
    assert cfg.source.n_features == 512
    assert cfg.source.prob_decay == 0.99
    assert cfg.source.mean_active == 5
    assert cfg.sae.arch == "relu"
    assert cfg.sae.l1_reduction == "mean"
    assert cfg.sae.decoder_bias is False
    assert cfg.train.lr == 1e-3


def test_empty_dict_and_no_path_give_defaults():
    """parse_config({}) and load_config(None) equal Config()."""
    assert parse_config({}) == Config()
    assert load_config(None) == Config()


def test_known_archs_match_registry():
    """config.KNOWN_ARCHS (kept torch-free) lists exactly the registered architectures."""
    assert sorted(config_module.KNOWN_ARCHS) == sorted(ARCHITECTURES)
    for name, arch in ARCHITECTURES.items():  # each constructor takes its knob as a per-member list
        assert arch.member_keys == ("seeds", config_module.SPARSITY_KNOBS[name])
    assert len(set(config_module.KNOWN_ARCHS)) == len(config_module.KNOWN_ARCHS)


# -- validation errors ----------------------------------------------------------------------


def test_unknown_top_level_key():
    """An unknown section is named in the message."""
    msg = _error(parse_config, {"bogus": 1})
    assert "unknown config key" in msg
    assert "bogus" in msg


def test_unknown_key_in_section():
    """An unknown key inside a section is named with its path."""
    msg = _error(parse_config, {"sae": {"foo": 1}})
    assert "unknown config key" in msg
    assert "sae.foo" in msg


@pytest.mark.parametrize("value", [0, -5, [64, 0], [64, -5]])
def test_dict_size_must_be_positive(value):
    """dict_size <= 0, alone or inside a grid list, is refused naming sae.dict_size."""
    msg = _error(parse_config, {"sae": {"dict_size": value}})
    assert "sae.dict_size" in msg


def test_dict_size_empty_list():
    """An empty grid axis is refused."""
    assert "sae.dict_size" in _error(parse_config, {"sae": {"dict_size": []}})


def test_n_features_zero():
    """n_features must be > 0."""
    assert "source.n_features" in _error(parse_config, {"source": {"n_features": 0}})


def test_mean_active_larger_than_n_features():
    """mean_active > n_features is impossible for the toy source."""
    msg = _error(parse_config, {"source": {"n_features": 4, "mean_active": 5}})
    assert "mean_active" in msg and "n_features" in msg


def test_mean_active_equal_to_n_features_is_allowed():
    """The boundary mean_active == n_features is fine (only larger is refused)."""
    cfg = parse_config({"source": {"n_features": 4, "mean_active": 4}})
    assert cfg.source.mean_active == 4


def test_unknown_arch():
    """An architecture not in KNOWN_ARCHS is refused naming sae.arch."""
    msg = _error(parse_config, {"sae": {"arch": "nope"}})
    assert "sae.arch" in msg and "nope" in msg


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 0.0, -1e-3])
def test_bad_lr(value):
    """lr must be a finite number > 0."""
    assert "train.lr" in _error(parse_config, {"train": {"lr": value}})


@pytest.mark.parametrize("raw", ["nan", ".nan", ".inf", "inf"])
def test_bad_lr_via_override(raw):
    """NaN / inf given as `--set` strings are refused too."""
    assert "train.lr" in _error(load_config, None, [f"train.lr={raw}"])


@pytest.mark.parametrize("value", [-0.1, [0.1, -0.1], float("nan"), [0.1, float("inf")]])
def test_bad_l1(value):
    """l1 must be finite and >= 0, alone or in a list."""
    assert "sae.l1" in _error(parse_config, {"sae": {"l1": value}})


def test_l1_empty_list():
    """An empty l1 grid axis is refused."""
    assert "sae.l1" in _error(parse_config, {"sae": {"l1": []}})


def test_l1_zero_is_allowed():
    """l1 = 0 (no sparsity penalty) is valid: the bound is >= 0."""
    assert parse_config({"sae": {"l1": 0.0}}).sae.l1 == 0.0


def test_several_errors_stay_on_one_line():
    """Several bad keys at once are all named on a single line."""
    msg = _error(parse_config, {"sae": {"dict_size": 0, "foo": 1}, "train": {"lr": -1}})
    assert "sae.dict_size" in msg and "sae.foo" in msg and "train.lr" in msg


# -- load_config ----------------------------------------------------------------------------


def test_load_missing_file(tmp_path):
    """A path that does not exist."""
    assert "not found" in _error(load_config, tmp_path / "nope.yaml")


@pytest.mark.parametrize("text", ["a: [1, 2", "{{{", "sae:\n  dict_size: [1,\n  l1: }"])
def test_load_not_yaml(tmp_path, text):
    """Text that does not parse as YAML."""
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    assert "YAML" in _error(load_config, p)


def test_load_binary_file(tmp_path):
    """A file that is not even UTF-8."""
    p = tmp_path / "bad.yaml"
    p.write_bytes(b"\xff\xfe\x00\x81sae: 1")
    _error(load_config, p)


def test_load_top_level_list(tmp_path):
    """A YAML list is not a mapping of sections."""
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    assert "mapping" in _error(load_config, p)


def test_load_top_level_scalar(tmp_path):
    """A YAML scalar is not a mapping of sections either."""
    p = tmp_path / "scalar.yaml"
    p.write_text("42\n")
    _error(load_config, p)


def test_load_empty_file(tmp_path):
    """An empty file means all defaults."""
    p = tmp_path / "empty.yaml"
    p.write_text("")
    assert load_config(p) == Config()


def test_load_values_and_unknown_key_from_file(tmp_path):
    """Values in the file are used; an unknown key in the file is refused by path."""
    p = tmp_path / "c.yaml"
    p.write_text("sae:\n  dict_size: 32\n  l1: 0.25\ntrain:\n  lr: 0.01\n")
    cfg = load_config(p)
    assert (cfg.sae.dict_size, cfg.sae.l1, cfg.train.lr) == (32, 0.25, 0.01)
    p.write_text("train:\n  lrr: 0.01\n")
    assert "train.lrr" in _error(load_config, p)


def test_overrides_parse_as_yaml():
    """`--set` values become lists / floats / ints."""
    cfg = load_config(None, ["sae.dict_size=[64,128]", "sae.l1=0.5", "train.seeds=[1,2]"])
    assert cfg.sae.dict_size == [64, 128]
    assert cfg.sae.l1 == 0.5 and isinstance(cfg.sae.l1, float)
    assert cfg.train.seeds == [1, 2]


def test_overrides_win_over_file(tmp_path):
    """An override replaces the value from the file and keeps the file's other keys."""
    p = tmp_path / "c.yaml"
    p.write_text("sae:\n  dict_size: 32\n  l1: 0.25\n")
    cfg = load_config(p, ["sae.l1=0.5"])
    assert cfg.sae.l1 == 0.5
    assert cfg.sae.dict_size == 32


def test_override_without_equals():
    """An override must be key=value."""
    assert "key=value" in _error(load_config, None, ["sae.l1"])


def test_override_through_non_section(tmp_path):
    """`train.lr.x=1` treats a number as a section: refused (with and without lr set in the file)."""
    _error(load_config, None, ["train.lr.x=1"])
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 0.01\n")
    assert "not a section" in _error(load_config, p, ["train.lr.x=1"])


def test_override_empty_key_part():
    """`sae..l1=1` has an empty path part."""
    _error(load_config, None, ["sae..l1=1"])


def test_override_unknown_key():
    """An override to a key that does not exist is named."""
    assert "sae.nope" in _error(load_config, None, ["sae.nope=1"])


# -- expand_grid ----------------------------------------------------------------------------


def test_expand_grid_full_product_in_stable_order():
    """2 dict sizes x 2 l1 x 2 seeds = 8 RunSpecs, dict_size outermost, seed innermost."""
    cfg = load_config(None, ["sae.dict_size=[64,128]", "sae.l1=[0.1,0.2]", "train.seeds=[1,2]"])
    specs = expand_grid(cfg)
    # 2 * 2 * 2 = 8 combinations, in itertools.product order (dict_size, l1, seed)
    expected = [RunSpec(arch="relu", dict_size=m, sparsity=a, seed=s) for m, a, s in itertools.product([64, 128], [0.1, 0.2], [1, 2])]
    assert specs == expected
    assert len(set(specs)) == 8
    assert expand_grid(cfg) == specs  # same order on a second call


def test_expand_grid_without_seeds_uses_train_seed():
    """Scalars and no seeds list: one RunSpec with train.seed."""
    cfg = parse_config({"sae": {"dict_size": 48, "l1": 0.3}, "train": {"seed": 7}})
    assert expand_grid(cfg) == [RunSpec(arch="relu", dict_size=48, sparsity=0.3, seed=7)]


def test_expand_grid_l1_int_becomes_float():
    """l1 given as an int in a list is stored as a float in the RunSpec."""
    cfg = parse_config({"sae": {"l1": [0, 1]}})
    specs = expand_grid(cfg)
    # default dict_size 1024, default seed 0; l1 axis [0, 1] -> two specs
    assert [s.sparsity for s in specs] == [0.0, 1.0]
    assert all(isinstance(s.sparsity, float) for s in specs)
    assert all(s.dict_size == 1024 and s.seed == 0 for s in specs)


def test_seeds_validation():
    """An empty or negative seeds list is refused."""
    assert "train.seeds" in _error(parse_config, {"train": {"seeds": []}})
    assert "train.seeds" in _error(parse_config, {"train": {"seeds": [1, -1]}})


def test_seeds_min_size_limits_extra_seeds_to_large_dictionaries():
    from saekit.config import Config, expand_grid

    cfg = Config.model_validate({"sae": {"dict_size": [64, 128, 256], "l1": 0.1}, "train": {"seeds": [3, 4], "seeds_min_size": 128}})
    # 64 < 128 trains only the first seed (3); 128 and 256 train both: 1 + 2 + 2 = 5 SAEs.
    assert [(s.dict_size, s.seed) for s in expand_grid(cfg)] == [(64, 3), (128, 3), (128, 4), (256, 3), (256, 4)]


@pytest.mark.parametrize("key", ["train.seed", "source.seed", "source.d", "sae.dict_size", "train.seeds"])
def test_integers_beyond_2_62_are_refused_in_config_not_in_torch(key):
    """A seed or size past a signed 64-bit integer used to reach torch (ValueError: Overflow, exit 1)."""
    huge = 2**70
    value = f"[1,{huge}]" if key == "train.seeds" else str(huge)
    with pytest.raises(InputError, match="too large"):
        load_config(None, [f"{key}={value}"])
    load_config(None, [f"{key}={'[1,2]' if key == 'train.seeds' else 2**20}"])  # big but valid
