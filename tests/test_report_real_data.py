"""saekit.report on a language model's activations (no ground truth): the frontier, feature density, data header, columns."""

from __future__ import annotations

import base64
import json
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from browser import chromium_page
from saekit.archspec import RELU
from saekit.io import LATENTS_NAME, save_checkpoint
from saekit.report import figures, read_source_info, render_report, write_report
from saekit.report.html import esc, source_sentence, visible_columns
from saekit.report.latents import load_latent_rates
from saekit.sae import ReluSAE
from test_report import ESTIMATE, assert_valid_page, make_analysis, make_runs

SIZES = [512, 1024, 2048]
L1S = [0.01, 0.03, 0.1, 0.3]
SEEDS = [0, 1]
EVAL_SAMPLES = 65_536
CE_CLEAN, CE_ZERO = 3.12, 9.84
SOURCE_INFO = {
    "kind": "activations",
    "path": "acts/smollm2-l15",
    "model": "smollm2<b>",
    "model_class": "LlamaForCausalLM",
    "causal": True,
    "layer": 15,
    "site": "resid",
    "window": 128,
    "dtype": "float16",
    "text": "stdlib",
    "tokens": 2_000_000,
    "d": 576,
    "input_scale": 0.13,
    "skip_positions": 1,
    "train_windows": 14_800,
    "eval_windows": 780,
}


def _fire_counts(m: int, a: float, seed: int) -> np.ndarray:
    """Synthetic firing counts: log-normal frequencies that fall with α; dead latents grow with size and α; a few dense."""
    rng = np.random.default_rng(1000 * seed + m + int(a * 1000))
    freq = 10.0 ** rng.normal(-2.3 - 0.6 * np.log10(a / 0.01), 0.55, size=m)
    counts = np.minimum(np.round(freq * EVAL_SAMPLES), EVAL_SAMPLES)
    dead = rng.random(m) < min(0.9, 0.02 * (m / 512) * (a / 0.01) ** 0.5)
    counts[dead] = 0
    counts[: max(1, m // 400)] = rng.integers(int(0.15 * EVAL_SAMPLES), int(0.4 * EVAL_SAMPLES), size=max(1, m // 400))
    return counts.astype(np.int64)


def make_lm_runs(out: Path, *, write_latents: bool = True, with_ce: bool = True) -> list[dict]:
    """Rows shaped like RunStore.runs() for an activations sweep, each with a real run folder holding latents.safetensors."""
    runs = []
    for m in SIZES:
        for a in L1S:
            for seed in SEEDS:
                run_id = f"lm-m{m}-a{a}-s{seed}"
                counts = _fire_counts(m, a, seed)
                l0 = float(counts.sum() / EVAL_SAMPLES)
                fvu = min(0.95, 0.9 / (1.0 + l0 / 8.0) * (512 / m) ** 0.15)
                recovered = 1.0 - 1.1 * fvu**1.3
                metrics = {
                    "mse": 0.02 * fvu,
                    "fvu": fvu,
                    "l0": l0,
                    "dead_fraction": float((counts == 0).mean()),
                    "dense_fraction": float((counts / EVAL_SAMPLES > 0.1).mean()),
                    "reconstruction_loss": 0.02 * fvu,
                    "sparsity_loss": 0.5 / (a / 0.01) ** 0.7,
                    "l1_loss": a * 0.5 / (a / 0.01) ** 0.7,
                    "eval_samples": EVAL_SAMPLES,
                    "input_scale": 0.13,
                }
                if with_ce:
                    metrics.update(
                        ce_clean=CE_CLEAN,
                        ce_zero=CE_ZERO,
                        ce_sae=CE_ZERO - recovered * (CE_ZERO - CE_CLEAN),
                        ce_delta=(1 - recovered) * (CE_ZERO - CE_CLEAN),
                        ce_loss_recovered=recovered,
                        ce_eval_tokens=32_768,
                    )
                folder = out / "runs" / run_id
                if write_latents:
                    sae = ReluSAE(4, m, [seed], [a])
                    stats = {"fire_counts": torch.from_numpy(counts), "eval_samples": torch.tensor(EVAL_SAMPLES)}
                    save_checkpoint(folder, sae, samples=1_000_000, latent_stats=stats)
                runs.append(
                    {
                        "run_id": run_id,
                        "arch": "relu",
                        "dict_size": m,
                        "knob": "l1",
                        "knob_value": a,
                        "l1": a,
                        "seed": seed,
                        "status": "done",
                        "samples": 1_000_000,
                        "seconds": 30.0 + m / 100,
                        **{k: metrics.get(k) for k in ("mse", "fvu", "l0", "dead_fraction", "mmcs", "recovered_0_9")},
                        "metrics": metrics,
                        "config": {
                            "source": {"kind": "activations", "path": SOURCE_INFO["path"], "skip_positions": 1, "seed": 0},
                            "sae": {"arch": "relu", "dict_size": m, "l1": a},
                            "train": {"batch_size": 4096, "lr": 1e-3, "samples": 1_000_000, "seed": seed},
                        },
                        "checkpoint": str(folder),
                        "error": None,
                    }
                )
    return runs


def lm_analysis(runs: list[dict]) -> dict:
    analysis = make_analysis([r for r in runs if r["status"] == "done"])
    analysis.pop("collapse")
    return {**analysis, "dict_sizes": SIZES, "knob_values": L1S}


def png_size(uri: str) -> tuple[int, int]:
    """(width, height) of a PNG data URI, after checking it is a PNG."""
    raw = base64.b64decode(uri.split(",", 1)[1])
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", raw[16:24])


def figure_uris(text: str, key: str) -> list[str]:
    """The image data URIs of the figures with data-figure=key."""
    out = []
    for chunk in text.split(f'<figure data-figure="{key}">')[1:]:
        out.append(chunk.split('<img src="', 1)[1].split('"', 1)[0])
    return out


# -- the page --------------------------------------------------------------------------------------


def test_real_data_report(tmp_path: Path) -> None:
    runs = make_lm_runs(tmp_path)
    path = write_report(tmp_path, runs, lm_analysis(runs), None, SOURCE_INFO)
    text = path.read_text(encoding="utf-8")
    assert_valid_page(text)
    assert text.count("<img") == text.count("<figure")
    # the data description: escaped, with the fields the brief names
    assert "smollm2&lt;b&gt; (LlamaForCausalLM) at layer 15, site resid (d = 576)" in text and "smollm2<b>" not in text
    for piece in ("2,000,000 tokens", "“stdlib” text", "windows of 128", "first 1 position of each", "scaled by 0.13"):
        assert piece in text
    # frontier with the CE panel (two panels: a wide figure), CE numbers in the caption
    (sparsity,) = figure_uris(text, "sparsity")
    width, height = png_size(sparsity)
    assert width > 2.2 * height
    assert "fraction of next-token loss recovered" in text
    assert f"clean model {CE_CLEAN} nats, site zero-ablated {CE_ZERO} nats" in text and "on 32,768 evaluation tokens" in text
    # feature density: one image, nothing skipped
    (density,) = figure_uris(text, "density")
    assert png_size(density)[0] > 500
    assert "skipped" not in text.split('<section id="density">')[1].split("</section>")[0]
    # no ground truth: recovery is a note; the columns follow the metrics there are
    assert "No ground truth in this data" in text
    heads = text.split('<thead><tr><th scope="col"', 1)[1].split("</thead>")[0]
    assert 'data-key="ce_loss_recovered"' in heads and 'data-key="dense_fraction"' in heads
    assert 'data-key="mmcs"' not in heads and 'data-key="recovered_0_9"' not in heads
    order = [text.index(f'id="{sid}"') for sid in ("recovery", "sparsity", "density", "dead", "loss", "cross", "estimate", "runs")]
    assert order == sorted(order)


def test_run_table_reads_metrics_kept_only_in_json(tmp_path: Path) -> None:
    """ce_loss_recovered and dense_fraction are not store columns: the table reads them from the run's metrics."""
    runs = make_lm_runs(tmp_path, write_latents=False)[:1]
    text = render_report(runs, None, None)
    m = runs[0]["metrics"]
    assert f'data-v="{m["ce_loss_recovered"]!r}"' in text and f'data-v="{m["dense_fraction"]!r}"' in text


def test_bad_latents_files_are_skipped_with_a_note(tmp_path: Path) -> None:
    runs = make_lm_runs(tmp_path)
    (Path(runs[0]["checkpoint"]) / LATENTS_NAME).write_bytes(b"not a safetensors file")  # checksum mismatch
    shutil.rmtree(runs[1]["checkpoint"])  # folder gone
    cfg = Path(runs[2]["checkpoint"]) / "cfg.json"
    cfg.write_text("{broken")  # malformed cfg.json
    rates, skipped = load_latent_rates(runs)
    assert len(rates) == len(runs) - 3 and len(skipped) == 3
    assert skipped[0].startswith(runs[0]["run_id"] + ": ") and "checksum" in skipped[0]
    text = write_report(tmp_path, runs, {}, None, SOURCE_INFO).read_text(encoding="utf-8")
    assert f"3 of {len(runs)} finished runs skipped" in text
    assert len(figure_uris(text, "density")) == 1


def test_latents_with_impossible_values_are_skipped(tmp_path: Path) -> None:
    runs = make_lm_runs(tmp_path, write_latents=False)[:2]
    for r, counts in zip(runs, (torch.tensor([5, -1, 3]), torch.tensor([[1, 2], [3, 4]]))):
        save_checkpoint(
            r["checkpoint"], ReluSAE(4, 3, [0], [0.1]), samples=1, latent_stats={"fire_counts": counts, "eval_samples": torch.tensor(10)}
        )
    rates, skipped = load_latent_rates(runs)
    assert rates == [] and "outside [0, eval_samples]" in skipped[0] and "expected (m,)" in skipped[1]


def test_density_without_any_readable_file_is_a_note(tmp_path: Path) -> None:
    runs = make_lm_runs(tmp_path, write_latents=False)
    text = render_report(runs, {}, None)
    assert_valid_page(text)
    assert 'data-figure="density"' in text and figure_uris(text, "density") == []
    assert f"No readable latents.safetensors in any finished run. {len(runs)} of {len(runs)} finished runs skipped" in text


def test_run_folders_are_found_after_the_sweep_moved(tmp_path: Path) -> None:
    runs = make_lm_runs(tmp_path / "old")
    (tmp_path / "old").rename(tmp_path / "new")
    assert load_latent_rates(runs)[0] == []
    rates, skipped = load_latent_rates(runs, tmp_path / "new")
    assert len(rates) == len(runs) and skipped == []


def test_failed_runs_are_not_counted_as_skipped(tmp_path: Path) -> None:
    runs = make_lm_runs(tmp_path)
    failed = dict(runs[0], run_id="lm-failed", status="failed", checkpoint=str(tmp_path / "runs" / "lm-failed"))
    rates, skipped = load_latent_rates([*runs, failed])
    assert len(rates) == len(runs) and skipped == []


# -- the figures -----------------------------------------------------------------------------------


def test_ce_panel_only_with_ce_metrics(tmp_path: Path) -> None:
    with_ce = figures.sparsity_frontier(make_lm_runs(tmp_path, write_latents=False), knob=RELU)
    without = figures.sparsity_frontier(make_lm_runs(tmp_path, write_latents=False, with_ce=False), knob=RELU)
    toy = figures.sparsity_frontier(make_runs(), knob=RELU)
    assert with_ce.png and without.png and toy.png
    assert "loss recovered" in with_ce.title and "clean model 3.12 nats" in with_ce.caption
    for block in (without, toy):
        assert "loss recovered" not in block.title and "Next-token" not in block.caption and "Right:" not in block.caption
    (w2, h2), (w1, h1) = png_size(with_ce.png), png_size(without.png)
    assert w2 / h2 > 1.3 * (w1 / h1)


def test_figures_take_odd_arch_names(tmp_path: Path) -> None:
    """Several architectures: one line / panel each, labelled with the arch name even when it looks like mathtext."""
    runs = make_lm_runs(tmp_path)
    odd = [dict(r, arch="$x^$", run_id=r["run_id"] + "-odd") for r in runs]
    assert figures.sparsity_frontier(runs + odd, knob=RELU).png
    rates, _ = load_latent_rates(runs + odd)
    assert figures.feature_density(rates, knob=RELU).png


def test_frontier_skips_without_l0() -> None:
    runs = [dict(r, l0=None, metrics=dict(r["metrics"] or {}, l0=None)) for r in make_runs()]
    block = figures.sparsity_frontier(runs, knob=RELU)
    assert block.png is None and "L0" in block.note
    assert figures.sparsity_frontier([], knob=RELU).png is None


def test_ce_sentence_gives_a_range_when_runs_disagree(tmp_path: Path) -> None:
    runs = make_lm_runs(tmp_path, write_latents=False)[:2]
    runs[1]["metrics"]["ce_clean"] = 3.2
    assert "clean model 3.12–3.2 nats" in figures.ce_sentence(runs)
    assert figures.ce_sentence(make_runs()) == ""


def test_density_counts_dead_latents_in_the_legend(tmp_path: Path) -> None:
    runs = make_lm_runs(tmp_path)
    rates, skipped = load_latent_rates(runs)
    r = rates[0]
    assert r.dead == int((r.counts == 0).sum()) > 0
    assert r.live_log10_freq.size == r.counts.size - r.dead and r.live_log10_freq.max() <= 0
    block = figures.feature_density(rates, skipped, knob=RELU)
    assert block.png and block.note is None and "median live latent" in block.title
    assert "dead" in block.caption and "10% of samples" in block.caption


# -- the header, the source file and the columns ---------------------------------------------------


def test_read_source_info(tmp_path: Path) -> None:
    assert read_source_info(tmp_path) is None
    (tmp_path / "source.json").write_text("{not json")
    assert read_source_info(tmp_path) is None
    (tmp_path / "source.json").write_bytes(b"\xff\xfe\x00")
    assert read_source_info(tmp_path) is None
    (tmp_path / "source.json").write_text("[1, 2]")
    assert read_source_info(tmp_path) is None
    (tmp_path / "source.json").write_text(json.dumps(SOURCE_INFO))
    assert read_source_info(tmp_path) == SOURCE_INFO


def test_source_sentence_only_for_activations() -> None:
    assert source_sentence(None) is None
    assert source_sentence({"n_features": 80, "n_represented": 40, "model_loss": 0.1}) is None  # tms writes this
    assert source_sentence({"kind": "activations"}).startswith("Activations of a language model.")
    sentence = source_sentence({"kind": "activations", "layer": 3, "site": "mlp", "skip_positions": 0})
    assert sentence.startswith("Activations of a language model at layer 3, site mlp.") and "left out" not in sentence
    text = render_report(make_runs()[:2], None, None, {"n_features": 80})
    assert 'id="source-info"' not in text


def test_toy_report_has_no_new_columns_but_has_the_frontier() -> None:
    runs = make_runs()
    keys = [k for k, _, _ in visible_columns(runs)]
    assert "ce_loss_recovered" not in keys and "dense_fraction" not in keys and "mmcs" in keys
    text = render_report(runs, make_analysis(runs), ESTIMATE)
    assert 'data-key="ce_loss_recovered"' not in text and 'data-key="dense_fraction"' not in text
    assert len(figure_uris(text, "sparsity")) == 1
    assert "No readable latents.safetensors" in text  # the fixture's checkpoint folders do not exist


def test_pipeline_passes_source_info(tmp_path: Path) -> None:
    """A tiny real sweep through `analyse_and_report`, relabelled as activations by its source.json."""
    from saekit.config import Config
    from saekit.pipeline import analyse_and_report
    from saekit.train.run import run_config

    cfg = Config.model_validate(
        {
            "source": {"d": 8, "n_features": 12, "mean_active": 2},
            "sae": {"dict_size": [8, 16], "l1": [0.03, 0.1]},
            "train": {"batch_size": 128, "samples": 1280, "eval_samples": 1000, "seeds": [0, 1]},
        }
    )
    rows, errors = run_config(cfg, tmp_path, progress=False)
    assert errors == [] and len(rows) == 8
    (tmp_path / "source.json").write_text(json.dumps(SOURCE_INFO))
    _, path = analyse_and_report(tmp_path)
    text = path.read_text(encoding="utf-8")
    assert esc("Activations of smollm2<b>") in text
    assert len(figure_uris(text, "density")) == 1 and "finished runs skipped" not in text
    (tmp_path / "source.json").write_text("{corrupt")
    _, path = analyse_and_report(tmp_path)
    assert 'id="source-info"' not in path.read_text(encoding="utf-8")


# -- a real browser --------------------------------------------------------------------------------


@pytest.mark.browser
def test_real_data_report_renders_in_chromium(tmp_path: Path) -> None:
    out = tmp_path / "out"
    runs = make_lm_runs(out)
    path = write_report(out, runs, lm_analysis(runs), None, SOURCE_INFO)
    started = time.perf_counter()
    with chromium_page(path, viewport=(1360, 900)) as opened:
        page, errors = opened.page, opened.errors
        widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
        assert len(widths) >= 4 and all(w > 0 for w in widths), widths
        assert "smollm2<b>" in page.inner_text("#source-info")
        page.click('#runs-table thead th[data-key="ce_loss_recovered"]')
        i = page.eval_on_selector_all("#runs-table thead th", "hs => hs.map(h => h.dataset.key).indexOf('ce_loss_recovered')")
        values = page.eval_on_selector_all("#runs-table tbody tr", f"rows => rows.map(r => parseFloat(r.cells[{i}].dataset.v))")
        assert values == sorted(values) and len(values) == len(runs)
        shot = tmp_path / "report.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
    assert errors == []
    print(f"browser test: {time.perf_counter() - started:.1f}s, screenshot {tmp_path / 'report.png'}")
