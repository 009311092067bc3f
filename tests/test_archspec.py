"""One spec per architecture: an SAE built from Python with its defaults is the SAE `saekit train` builds."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
import torch

from saekit import config
from saekit.archspec import ARCH_SPECS
from saekit.config import KNOWN_ARCHS, SPARSITY_KNOBS, Config, expand_grid
from saekit.sae import ARCHITECTURES
from saekit.train.identity import run_id_for
from saekit.train.plan import plan_ensembles
from saekit.train.run import build_ensemble

# Attributes that hold a hyperparameter in some architecture (absent ones compare as missing on both sides).
HYPER_ATTRIBUTES = (
    "bandwidth",
    "init_threshold",
    "aux_k",
    "n_aux",
    "aux_coef",
    "dead_after",
    "threshold_momentum",
    "l1_reduction",
    "decoder_norm",
    "unit_decoder",
    "prefix_fractions",
    "prefix_sizes",
)


def _from_train(arch: str):
    """The SAE `saekit train --set sae.arch=ARCH` starts from (no other override)."""
    cfg = Config(sae={"arch": arch})
    specs = expand_grid(cfg)
    (plan,) = plan_ensembles(specs, [run_id_for(cfg, s) for s in specs])
    return cfg, build_ensemble(cfg, plan, cfg.source.d, torch.device("cpu"))


@pytest.mark.parametrize("arch", KNOWN_ARCHS)
def test_python_defaults_build_the_train_default(arch: str) -> None:
    """`Arch(d, m, seeds, knob)` with no optional argument equals the ensemble `saekit train` builds from the config
    defaults: every init kwarg, hyperparameter attribute, buffer (persistent or not) and initial tensor."""
    cfg, trained = _from_train(arch)
    knob = SPARSITY_KNOBS[arch]
    python = ARCHITECTURES[arch](cfg.source.d, cfg.sae.dict_size, [cfg.train.seed], **{knob: [getattr(cfg.sae, knob)]})
    assert python.init_kwargs() == trained.init_kwargs()
    missing = object()
    for name in HYPER_ATTRIBUTES:
        assert getattr(python, name, missing) == getattr(trained, name, missing), name
    assert (python.b_dec is None) == (trained.b_dec is None)
    buffers = dict(trained.named_buffers())
    assert dict(python.named_buffers()).keys() == buffers.keys()
    for name, value in python.named_buffers():
        assert torch.equal(value, buffers[name]), name
    state = trained.state_dict()
    assert python.state_dict().keys() == state.keys()
    for name, value in python.state_dict().items():
        assert torch.equal(value, state[name]), name


@pytest.mark.parametrize("arch", KNOWN_ARCHS)
def test_spec_defaults_are_the_constructor_and_config_defaults(arch: str) -> None:
    """The constructor's default arguments and the config's values for `sae.arch: ARCH` are the spec's defaults."""
    spec = ARCH_SPECS[arch]
    cls = ARCHITECTURES[arch]
    assert cls.arch == arch and cls.member_keys == ("seeds", spec.knob)
    signature = inspect.signature(cls.__init__).parameters
    for param, value in spec.constructor_defaults().items():
        assert signature[param].default == value, param
    sae = Config(sae={"arch": arch}).sae
    assert {key: getattr(sae, key) for key in spec.config_defaults} == spec.config_defaults
    assert config.ARCH_KEYS[arch] == tuple(spec.defaults) and config.SPARSITY_KNOBS[arch] == spec.knob
    assert isinstance(getattr(sae, spec.knob), int) == spec.integer_knob


def test_every_arch_key_is_a_config_field_and_a_constructor_argument() -> None:
    """Each spec key is an SAEConfig field and, under its argument name, a constructor parameter."""
    for spec in ARCH_SPECS.values():
        params = inspect.signature(ARCHITECTURES[spec.name].__init__).parameters
        for key in spec.config_defaults:
            assert key in config.SAEConfig.model_fields
            assert spec.params.get(key, key) in params, (spec.name, key)


def test_knob_labels() -> None:
    """Label and symbol per knob, as text and figures print them."""
    names = {spec.knob: (spec.knob_label, spec.knob_symbol, spec.knob_name) for spec in ARCH_SPECS.values()}
    assert names == {
        "l1": ("L1 coefficient", "α", "L1 coefficient α"),
        "k": ("k", "k", "k"),
        "l0_coef": ("L0 coefficient", "λ", "L0 coefficient λ"),
    }
    assert config.KNOB_LABELS == {knob: label for knob, (label, _, _) in names.items()}


def test_config_and_specs_import_without_torch() -> None:
    """saekit.config and saekit.archspec stay torch-free (configs validate without it)."""
    code = "import sys, saekit.archspec, saekit.config; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
