"""The geometric median (Weiszfeld) against cases whose answer is known by hand, and its use as the decoder-bias init."""

from __future__ import annotations

import math

import pytest
import torch

from saekit.config import parse_config
from saekit.errors import InputError
from saekit.sae.geometric_median import geometric_median


def test_one_dimension_gives_the_ordinary_median() -> None:
    # In 1-D, sum |x_i - m| is minimised by the median: 1 for {0, 1, 10}.
    assert geometric_median(torch.tensor([[0.0], [1.0], [10.0]])).item() == pytest.approx(1.0, abs=1e-4)


def test_symmetric_points_give_their_centre() -> None:
    square = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]]) + torch.tensor([3.0, -2.0])
    assert torch.allclose(geometric_median(square), torch.tensor([3.0, -2.0]), atol=1e-5)


def test_equilateral_triangle_gives_the_fermat_point() -> None:
    # For a triangle with all angles below 120 degrees the geometric median is the Fermat point; for an equilateral
    # triangle that is its centroid.
    tri = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, math.sqrt(3.0)]])
    assert torch.allclose(geometric_median(tri), torch.tensor([1.0, 1.0 / math.sqrt(3.0)]), atol=1e-4)


def test_an_outlier_barely_moves_it() -> None:
    # 99 points near the origin and one at 1000: the mean moves to ~10, the geometric median stays near 0.
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(99, 5, generator=g) * 0.01, torch.full((1, 5), 1000.0)])
    assert x.mean(0).norm() > 20
    assert geometric_median(x).norm() < 0.05


def test_decoder_bias_init_needs_the_bias() -> None:
    with pytest.raises(InputError, match="needs sae.decoder_bias"):
        parse_config({"sae": {"decoder_bias_init": "geometric_median"}})
    cfg = parse_config({"sae": {"decoder_bias": True, "decoder_bias_init": "geometric_median"}})
    assert cfg.sae.decoder_bias_init == "geometric_median"


def test_a_fresh_ensemble_starts_its_decoder_bias_at_the_median_of_its_own_stream(tmp_path) -> None:
    from saekit.config import expand_grid
    from saekit.sources import Stream, make_source
    from saekit.train.identity import run_id_for
    from saekit.train.plan import plan_ensembles
    from saekit.train.run import BIAS_INIT_SAMPLES, start_ensemble

    cfg = parse_config(
        {
            "source": {"d": 16, "n_features": 32, "mean_active": 3},
            "sae": {"dict_size": 32, "l1": [0.1, 0.3], "decoder_bias": True, "decoder_bias_init": "geometric_median"},
        }
    )
    source = make_source(cfg.source)
    specs = expand_grid(cfg)
    (plan,) = plan_ensembles(specs, [run_id_for(cfg, s) for s in specs])
    state = start_ensemble(cfg, plan, tmp_path / "none", 16, torch.device("cpu"), source)
    expected = geometric_median(source.batch(BIAS_INIT_SAMPLES, 0, Stream.BIAS_INIT))
    assert expected.norm() > 0.1  # toy data is non-negative, so its median is far from zero
    for k in range(2):
        assert torch.allclose(state.sae.b_dec[k], expected)
