"""Properties checked with hypothesis: the config parser never lets anything but InputError out and round-trips
what it accepts; the metrics stay in their ranges and have the invariances their definitions promise.

Bugs these found (fixed): PyYAML's constructors raise ValueError / KeyError / AttributeError on some scalars
(`2001-13-45`, `!!bool maybe`, `0x_`), which escaped `load_config` (`saekit train --set sae.l1=2001-13-45` exited 1
with a Python error instead of 2); deeply nested `[[[...` raised RecursionError; a list or object given as
`source.kind` or `sae.arch` raised TypeError (unhashable) out of pydantic; a key with a line break made a two-line
message; and `cosine_matrix` clamped norms at 1e-12, so a direction of norm below that (a dictionary scaled by
1e-13) got cosine 0.01 with itself and MMCS was not scale invariant.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from saekit.analysis.consensus import consensus_count, seed_agreement
from saekit.config import Config, load_config, parse_config
from saekit.errors import InputError
from saekit.metrics import (
    cosine_matrix,
    dead_fraction,
    dense_fraction,
    fvu,
    l0,
    matched_cosines,
    max_cosines,
    mmcs,
    mmcs_members,
    mse,
    recovered_fraction,
    sparsity_term,
)

# No deadline and no too_slow health check: both time the examples, and this machine's cores are shared.
BOUNDED = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# ---------------------------------------------------------------- config


def _parses_or_refuses(parse) -> Config | None:
    """parse() gives a Config or raises InputError with a one-line reason; anything else fails the test."""
    try:
        cfg = parse()
    except InputError as err:
        message = str(err)
        assert message and len(message.splitlines()) == 1, repr(message)
        return None
    assert isinstance(cfg, Config)
    return cfg


KNOWN_KEYS = [f"source.{k}" for k in Config.model_fields["source"].annotation.model_fields] + [
    f"{section}.{k}" for section in ("sae", "train") for k in Config.model_fields[section].annotation.model_fields
]
# Pieces of YAML that exercise its odd corners: tags, anchors, flow collections, dates, sexagesimal and hex ints.
YAML_PIECES = [
    "[", "]", "{", "}", ", ", ": ", "-", "!!int ", "!!bool ", "!!float ", "!!timestamp ", "!!python/object:os.system ",
    "!!set ", "&a ", "*a", "2001-13-45", "2001-02-03", "0x", "_", "1e999", "-.inf", ".nan", "null", "~", "yes", "on",
    "'", '"', "\n", "\t", "#", "%", "@", "`", "1:2", "? ", "0.3", "16", "relu", "toy", "\u2028", "\x85",
]  # fmt: skip
YAMLISH = st.lists(st.sampled_from(YAML_PIECES), max_size=8).map("".join)
KEYS = st.one_of(st.sampled_from(KNOWN_KEYS), st.sampled_from(KNOWN_KEYS).map(lambda k: k + ".x"), st.text(max_size=12))
OVERRIDES = st.lists(
    st.one_of(st.tuples(KEYS, st.one_of(YAMLISH, st.text(max_size=12))).map(lambda kv: f"{kv[0]}={kv[1]}"), st.text(max_size=12)),
    max_size=4,
)


@BOUNDED
@given(overrides=OVERRIDES)
def test_any_set_overrides_give_a_config_or_an_input_error(overrides: list[str]) -> None:
    _parses_or_refuses(lambda: load_config(None, overrides))


def test_set_overrides_the_property_found() -> None:
    """The values that escaped as ValueError, KeyError, AttributeError or RecursionError, and a key with a line break."""
    for item in ["sae.l1=2001-13-45", "sae.l1=!!bool maybe", "sae.l1=0x_", "sae.l1=!!timestamp x", "sae.l1=!!int abc",
                 "sae.l1=" + "[" * 5000, "sae.l1=" + "{a: " * 3000, "sae.a\nb=1", "sae.a\u2028b=1"]:  # fmt: skip
        assert _parses_or_refuses(lambda item=item: load_config(None, [item])) is None, item
    assert load_config(None, ["sae.l1=0.5"]).sae.l1 == 0.5


def test_a_yaml_file_the_property_found(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    for text in ["sae:\n  l1: 2001-13-45\n", "sae:\n  l1: !!bool maybe\n", "sae:\n  l1: " + "[" * 5000 + "\n"]:
        path.write_text(text)
        with pytest.raises(InputError, match="config is not valid YAML"):
            load_config(path)


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


def _section(name: str) -> st.SearchStrategy[dict]:
    fields = list(Config.model_fields[name].annotation.model_fields)
    return st.dictionaries(st.sampled_from(fields) | st.text(max_size=6), JSONISH, max_size=4)


NESTED = st.dictionaries(
    st.sampled_from(["source", "sae", "train"]) | st.text(max_size=6),
    st.one_of(_section("source"), _section("sae"), _section("train"), JSONISH),
    max_size=3,
)


@BOUNDED
@given(data=NESTED)
def test_any_nested_dict_gives_a_config_or_an_input_error(data: dict) -> None:
    _parses_or_refuses(lambda: parse_config(data))


@pytest.mark.parametrize(
    "data", [{"source": {"kind": [1]}}, {"sae": {"arch": []}}, {"sae": {"arch": {"relu": 1}}}, {"source": {"kind": {}}}]
)
def test_unhashable_kind_or_arch_is_an_input_error(data: dict) -> None:
    """Found by the property above: these raised TypeError (unhashable) from the validators that fill in defaults."""
    with pytest.raises(InputError, match="bad config"):
        parse_config(data)


POSITIVE_FLOAT = st.floats(min_value=1e-6, max_value=1e3, allow_nan=False)
SIZES = st.integers(min_value=1, max_value=4096)


@st.composite
def valid_configs(draw: st.DrawFn) -> dict:
    """A nested dict (as YAML or --set would give) of a valid config: some keys of each section, each valid."""
    kind = draw(st.sampled_from(["toy", "tms", "compute"]))
    source: dict = {"kind": kind, "d": draw(SIZES), "seed": draw(st.integers(0, 2**31))}
    n = draw(SIZES)
    source["n_features"] = n
    if kind == "toy":
        source["mean_active"] = draw(st.floats(min_value=0.01, max_value=float(n)))
        source["prob_decay"] = draw(st.floats(min_value=0.01, max_value=1.0))
        source["correlated"] = draw(st.booleans())
        source["noise_std"] = draw(st.floats(min_value=0.0, max_value=2.0))
    else:
        source["sparsity"] = draw(st.floats(min_value=0.0, max_value=0.99))
    arch = draw(st.sampled_from(["relu", "topk", "batchtopk", "jumprelu", "gated", "matryoshka"]))
    sizes = draw(st.one_of(SIZES, st.lists(SIZES, min_size=1, max_size=3)))
    sae: dict = {"arch": arch, "dict_size": sizes}
    smallest = min(sizes) if isinstance(sizes, list) else sizes
    if arch in ("relu", "gated"):
        sae["l1"] = draw(st.one_of(POSITIVE_FLOAT, st.lists(POSITIVE_FLOAT, min_size=1, max_size=3)))
    elif arch == "jumprelu":
        sae["l0_coef"] = draw(st.lists(POSITIVE_FLOAT, min_size=1, max_size=3))
    else:
        sae["k"] = draw(st.one_of(st.integers(1, smallest), st.lists(st.integers(1, smallest), min_size=1, max_size=3)))
    if arch == "matryoshka":
        sae["prefix_fractions"] = [1.0]  # one prefix: valid for any dict_size
    train = {
        "batch_size": draw(SIZES),
        "lr": draw(POSITIVE_FLOAT),
        "samples": draw(st.integers(1, 10**9)),
        "seeds": draw(st.none() | st.lists(st.integers(0, 2**31), min_size=1, max_size=3)),
        "checkpoint_every": draw(st.integers(1, 10**9)),
    }
    return {"source": source, "sae": sae, "train": train}


def _flow_yaml(value: object) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip()


@BOUNDED
@given(data=valid_configs())
def test_valid_configs_round_trip(tmp_path: Path, data: dict) -> None:
    """A valid config equals itself reloaded from its full dump (as a dict and as a YAML file), and the same keys
    given as --set overrides give the same config."""
    cfg = parse_config(data)
    dump = cfg.model_dump()
    assert parse_config(dump).model_dump() == dump
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(dump))
    assert load_config(path).model_dump() == dump
    overrides = [f"{section}.{key}={_flow_yaml(value)}" for section, keys in data.items() for key, value in keys.items()]
    assert load_config(None, overrides).model_dump() == dump


# ---------------------------------------------------------------- metrics

# Small float32 matrices with entries of any magnitude float32 holds (subnormals included). Rows that are all zero
# are drawn again (`assume`): such a row has no direction; cosine_matrix gives it cosine 0 with everything, which
# test_zero_rows_have_cosine_zero checks on its own.
ELEMENTS = st.floats(min_value=-1e6, max_value=1e6, width=32, allow_nan=False)


def matrices(rows: st.SearchStrategy[int], d: int) -> st.SearchStrategy[np.ndarray]:
    return rows.flatmap(lambda n: hnp.arrays(np.float32, (n, d), elements=ELEMENTS))


def _nonzero_rows(a: np.ndarray) -> torch.Tensor:
    assume(bool((np.abs(a).sum(axis=1) > 0).all()))
    return torch.from_numpy(a.copy())


D = 5
TRUTH = matrices(st.integers(1, 8), D)
DICTIONARY = matrices(st.integers(1, 10), D)
EPS = 1e-12  # float64 cosines of float32 rows: the rounding of a few products and a square root


@BOUNDED
@given(dictionary=DICTIONARY, truth=TRUTH)
def test_mmcs_and_cosines_lie_in_minus_one_one(dictionary: np.ndarray, truth: np.ndarray) -> None:
    dic, tru = _nonzero_rows(dictionary), _nonzero_rows(truth)
    cos = cosine_matrix(tru, dic)
    assert cos.shape == (tru.shape[0], dic.shape[0])
    assert bool((cos.abs() <= 1 + EPS).all())
    assert -1 - EPS <= mmcs(dic, tru) <= 1 + EPS
    torch.testing.assert_close(cosine_matrix(dic, tru), cos.T, atol=EPS, rtol=0)


@BOUNDED
@given(
    dictionary=DICTIONARY,
    truth=TRUTH,
    log_scales=st.lists(st.floats(min_value=-40, max_value=40), min_size=10, max_size=10),
    seed=st.integers(0, 2**16),
)
def test_mmcs_is_invariant_to_positive_row_scales_and_row_order(
    dictionary: np.ndarray, truth: np.ndarray, log_scales: list[float], seed: int
) -> None:
    """Scales from 1e-40 to 1e40 (in float64, so that only the metric's own arithmetic rounds), any row order."""
    dic, tru = _nonzero_rows(dictionary), _nonzero_rows(truth)
    base = mmcs(dic, tru)
    scales = torch.tensor([10.0**s for s in log_scales], dtype=torch.float64)[:, None]  # (10, 1): enough for any rows
    assert mmcs(dic.double() * scales[: dic.shape[0]], tru) == pytest.approx(base, abs=EPS)
    assert mmcs(dic, tru.double() * scales[: tru.shape[0]]) == pytest.approx(base, abs=EPS)
    order = torch.randperm(dic.shape[0], generator=torch.Generator().manual_seed(seed))
    assert mmcs(dic[order], tru) == pytest.approx(base, abs=EPS)


@BOUNDED
@given(truth=TRUTH, extra=DICTIONARY, seed=st.integers(0, 2**16))
def test_mmcs_is_one_for_the_truth_a_permutation_or_a_superset(truth: np.ndarray, extra: np.ndarray, seed: int) -> None:
    tru, more = _nonzero_rows(truth), _nonzero_rows(extra)
    order = torch.randperm(tru.shape[0], generator=torch.Generator().manual_seed(seed))
    for dic in (tru, tru[order], torch.cat([more, tru])[torch.randperm(tru.shape[0] + more.shape[0])]):
        assert mmcs(dic, tru) == pytest.approx(1.0, abs=EPS)
        assert recovered_fraction(dic, tru, 0.9) == 1.0
    assert recovered_fraction(tru[order], tru, 0.9, method="matched") == 1.0


@BOUNDED
@given(dictionary=DICTIONARY, truth=TRUTH, thresholds=st.lists(st.floats(-1, 1), min_size=2, max_size=2))
def test_recovered_fraction_is_a_fraction_monotone_in_the_threshold(
    dictionary: np.ndarray, truth: np.ndarray, thresholds: list[float]
) -> None:
    """In [0, 1]; never larger at a higher threshold; a one-to-one matching recovers at most what the best cosine does."""
    dic, tru = _nonzero_rows(dictionary), _nonzero_rows(truth)
    low, high = sorted(thresholds)
    for method in ("max", "matched"):
        at_low, at_high = recovered_fraction(dic, tru, low, method=method), recovered_fraction(dic, tru, high, method=method)
        assert 0.0 <= at_high <= at_low <= 1.0
    assert recovered_fraction(dic, tru, high, method="matched") <= recovered_fraction(dic, tru, high, method="max")
    best, matched = max_cosines(dic, tru), matched_cosines(dic, tru)
    assert matched.shape == (min(dic.shape[0], tru.shape[0]),)
    assert bool((matched <= best.max() + EPS).all())


@BOUNDED
@given(dictionary=DICTIONARY, truth=TRUTH, zeros=st.integers(1, 3))
def test_zero_rows_have_cosine_zero(dictionary: np.ndarray, truth: np.ndarray, zeros: int) -> None:
    """An all-zero dictionary row has no direction: cosine 0 with every true feature. So appending one changes a
    true feature's best cosine only where all others were negative (it becomes 0)."""
    dic, tru = _nonzero_rows(dictionary), _nonzero_rows(truth)
    padded = torch.cat([dic, torch.zeros(zeros, D)])
    assert bool((cosine_matrix(tru, padded)[:, -zeros:] == 0).all())
    assert mmcs(padded, tru) == pytest.approx(max_cosines(dic, tru).clamp_min(0).mean().item(), abs=EPS)
    assert mmcs(torch.zeros(zeros, D), tru) == 0.0


@BOUNDED
@given(truth=TRUTH, members=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_mmcs_members_equals_mmcs_on_unit_rows(truth: np.ndarray, members: int, seed: int) -> None:
    """The float32 training-time MMCS of each member equals the float64 metric (float32 rounding: 1e-5)."""
    tru = _nonzero_rows(truth).double()
    tru = (tru / tru.norm(dim=1, keepdim=True)).float()  # (not F.normalize: it clamps norms below 1e-12)
    g = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(members, 7, D, generator=g), dim=2)
    got = mmcs_members(directions, tru)
    want = torch.tensor([mmcs(directions[k], tru) for k in range(members)])
    torch.testing.assert_close(got.double(), want.double(), atol=1e-5, rtol=0)


@BOUNDED
@given(a=DICTIONARY, b=DICTIONARY, threshold=st.floats(0.5, 0.99))
def test_cross_dictionary_similarity_is_symmetric(a: np.ndarray, b: np.ndarray, threshold: float) -> None:
    """Seed agreement (the mean of MMCS both ways) and the consensus count do not depend on which SAE comes first;
    agreement is in [-1, 1] and 1 with itself; the consensus count is at most the smaller dictionary's size."""
    x, y = _nonzero_rows(a), _nonzero_rows(b)
    assert seed_agreement(x, y) == seed_agreement(y, x)
    assert -1 - EPS <= seed_agreement(x, y) <= 1 + EPS
    assert seed_agreement(x, x) == pytest.approx(1.0, abs=EPS)
    assert consensus_count(x, y, threshold) == consensus_count(y, x, threshold) <= min(x.shape[0], y.shape[0])


@BOUNDED
@given(
    x=hnp.arrays(np.float32, st.tuples(st.integers(2, 16), st.integers(1, 6)), elements=st.floats(-100, 100, width=32)),
    seed=st.integers(0, 2**16),
)
def test_reconstruction_metrics(x: np.ndarray, seed: int) -> None:
    """MSE and FVU are >= 0 and 0 for a perfect reconstruction; predicting the batch mean gives FVU 1."""
    xt = torch.from_numpy(x.copy())
    x_hat = xt + torch.randn(xt.shape, generator=torch.Generator().manual_seed(seed))
    assert mse(xt, x_hat) >= 0 and mse(xt, xt) == 0.0
    centred = (xt.double() - xt.double().mean(dim=0)).pow(2).sum().item()
    if centred > 0:
        assert fvu(xt, x_hat) >= 0 and fvu(xt, xt) == 0.0
        assert fvu(xt, xt.double().mean(dim=0, keepdim=True).expand_as(xt)) == pytest.approx(1.0, rel=1e-9)
    else:  # every sample the same: no variance to explain
        assert math.isnan(fvu(xt, x_hat))


@BOUNDED
@given(codes=hnp.arrays(np.float32, st.tuples(st.integers(1, 16), st.integers(1, 12)), elements=st.floats(-10, 10, width=32)))
def test_sparsity_metrics(codes: np.ndarray) -> None:
    """L0 in [0, m]; the sum reduction is m times the mean one; dead and dense fractions in [0, 1], and a latent
    that fires on more than 10% of samples is not dead, so the two add up to at most 1."""
    c = torch.from_numpy(codes.copy())
    n, m = c.shape
    assert 0 <= l0(c) <= m
    assert sparsity_term(c, "sum") == pytest.approx(m * sparsity_term(c, "mean"), rel=1e-12, abs=1e-12)
    fire_counts = (c != 0).sum(dim=0)
    dead, dense = dead_fraction(fire_counts), dense_fraction(fire_counts, n)
    assert 0 <= dead <= 1 and 0 <= dense <= 1 and dead + dense <= 1
