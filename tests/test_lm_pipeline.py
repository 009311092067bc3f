"""Language-model pipeline on a tiny random Llama (built in the test, no download): downstream loss, training on
extracted activations, and `saekit reproduce --preset lm` end to end (extraction, sweep, estimate, report, dashboard)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from lm_fixtures import make_tiny_bert, make_tiny_llama  # noqa: E402
from saekit.config import parse_config  # noqa: E402
from saekit.io import read_cfg  # noqa: E402
from saekit.lm.downstream import loss_recovered, next_token_loss, spliced_losses  # noqa: E402
from saekit.lm.extract import extract_activations  # noqa: E402
from saekit.lm.models import load_model  # noqa: E402
from saekit.train.run import run_config  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama and a text file of Python's own help topics (about 30k tokens for its 512-token vocabulary)."""
    from pydoc_data.topics import topics

    root = tmp_path_factory.mktemp("tiny")
    text = root / "topics.txt"
    text.write_text("\n\n".join(topics[k] for k in sorted(topics))[:120_000])
    return {"model": make_tiny_llama(root / "llama"), "text": text, "root": root}


def test_loss_recovered_formula() -> None:
    # (CE_zero - CE_sae) / (CE_zero - CE_clean): clean 2.0, zero 5.0, sae 2.6 -> 2.4 / 3.0 = 0.8
    assert loss_recovered(2.0, 5.0, 2.6) == pytest.approx(0.8)
    assert loss_recovered(2.0, 5.0, 2.0) == 1.0 and loss_recovered(2.0, 5.0, 5.0) == 0.0
    assert math.isnan(loss_recovered(2.0, 2.0, 2.0))


def test_next_token_loss_with_identity_and_zero_splices(tiny: dict[str, Path]) -> None:
    lm = load_model(str(tiny["model"]))
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, lm.model.config.vocab_size, (3, 20), generator=g)
    kw = {"layer": 1, "site": "resid", "skip_positions": 1}
    clean = next_token_loss(lm, windows, **kw)
    # by hand: the model's logits at positions 1..18 predicting tokens 2..19
    with torch.no_grad():
        logits = lm.model(input_ids=windows).logits
    by_hand = torch.nn.functional.cross_entropy(logits[:, 1:-1].reshape(-1, logits.shape[-1]), windows[:, 2:].reshape(-1)).item()
    assert clean == pytest.approx(by_hand, rel=1e-5)
    assert next_token_loss(lm, windows, splice=lambda x: x, **kw) == pytest.approx(clean, rel=1e-5)
    zero = next_token_loss(lm, windows, splice=torch.zeros_like, **kw)

    def zero_after_first(module, args, output):  # by hand: block 1's output zeroed from position 1 on
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.clone()
        hidden[:, 1:] = 0
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = lm.layers()[1].register_forward_hook(zero_after_first)
    try:
        with torch.no_grad():
            zl = lm.model(input_ids=windows).logits
    finally:
        handle.remove()
    zero_by_hand = torch.nn.functional.cross_entropy(zl[:, 1:-1].reshape(-1, zl.shape[-1]), windows[:, 2:].reshape(-1)).item()
    assert zero == pytest.approx(zero_by_hand, rel=1e-5)
    assert abs(zero - clean) > 1e-5


def test_spliced_losses_give_the_cross_entropy_and_the_kl_to_the_clean_predictions(tiny: dict[str, Path]) -> None:
    lm = load_model(str(tiny["model"]))
    g = torch.Generator().manual_seed(1)
    windows = torch.randint(0, lm.model.config.vocab_size, (5, 16), generator=g)
    kw = {"layer": 1, "site": "resid", "skip_positions": 2, "batch_windows": 2}  # 3 batches, the last one short
    halve = lambda x: 0.5 * x  # noqa: E731
    (ce_same, kl_same), (ce_half, kl_half) = spliced_losses(lm, windows, [lambda x: x, halve], **kw)
    assert ce_same == pytest.approx(next_token_loss(lm, windows, **kw), rel=1e-5) and abs(kl_same) < 1e-6
    assert ce_half == pytest.approx(next_token_loss(lm, windows, splice=halve, **kw), rel=1e-5)
    # by hand: KL(P_clean || P_half) = sum_v p_clean (log p_clean - log p_half), mean over positions 2..14 of 5 windows

    def halve_from_2(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.clone()
        hidden[:, 2:] *= 0.5
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    with torch.no_grad():
        clean = torch.log_softmax(lm.model(input_ids=windows).logits[:, 2:-1].float(), dim=-1)
        handle = lm.layers()[1].register_forward_hook(halve_from_2)
        try:
            half = torch.log_softmax(lm.model(input_ids=windows).logits[:, 2:-1].float(), dim=-1)
        finally:
            handle.remove()
    by_hand = (clean.exp() * (clean - half)).sum(-1).mean().item()
    assert by_hand > 1e-4 and kl_half == pytest.approx(by_hand, rel=1e-4)


def test_training_on_extracted_activations_records_scale_and_downstream_loss(tiny: dict[str, Path]) -> None:
    acts = tiny["root"] / "acts-train"
    extract_activations(str(tiny["model"]), 2, "resid", str(tiny["text"]), tokens=8192, out=acts, window=32, progress=False)
    cfg = parse_config(
        {
            "source": {"kind": "activations", "path": str(acts), "buffer_size": 2048},
            "sae": {"dict_size": 64, "l1": [0.1, 1.0], "decoder_bias": True, "decoder_bias_init": "geometric_median"},
            "train": {"samples": 30_000, "batch_size": 256, "lr": 3e-3, "eval_samples": 4096, "ce_eval_tokens": 256},
        }
    )
    out = tiny["root"] / "sweep"
    results, errors = run_config(cfg, out, progress=False)
    assert errors == []
    source_info = json.loads((out / "source.json").read_text())
    assert source_info["kind"] == "activations" and source_info["input_scale"] > 0
    for row in results:
        assert row["status"] == "done"
        assert 0 < row["fvu"] < 1.0  # better than predicting the mean after 30k samples
        assert row["ce_clean"] < row["ce_zero"] or math.isnan(row["ce_loss_recovered"])
        assert math.isfinite(row["ce_sae"]) and row["ce_eval_tokens"] > 0
        assert row["input_scale"] == pytest.approx(source_info["input_scale"])
        assert read_cfg(row["checkpoint"])["input_scale"] == pytest.approx(source_info["input_scale"])
        assert row["eval_samples"] <= source_info["eval_rows"]  # never more than the held-out rows
    sparse, dense = sorted(results, key=lambda r: -r["l1"])[0], sorted(results, key=lambda r: r["l1"])[0]
    assert sparse["l0"] < dense["l0"]  # a larger L1 gives sparser codes


def test_non_causal_models_train_without_a_downstream_loss(tiny: dict[str, Path]) -> None:
    bert = make_tiny_bert(tiny["root"] / "bert")
    acts = tiny["root"] / "acts-bert"
    extract_activations(str(bert), 1, "mlp_out", str(tiny["text"]), tokens=4096, out=acts, window=32, progress=False)
    cfg = parse_config(
        {
            "source": {"kind": "activations", "path": str(acts), "skip_positions": 0},
            "sae": {"dict_size": 64, "l1": 0.3},
            "train": {"samples": 5_000, "batch_size": 256, "eval_samples": 1024},
        }
    )
    results, errors = run_config(cfg, tiny["root"] / "sweep-bert", progress=False)
    assert errors == [] and "ce_sae" not in results[0] and results[0]["status"] == "done"


def _saekit(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "saekit.cli", *args], capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})}
    )


@pytest.mark.slow
def test_reproduce_lm_end_to_end_on_a_tiny_model(tiny: dict[str, Path]) -> None:
    out = tiny["root"] / "reproduce"
    args = [
        "reproduce", "--preset", "lm", "--out", str(out), "--json", "--no-progress",
        "--set", f"lm.model={tiny['model']}", "--set", f"lm.text={tiny['text']}", "--set", "lm.tokens=8192",
        "--set", "lm.window=32", "--set", "sae.dict_size=[32,64]", "--set", "sae.l1=[0.3,3]",
        "--set", "train.samples=20000", "--set", "train.batch_size=256", "--set", "train.lr=3e-3",
        "--set", "train.ce_eval_tokens=256", "--set", "train.eval_samples=2048",
    ]  # fmt: skip
    done = _saekit(*args)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["activations"] >= 8192
    assert (out / "activations" / "manifest.json").is_file()
    assert Path(result["report"]).is_file() and Path(result["dashboard"]).is_file()
    runs = result["runs"]
    assert len(runs) == 2 * 2 + 2  # 2 sizes x 2 L1, and a second seed at the largest size
    assert all(r["status"] == "done" and math.isfinite(r["ce_sae"]) for r in runs)
    page = Path(result["report"]).read_text()
    # the report of a real-data sweep: the data sentence and the frontier section (a random model's zero ablation
    # need not hurt, so its loss-recovered fraction may be undefined and that column hidden)
    assert 'id="source-info"' in page and 'id="sparsity"' in page
    est = _saekit("estimate", str(out), "--json")
    assert est.returncode == 0, est.stderr
    assert {"n_features", "low", "high", "dict_size", "l1"} <= set(json.loads(est.stdout))
    # a second run reuses the activations (no shard rewritten) and the finished SAEs (their rows unchanged)
    written = {p.name: p.stat().st_mtime_ns for p in (out / "activations").iterdir()}
    again = _saekit(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "activations").iterdir()} == written
    seconds = {r["run_id"]: r["seconds"] for r in runs}
    assert {r["run_id"]: r["seconds"] for r in json.loads(again.stdout)["runs"]} == seconds


def test_reproduce_lm_refuses_unknown_lm_keys(tmp_path: Path) -> None:
    done = _saekit("reproduce", "--preset", "lm", "--out", str(tmp_path / "x"), "--set", "lm.colour=blue")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "lm.colour" in done.stderr
    assert not (tmp_path / "x").exists()
