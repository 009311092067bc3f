"""SAELens and dictionary_learning files: export, load, import, refusals; and (marker `interop`) the real sae-lens.

Expected codes and reconstructions come either from small cases worked out by hand in the comments, or from
the other library's formulas written out in `_dl_reference` (dictionary_learning's classes, as its
dictionary.py and trainers define them), or from the saekit SAE the file was exported from.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import saekit
from saekit.errors import InputError
from saekit.interop import detect_format, export_saelens, import_sae
from saekit.interop.saelens import saelens_metadata, saelens_tensors
from saekit.io import load_sae, save_checkpoint
from saekit.sae import ARCHITECTURES, ReluSAE

SRC = Path(__file__).resolve().parents[1] / "src"
ARCHS = ("relu", "topk", "batchtopk", "jumprelu", "gated", "matryoshka")
KNOBS = {
    "relu": {"l1": [0.1]},
    "topk": {"k": [3]},
    "batchtopk": {"k": [3]},
    "jumprelu": {"l0_coef": [0.01]},
    "gated": {"l1": [0.2]},
    "matryoshka": {"k": [3], "prefix_fractions": [0.3, 0.6, 1.0]},  # prefixes of 3, 6 and 10 latents
}
D, M = 6, 10
TOL = 1e-5


def _random_sae(arch: str, seed: int = 0, decoder_bias: bool = True):
    """A saekit SAE (K=1, d=6, m=10) with every parameter random (N(0, 0.25)), unit decoder rows, JumpReLU thresholds
    in [0.05, 0.3] and a BatchTopK (and Matryoshka) threshold of 0.2, so codes are neither all zero nor all active."""
    g = torch.Generator().manual_seed(seed)
    sae = ARCHITECTURES[arch](d=D, dict_size=M, seeds=[seed], decoder_bias=decoder_bias, **KNOBS[arch])
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        if arch == "jumprelu":
            sae.log_threshold.copy_(torch.empty(1, M).uniform_(0.05, 0.3, generator=g).log())
        if arch in ("batchtopk", "matryoshka"):
            sae.threshold.fill_(0.2)
        sae.normalize_decoder()
    return sae


def _run(folder: Path, sae, input_scale: float = 1.0, fire_counts: torch.Tensor | None = None) -> Path:
    stats = None if fire_counts is None else {"fire_counts": fire_counts, "eval_samples": torch.tensor(100)}
    save_checkpoint(folder, sae, samples=0, extra={"input_scale": input_scale, "run_id": folder.name}, latent_stats=stats)
    return folder


def _x(n: int = 64, d: int = D, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _codes_and_recon(sae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c = sae.encode(x)
    return c[0], sae.decode(c)[0]


# ---------------------------------------------------------------- export -> load round trips


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_export_then_load_matches_the_trained_sae_on_raw_activations(tmp_path: Path, arch: str, scale: float) -> None:
    # Expected: the saekit SAE saw x * scale, so on raw x the exported SAE's codes are its codes of x * scale and
    # its reconstruction is its reconstruction divided by scale.
    sae = _random_sae(arch)
    out = export_saelens(_run(tmp_path / "run", sae, scale), tmp_path / "sl")
    back = saekit.load(out)
    x = _x()
    c_want = sae.encode(x * scale)[0]
    c_got, r_got = _codes_and_recon(back, x)
    assert (c_want != 0).any() and (c_want == 0).any()  # the case exercises both sides of every nonlinearity
    torch.testing.assert_close(c_got, c_want, atol=TOL, rtol=0)
    torch.testing.assert_close(r_got, sae.decode(c_want[None])[0] / scale, atol=TOL, rtol=0)
    assert back.arch == arch  # batchtopk and matryoshka come back as themselves through metadata['saekit'], not as jumprelu
    assert back.init_kwargs()["seeds"] == sae.init_kwargs()["seeds"]
    if arch == "matryoshka":
        assert back.prefix_sizes == [3, 6, 10] and back.init_kwargs()["prefix_fractions"] == [0.3, 0.6, 1.0]


@pytest.mark.parametrize("arch", ARCHS)
def test_load_of_a_saekit_run_folds_its_input_scale(tmp_path: Path, arch: str) -> None:
    sae = _random_sae(arch, seed=3)
    back = saekit.load(_run(tmp_path / "run", sae, 4.0))
    x = _x()
    c_want = sae.encode(x * 4.0)[0]
    c_got, r_got = _codes_and_recon(back, x)
    torch.testing.assert_close(c_got, c_want, atol=TOL, rtol=0)
    torch.testing.assert_close(r_got, sae.decode(c_want[None])[0] / 4.0, atol=TOL, rtol=0)
    # decoder rows were unit norm; folded they have norm 1/4, so an arch with the option is rebuilt 'free'
    if "decoder_norm" in back.init_kwargs():
        assert back.init_kwargs()["decoder_norm"] == "free"
    torch.testing.assert_close(back.W_dec.norm(dim=2), torch.full((1, M), 0.25), atol=1e-6, rtol=0)


def test_load_of_an_unscaled_saekit_run_is_load_sae(tmp_path: Path) -> None:
    sae = _random_sae("relu")
    folder = _run(tmp_path / "run", sae)
    a, b = saekit.load(folder), load_sae(folder)
    assert a.init_kwargs() == b.init_kwargs()
    for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(ta, tb)


def test_exported_saelens_files_by_hand(tmp_path: Path) -> None:
    sae = _random_sae("relu", decoder_bias=False)
    counts = torch.zeros(M, dtype=torch.long)
    counts[:3] = torch.tensor([0, 10, 100])
    out = export_saelens(_run(tmp_path / "run", sae, 2.0, fire_counts=counts), tmp_path / "sl")
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "standard" and (cfg["d_in"], cfg["d_sae"]) == (D, M)
    assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none" and cfg["dtype"] == "float32"
    assert cfg["metadata"]["saekit"]["arch"] == "relu" and cfg["metadata"]["saekit"]["input_scale_folded"] == 2.0
    assert cfg["metadata"]["saekit"]["init_kwargs"] == sae.init_kwargs()  # as trained (unit decoder), not as folded
    assert cfg["metadata"]["sae_lens_version"] >= "6"  # read by SAELens as a 6.x config, not converted as a pre-6 one
    t = load_file(str(out / "sae_weights.safetensors"))
    assert set(t) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    # input_scale 2 folded: W_enc * 2, W_dec / 2; no decoder bias -> zeros; shapes (d, m), (m, d)
    torch.testing.assert_close(t["W_enc"], sae.W_enc[0].detach() * 2)
    torch.testing.assert_close(t["W_dec"], sae.W_dec[0].detach() / 2)
    assert torch.equal(t["b_dec"], torch.zeros(D)) and torch.equal(t["b_enc"], sae.b_enc[0].detach())
    # sparsity.safetensors: log10(count / 100 + 1e-10): 0 -> -10, 10 -> -1, 100 -> 0
    sparsity = load_file(str(out / "sparsity.safetensors"))["sparsity"]
    torch.testing.assert_close(sparsity[:3], torch.tensor([-10.0, -1.0, 0.0]), atol=1e-6, rtol=0)


def test_exported_architectures_and_their_keys(tmp_path: Path) -> None:
    names = {}
    for arch in ARCHS:
        theirs, tensors, extra = saelens_tensors(_random_sae(arch))
        names[arch] = (theirs, sorted(tensors), extra)
    assert names["relu"] == ("standard", ["W_dec", "W_enc", "b_dec", "b_enc"], {})
    assert names["topk"] == ("topk", ["W_dec", "W_enc", "b_dec", "b_enc"], {"k": 3, "rescale_acts_by_decoder_norm": False})
    assert names["jumprelu"] == ("jumprelu", ["W_dec", "W_enc", "b_dec", "b_enc", "threshold"], {})
    assert names["gated"] == ("gated", ["W_dec", "W_enc", "b_dec", "b_gate", "b_mag", "r_mag"], {})
    # batchtopk is written as SAELens writes its own for inference: a jumprelu with the batch threshold everywhere
    assert names["batchtopk"][:2] == ("jumprelu", ["W_dec", "W_enc", "b_dec", "b_enc", "threshold"])
    assert torch.equal(saelens_tensors(_random_sae("batchtopk"))[1]["threshold"], torch.full((M,), 0.2))
    unset = _random_sae("batchtopk")
    unset.threshold.fill_(-1.0)  # not yet set: every positive activation fires, as with threshold 0
    assert torch.equal(saelens_tensors(unset)[1]["threshold"], torch.zeros(M))
    # matryoshka likewise, with SAELens's metadata of a Matryoshka BatchTopK SAE saved for inference
    assert names["matryoshka"][:2] == ("jumprelu", ["W_dec", "W_enc", "b_dec", "b_enc", "threshold"])
    assert torch.equal(saelens_tensors(_random_sae("matryoshka"))[1]["threshold"], torch.full((M,), 0.2))
    assert saelens_metadata(_random_sae("matryoshka")) == {
        "training_architecture": "matryoshka_batchtopk",
        "training_architecture_details": {"k": 3, "rescale_acts_by_decoder_norm": False, "matryoshka_widths": [3, 6, 10]},
    }
    assert saelens_metadata(_random_sae("relu")) == {}


def test_a_saekit_architecture_saelens_lacks_is_refused(tmp_path: Path) -> None:
    class Other(ReluSAE):
        arch = "other"

    with pytest.raises(InputError, match="SAELens has no counterpart of saekit's 'other'"):
        saelens_tensors(Other(d=2, dict_size=3, seeds=[0], l1=[0.1]))


def test_export_refuses_to_clobber(tmp_path: Path) -> None:
    run = _run(tmp_path / "run", _random_sae("relu"))
    other = _run(tmp_path / "other", _random_sae("relu", seed=1))
    with pytest.raises(InputError, match="is the source folder itself"):
        export_saelens(run, run)
    with pytest.raises(InputError, match="not a SAELens SAE's"):
        export_saelens(run, other)  # would overwrite another run's cfg.json
    assert load_sae(other).init_kwargs()["seeds"] == [1]
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        export_saelens(run, tmp_path / "file")
    out = export_saelens(run, tmp_path / "sl")
    export_saelens(run, out)  # a SAELens folder may be rewritten
    with pytest.raises(InputError, match="not a saekit run folder"):
        export_saelens(out, tmp_path / "sl2")


def test_export_of_a_corrupt_run_is_refused(tmp_path: Path) -> None:
    run = _run(tmp_path / "run", _random_sae("relu"))
    data = bytearray((run / "sae.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (run / "sae.safetensors").write_bytes(bytes(data))
    with pytest.raises(InputError, match="checksum mismatch"):
        export_saelens(run, tmp_path / "sl")
    assert not (tmp_path / "sl").exists()


# ---------------------------------------------------------------- SAELens files written by hand


def _saelens_folder(folder: Path, cfg: dict, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps({"dtype": "float32", "metadata": {"sae_lens_version": "6.5.0"}, **cfg}))
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(folder / "sae_weights.safetensors"))
    return folder


EYE = torch.eye(2)


@pytest.mark.parametrize(
    ("apply_b_dec", "codes", "recon"),
    [
        # x = (2, 1), W_enc = W_dec = I, b_enc = (0, -0.5), b_dec = (1, 1).
        # b_dec not subtracted: pre = (2, 0.5) -> codes (2, 0.5), recon = codes + b_dec = (3, 1.5).
        (False, [2.0, 0.5], [3.0, 1.5]),
        # subtracted: pre = (2 - 1, 1 - 1 - 0.5) = (1, -0.5) -> codes (1, 0), recon (2, 1).
        (True, [1.0, 0.0], [2.0, 1.0]),
    ],
)
def test_saelens_standard_by_hand(tmp_path: Path, apply_b_dec: bool, codes: list, recon: list) -> None:
    folder = _saelens_folder(
        tmp_path / "sl",
        {"architecture": "standard", "d_in": 2, "d_sae": 2, "apply_b_dec_to_input": apply_b_dec, "normalize_activations": "none"},
        {"W_enc": EYE, "b_enc": torch.tensor([0.0, -0.5]), "W_dec": EYE, "b_dec": torch.tensor([1.0, 1.0])},
    )
    c, r = _codes_and_recon(saekit.load(folder), torch.tensor([[2.0, 1.0]]))
    torch.testing.assert_close(c, torch.tensor([codes]))
    torch.testing.assert_close(r, torch.tensor([recon]))


def test_saelens_gated_without_b_dec_on_input_by_hand(tmp_path: Path) -> None:
    # x = (1, 2), W_enc = W_dec = I, b_gate = (0, -1), r_mag = (ln 2, 0), b_mag = (0.5, 0), b_dec = (1, 0), b_dec not
    # subtracted: projection (1, 2); gate (1, 1) > 0 for both; magnitude (1*2 + 0.5, 2) = (2.5, 2) -> codes (2.5, 2);
    # recon = codes + b_dec = (3.5, 2).
    folder = _saelens_folder(
        tmp_path / "sl",
        {"architecture": "gated", "d_in": 2, "d_sae": 2, "apply_b_dec_to_input": False},
        {"W_enc": EYE, "b_gate": torch.tensor([0.0, -1.0]), "r_mag": torch.tensor([math.log(2), 0.0]),
         "b_mag": torch.tensor([0.5, 0.0]), "W_dec": EYE, "b_dec": torch.tensor([1.0, 0.0])},
    )  # fmt: skip
    c, r = _codes_and_recon(saekit.load(folder), torch.tensor([[1.0, 2.0]]))
    torch.testing.assert_close(c, torch.tensor([[2.5, 2.0]]))
    torch.testing.assert_close(r, torch.tensor([[3.5, 2.0]]))


def test_saelens_topk_rescaled_by_decoder_norm_by_hand(tmp_path: Path) -> None:
    # d=2, m=3, k=1, W_enc columns (1,0), (0,1), (1,1); W_dec rows (2,0), (0,1), (0,0.5) (norms 2, 1, 0.5); x = (1, 1).
    # pre = (1, 1, 2); SAELens ranks pre * norms = (2, 1, 1): latent 0 with value 2 -> codes (2, 0, 0); decodes
    # codes / norms = (1, 0, 0) through W_dec -> (2, 0). (Without the rescaling latent 2 would win.)
    folder = _saelens_folder(
        tmp_path / "sl",
        {"architecture": "topk", "d_in": 2, "d_sae": 3, "k": 1, "rescale_acts_by_decoder_norm": True},
        {"W_enc": torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]), "b_enc": torch.zeros(3),
         "W_dec": torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 0.5]]), "b_dec": torch.zeros(2)},
    )  # fmt: skip
    sae = saekit.load(folder)
    assert sae.arch == "topk" and sae.k_values == [1]
    c, r = _codes_and_recon(sae, torch.tensor([[1.0, 1.0]]))
    torch.testing.assert_close(c, torch.tensor([[2.0, 0.0, 0.0]]))
    torch.testing.assert_close(r, torch.tensor([[2.0, 0.0]]))


def test_saelens_pre_6_topk_config_by_hand(tmp_path: Path) -> None:
    # No architecture, no version: SAELens reads activation_fn 'topk' with activation_fn_kwargs.k as a TopK SAE.
    # Same W_enc as above, unit W_dec, x = (1, 1): pre = (1, 1, 2), top 1 = latent 2 -> codes (0, 0, 2).
    folder = tmp_path / "sl"
    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps({"d_in": 2, "d_sae": 3, "activation_fn": "topk", "activation_fn_kwargs": {"k": 1}}))
    save_file({"W_enc": torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]), "b_enc": torch.zeros(3),
               "W_dec": torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]), "b_dec": torch.zeros(2)},
              str(folder / "sae_weights.safetensors"))  # fmt: skip
    c, _ = _codes_and_recon(saekit.load(folder), torch.tensor([[1.0, 1.0]]))
    torch.testing.assert_close(c, torch.tensor([[0.0, 0.0, 2.0]]))


@pytest.mark.parametrize(
    ("name", "stored", "codes"),
    [
        # SAELens JumpReLU: ReLU(pre) * (pre > threshold); W_enc = I, b_enc = 0 so pre = x.
        # x rows (0.3, 0.3) and (-0.2, 0.7); thresholds (-1, 0.5): row 1 -> (0.3, 0), row 2 -> (0 (ReLU), 0.7).
        ("threshold", torch.tensor([-1.0, 0.5]), [[0.3, 0.0], [0.0, 0.7]]),
        # older files store log_threshold: thresholds (0.5, 0.1) -> row 1 (0, 0.3), row 2 (0, 0.7).
        ("log_threshold", torch.tensor([0.5, 0.1]).log(), [[0.0, 0.3], [0.0, 0.7]]),
    ],
)
def test_saelens_jumprelu_by_hand(tmp_path: Path, name: str, stored: torch.Tensor, codes: list) -> None:
    folder = _saelens_folder(
        tmp_path / "sl",
        {"architecture": "jumprelu", "d_in": 2, "d_sae": 2},
        {"W_enc": EYE, "b_enc": torch.zeros(2), "W_dec": EYE, "b_dec": torch.zeros(2), name: stored},
    )
    c, _ = _codes_and_recon(saekit.load(folder), torch.tensor([[0.3, 0.3], [-0.2, 0.7]]))
    torch.testing.assert_close(c, torch.tensor(codes))


def test_saelens_batchtopk_training_checkpoint_by_hand(tmp_path: Path) -> None:
    # A BatchTopK training checkpoint (topk_threshold 0.5): inference codes ReLU(pre) * (pre > 0.5); x = (0.3, 0.8)
    # with W_enc = I -> (0, 0.8).
    folder = _saelens_folder(
        tmp_path / "sl",
        {"architecture": "batchtopk", "d_in": 2, "d_sae": 2, "k": 1, "rescale_acts_by_decoder_norm": False},
        {
            "W_enc": EYE,
            "b_enc": torch.zeros(2),
            "W_dec": EYE,
            "b_dec": torch.zeros(2),
            "topk_threshold": torch.tensor(0.5, dtype=torch.float64),
        },
    )
    sae = saekit.load(folder)
    assert sae.arch == "batchtopk" and sae.k_values == [1]
    c, _ = _codes_and_recon(sae, torch.tensor([[0.3, 0.8]]))
    torch.testing.assert_close(c, torch.tensor([[0.0, 0.8]]))


def test_saelens_matryoshka_training_checkpoint_by_hand(tmp_path: Path) -> None:
    # A Matryoshka BatchTopK training checkpoint: widths [1, 2] (SAELens appends d_sae = 4), k 1, topk_threshold 0.5,
    # rescale_acts_by_decoder_norm with decoder rows of norm 2: W_enc = W_dec / 2 = I (rows (2, 0), (0, 2), ... of W_dec),
    # so SAELens's codes are ReLU(pre) * 2 = ReLU(x W_enc) * 2 kept above 0.5. x = (0.2, 0.6): pre (0.2, 0.6, 0, 0) ->
    # rescaled (0.4, 1.2, 0, 0) -> codes (0, 1.2, 0, 0); decoded as codes / 2 through W_dec: 0.6 * (0, 2) = (0, 1.2).
    w_dec = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]])
    folder = _saelens_folder(
        tmp_path / "sl",
        {"architecture": "matryoshka_batchtopk", "d_in": 2, "d_sae": 4, "k": 1.0, "matryoshka_widths": [1, 2],
         "rescale_acts_by_decoder_norm": True},
        {"W_enc": torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]), "b_enc": torch.zeros(4), "W_dec": w_dec,
         "b_dec": torch.zeros(2), "topk_threshold": torch.tensor(0.5, dtype=torch.float64)},
    )  # fmt: skip
    sae = saekit.load(folder)
    assert sae.arch == "matryoshka" and sae.k_values == [1] and sae.prefix_sizes == [1, 2, 4]
    c, r = _codes_and_recon(sae, torch.tensor([[0.2, 0.6]]))
    torch.testing.assert_close(c, torch.tensor([[0.0, 1.2, 0.0, 0.0]]))
    torch.testing.assert_close(r, torch.tensor([[0.0, 1.2]]))


def test_saelens_scaling_factor_from_a_training_checkpoint_by_hand(tmp_path: Path) -> None:
    # normalize_activations expected_average_only_in with scaling factor 2: the weights act on 2x. W_enc = W_dec = I,
    # b_enc = (0, -1); raw x = (1, 1) -> 2x = (2, 2) -> pre (2, 1) -> codes (2, 1); recon in scaled units (2, 1),
    # raw = (1, 0.5).
    cfg = {"architecture": "standard", "d_in": 2, "d_sae": 2, "normalize_activations": "expected_average_only_in"}
    tensors = {"W_enc": EYE, "b_enc": torch.tensor([0.0, -1.0]), "W_dec": EYE, "b_dec": torch.zeros(2)}
    folder = _saelens_folder(tmp_path / "sl", cfg, tensors)
    with pytest.raises(InputError, match="holds no scaling factor"):
        saekit.load(folder)
    (folder / "activation_scaler.json").write_text(json.dumps({"scaling_factor": 2.0, "has_whitening": False}))
    c, r = _codes_and_recon(saekit.load(folder), torch.tensor([[1.0, 1.0]]))
    torch.testing.assert_close(c, torch.tensor([[2.0, 1.0]]))
    torch.testing.assert_close(r, torch.tensor([[1.0, 0.5]]))


GOOD_STANDARD = {"architecture": "standard", "d_in": 2, "d_sae": 2}


@pytest.mark.parametrize(
    ("cfg", "tensors", "message"),
    [
        ({**GOOD_STANDARD, "architecture": "transcoder"}, {}, "SAELens architecture 'transcoder' has no saekit counterpart"),
        ({**GOOD_STANDARD, "architecture": "abstopk"}, {}, "'abstopk' has no saekit counterpart"),
        (
            {**GOOD_STANDARD, "architecture": "matryoshka_batchtopk", "k": 1, "matryoshka_widths": [2, 1]},
            {},
            r"matryoshka_widths must be increasing integers in 1..d_sae \(2\), got \[2, 1\]",
        ),
        ({**GOOD_STANDARD, "architecture": "matryoshka_batchtopk", "k": 1, "matryoshka_widths": [0.5]}, {}, "matryoshka_widths must be"),
        ({**GOOD_STANDARD, "architecture": "matryoshka_batchtopk", "k": 1}, {}, "matryoshka_widths must be"),
        ({**GOOD_STANDARD, "normalize_activations": "layer_norm"}, {}, "normalize_activations 'layer_norm' has no saekit counterpart"),
        ({**GOOD_STANDARD, "d_in": "2"}, {}, "d_in must be a positive integer"),
        ({**GOOD_STANDARD, "d_in": 3}, {}, r"W_enc has shape \(2, 2\), cfg.json says \(3, 2\)"),
        ({**GOOD_STANDARD, "architecture": "topk", "k": 5}, {}, r"k must be an integer in 1..d_sae \(2\)"),
        (GOOD_STANDARD, {"b_enc": None}, "missing tensor 'b_enc'"),
        (GOOD_STANDARD, {"extra": torch.zeros(2)}, "unexpected tensor 'extra'"),
        (GOOD_STANDARD, {"W_dec": torch.zeros(3, 2)}, r"W_dec has shape \(3, 2\), expected \(2, 2\)"),
        (GOOD_STANDARD, {"b_enc": torch.tensor([0.0, float("nan")])}, "b_enc holds NaN or infinite values"),
        (GOOD_STANDARD, {"scaling_factor": torch.tensor([1.0, 2.0])}, "fine-tuning scaling_factor other than ones"),
    ],
)
def test_bad_saelens_folders_are_refused_in_one_line(tmp_path: Path, cfg: dict, tensors: dict, message: str) -> None:
    base = {"W_enc": EYE, "b_enc": torch.zeros(2), "W_dec": EYE, "b_dec": torch.zeros(2)}
    for k, v in tensors.items():
        base.pop(k) if v is None else base.__setitem__(k, v)
    folder = _saelens_folder(tmp_path / "sl", cfg, base)
    with pytest.raises(InputError, match=message) as err:
        saekit.load(folder)
    assert "\n" not in str(err.value)


def test_unit_scaling_factor_is_ignored(tmp_path: Path) -> None:
    base = {"W_enc": EYE, "b_enc": torch.zeros(2), "W_dec": EYE, "b_dec": torch.zeros(2), "scaling_factor": torch.ones(2)}
    c, _ = _codes_and_recon(saekit.load(_saelens_folder(tmp_path / "sl", GOOD_STANDARD, base)), torch.tensor([[1.0, -1.0]]))
    torch.testing.assert_close(c, torch.tensor([[1.0, 0.0]]))  # ReLU of x through the identity


def test_corrupt_saelens_files_are_refused(tmp_path: Path) -> None:
    base = {"W_enc": EYE, "b_enc": torch.zeros(2), "W_dec": EYE, "b_dec": torch.zeros(2)}
    folder = _saelens_folder(tmp_path / "sl", GOOD_STANDARD, base)
    weights = folder / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])
    with pytest.raises(InputError, match="unreadable safetensors file"):
        saekit.load(folder)
    (folder / "cfg.json").write_text("{not json")
    with pytest.raises(InputError, match="malformed JSON"):
        saekit.load(folder)
    (folder / "cfg.json").unlink()
    with pytest.raises(InputError, match="cfg.json is missing"):
        saekit.load(folder)


# ---------------------------------------------------------------- dictionary_learning files


def _dl_folder(folder: Path, dict_class: str, state: dict[str, torch.Tensor], trainer: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    torch.save(state, folder / "ae.pt")
    (folder / "config.json").write_text(json.dumps({"trainer": {"dict_class": dict_class, **(trainer or {})}, "buffer": {}}))
    return folder


def _dl_state(dict_class: str, d: int, m: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the state-dict names dictionary_learning's class uses (nn.Linear weights are (out, in))."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.5

    linear = {"encoder.weight": r(m, d), "encoder.bias": r(m), "decoder.weight": r(d, m)}
    return {
        "AutoEncoder": lambda: {**linear, "bias": r(d)},
        "AutoEncoderNew": lambda: {**linear, "decoder.bias": r(d)},
        "GatedAutoEncoder": lambda: {
            "encoder.weight": r(m, d),
            "gate_bias": r(m),
            "mag_bias": r(m),
            "r_mag": r(m),
            "decoder.weight": r(d, m),
            "decoder_bias": r(d),
        },  # fmt: skip
        "JumpReluAutoEncoder": lambda: {
            "W_enc": r(d, m),
            "b_enc": r(m),
            "W_dec": r(m, d),
            "b_dec": r(d),
            "threshold": torch.rand(m, generator=g) * 0.3,
        },  # fmt: skip
        "AutoEncoderTopK": lambda: {**linear, "b_dec": r(d), "k": torch.tensor(2, dtype=torch.int), "threshold": torch.tensor(0.1)},
        "BatchTopKSAE": lambda: {**linear, "b_dec": r(d), "k": torch.tensor(2, dtype=torch.int), "threshold": torch.tensor(0.2)},
        "MatryoshkaBatchTopKSAE": lambda: {
            "W_enc": r(d, m),
            "b_enc": r(m),
            "W_dec": r(m, d),
            "b_dec": r(d),
            "k": torch.tensor(2, dtype=torch.int),
            "threshold": torch.tensor(0.2),
            "group_sizes": torch.tensor([m // 3, m // 3, m - 2 * (m // 3)]),  # m = 7: groups 2, 2, 3
        },  # fmt: skip
    }[dict_class]()


def _dl_reference(dict_class: str, s: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dictionary_learning's encode and decode of each class, written out from its source (x: (B, d))."""
    relu = torch.relu
    if dict_class == "AutoEncoder":
        c = relu((x - s["bias"]) @ s["encoder.weight"].T + s["encoder.bias"])
        return c, c @ s["decoder.weight"].T + s["bias"]
    if dict_class == "AutoEncoderNew":
        c = relu(x @ s["encoder.weight"].T + s["encoder.bias"])
        return c, c @ s["decoder.weight"].T + s["decoder.bias"]
    if dict_class == "GatedAutoEncoder":
        enc = (x - s["decoder_bias"]) @ s["encoder.weight"].T
        c = (enc + s["gate_bias"] > 0).float() * relu(s["r_mag"].exp() * enc + s["mag_bias"])
        return c, c @ s["decoder.weight"].T + s["decoder_bias"]
    if dict_class == "MatryoshkaBatchTopKSAE":  # encode's default: use_threshold=True, every group active
        acts = relu((x - s["b_dec"]) @ s["W_enc"] + s["b_enc"])
        c = acts * (acts > s["threshold"])
        return c, c @ s["W_dec"] + s["b_dec"]
    if dict_class == "JumpReluAutoEncoder":  # apply_b_dec_to_input is False in the class
        pre = x @ s["W_enc"] + s["b_enc"]
        c = relu(pre * (pre > s["threshold"]))
        return c, c @ s["W_dec"] + s["b_dec"]
    acts = relu((x - s["b_dec"]) @ s["encoder.weight"].T + s["encoder.bias"])
    if dict_class == "AutoEncoderTopK":  # encode's default: use_threshold=False
        top = acts.topk(int(s["k"]), dim=-1)
        c = torch.zeros_like(acts).scatter(-1, top.indices, top.values)
    else:  # BatchTopKSAE, encode's default: use_threshold=True
        c = acts * (acts > s["threshold"])
    return c, c @ s["decoder.weight"].T + s["b_dec"]


DL_CLASSES = {
    "AutoEncoder": "relu",
    "AutoEncoderNew": "relu",
    "GatedAutoEncoder": "gated",
    "JumpReluAutoEncoder": "jumprelu",
    "AutoEncoderTopK": "topk",
    "BatchTopKSAE": "batchtopk",
    "MatryoshkaBatchTopKSAE": "matryoshka",
}


@pytest.mark.parametrize("dict_class", list(DL_CLASSES))
def test_dictionary_learning_classes_by_name(tmp_path: Path, dict_class: str) -> None:
    d, m = 5, 7  # not square, so a missed transpose fails
    state = _dl_state(dict_class, d, m)
    folder = _dl_folder(tmp_path / "dl", dict_class, state, {"activation_dim": d, "dict_size": m})
    sae = saekit.load(folder)
    assert sae.arch == DL_CLASSES[dict_class] and (sae.d, sae.dict_size) == (d, m)
    x = _x(128, d, seed=2) * 2
    c_want, r_want = _dl_reference(dict_class, state, x)
    assert (c_want != 0).any() and (c_want == 0).any()
    c_got, r_got = _codes_and_recon(sae, x)
    torch.testing.assert_close(c_got, c_want, atol=TOL, rtol=0)
    torch.testing.assert_close(r_got, r_want, atol=TOL, rtol=0)


def test_dictionary_learning_batchtopk_unset_threshold(tmp_path: Path) -> None:
    # threshold -1 (never set in training): ReLU(pre) * (ReLU(pre) > -1) = ReLU(pre), every positive activation fires
    state = {**_dl_state("BatchTopKSAE", 4, 6), "threshold": torch.tensor(-1.0)}
    sae = saekit.load(_dl_folder(tmp_path / "dl", "BatchTopKSAE", state))
    x = _x(32, 4)
    c_want = torch.relu((x - state["b_dec"]) @ state["encoder.weight"].T + state["encoder.bias"])
    torch.testing.assert_close(_codes_and_recon(sae, x)[0], c_want, atol=TOL, rtol=0)


def test_dictionary_learning_autoencodernew_by_hand(tmp_path: Path) -> None:
    # c = ReLU(enc(x)), x_hat = dec(c) + decoder.bias; enc = dec = I, encoder.bias (0, -0.5), decoder.bias (1, 1), x = (2, 1):
    # codes (2, 0.5), recon (3, 1.5). (saekit subtracts b_dec first, so the bias moves into b_enc.)
    state = {"encoder.weight": EYE, "encoder.bias": torch.tensor([0.0, -0.5]), "decoder.weight": EYE, "decoder.bias": torch.ones(2)}
    sae = saekit.load(_dl_folder(tmp_path / "dl", "AutoEncoderNew", state))
    c, r = _codes_and_recon(sae, torch.tensor([[2.0, 1.0]]))
    torch.testing.assert_close(c, torch.tensor([[2.0, 0.5]]))
    torch.testing.assert_close(r, torch.tensor([[3.0, 1.5]]))
    # enc(x) + b = enc(x - b_dec) + (b + enc(b_dec)): b_enc = (0, -0.5) + (1, 1) I = (1, 0.5)
    torch.testing.assert_close(sae.b_enc[0].detach(), torch.tensor([1.0, 0.5]))


class _Payload:
    """Unpickling this runs exec, which writes `target` (the marker of code having run)."""

    target = ""

    def __reduce__(self):
        return (exec, (f"open({self.target!r}, 'w').write('ran')",))


def test_a_pickle_payload_in_ae_pt_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    _Payload.target = str(marker)
    state = {**_dl_state("AutoEncoder", 2, 3), "bias": _Payload()}
    folder = _dl_folder(tmp_path / "dl", "AutoEncoder", state)
    # the payload is live: a full unpickle runs it (this is what saekit must never do)
    torch.load(folder / "ae.pt", weights_only=False)
    assert marker.read_text() == "ran"
    marker.unlink()
    with pytest.raises(InputError, match="refused, not a plain state dict") as err:
        saekit.load(folder)
    assert "\n" not in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda f: (f / "ae.pt").write_bytes(b"garbage, not a torch file"), "unreadable torch file"),
        (lambda f: torch.save([torch.zeros(2)], f / "ae.pt"), "expected a state dict of name -> tensor"),
        (lambda f: torch.save({"bias": 3}, f / "ae.pt"), "expected a state dict of name -> tensor"),
        (lambda f: (f / "config.json").unlink(), "config.json is missing"),
        (lambda f: (f / "config.json").write_text("[1, 2"), "malformed JSON"),
        (lambda f: (f / "config.json").write_text('{"buffer": {}}'), "with a 'trainer' object"),
        (lambda f: (f / "config.json").write_text('{"trainer": {"dict_class": "CrossCoder"}}'),
         "class 'CrossCoder' has no saekit counterpart"),
        (lambda f: (f / "config.json").write_text('{"trainer": {"dict_class": "AutoEncoder", "dict_size": 4}}'),
         "config.json says 4"),
        (lambda f: torch.save({k: v for k, v in _dl_state("AutoEncoder", 2, 3).items() if k != "bias"}, f / "ae.pt"), "missing 'bias'"),
        (lambda f: torch.save({**_dl_state("AutoEncoder", 2, 3), "ghost": torch.zeros(1)}, f / "ae.pt"), "unexpected tensor 'ghost'"),
        (lambda f: torch.save({**_dl_state("AutoEncoder", 2, 3), "bias": torch.zeros(5)}, f / "ae.pt"), r"b_dec has shape \(5,\)"),
    ],
)  # fmt: skip
def test_bad_dictionary_learning_folders_are_refused_in_one_line(tmp_path: Path, edit, message: str) -> None:
    folder = _dl_folder(tmp_path / "dl", "AutoEncoder", _dl_state("AutoEncoder", 2, 3))
    edit(folder)
    with pytest.raises(InputError, match=message) as err:
        saekit.load(folder)
    assert "\n" not in str(err.value)


def test_dictionary_learning_matryoshka_groups(tmp_path: Path) -> None:
    # group sizes 2, 2, 3 of 7 latents: prefixes of 2, 4 and 7 (fractions 2/7, 4/7, 1)
    state = _dl_state("MatryoshkaBatchTopKSAE", 5, 7)
    sae = saekit.load(_dl_folder(tmp_path / "ok", "MatryoshkaBatchTopKSAE", state, {"group_sizes": [2, 2, 3], "k": 2}))
    assert sae.prefix_sizes == [2, 4, 7] and sae.k_values == [2]
    for name, groups, trainer, message in (
        ("sum", torch.tensor([2, 2, 2]), {}, r"group_sizes \[2, 2, 2\] sum to 6, not dict_size 7"),
        ("zero", torch.tensor([0, 7]), {}, "group_sizes must be positive integers"),
        ("float", torch.tensor([2.0, 5.0]), {}, "group_sizes must be positive integers"),
        ("config", torch.tensor([2, 2, 3]), {"group_sizes": [3, 4]}, r"but config.json says \[3, 4\]"),
    ):
        folder = _dl_folder(tmp_path / name, "MatryoshkaBatchTopKSAE", {**state, "group_sizes": groups}, trainer)
        with pytest.raises(InputError, match=message) as err:
            saekit.load(folder)
        assert "\n" not in str(err.value)


def test_dictionary_learning_k_must_agree(tmp_path: Path) -> None:
    folder = _dl_folder(tmp_path / "dl", "AutoEncoderTopK", _dl_state("AutoEncoderTopK", 3, 4), {"k": 3})
    with pytest.raises(InputError, match="k = 2 but config.json says 3"):
        saekit.load(folder)


# ---------------------------------------------------------------- detection, import, CLI


def test_detect_format(tmp_path: Path) -> None:
    run = _run(tmp_path / "out" / "runs" / "r1", _random_sae("relu"))
    assert detect_format(run) == ("saekit", run)
    assert detect_format(run / "sae.safetensors") == ("saekit", run)
    sl = export_saelens(run, tmp_path / "sl")
    assert detect_format(sl / "cfg.json") == ("saelens", sl)
    dl = _dl_folder(tmp_path / "dl", "AutoEncoder", _dl_state("AutoEncoder", 2, 3))
    assert detect_format(dl / "ae.pt") == ("dictionary_learning", dl)
    with pytest.raises(InputError, match="a saekit output folder; pass one run's folder"):
        detect_format(tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no SAE found"):
        detect_format(tmp_path / "empty")
    with pytest.raises(InputError, match="no such file or folder"):
        detect_format(tmp_path / "nowhere")
    sparsify = tmp_path / "sparsify"
    sparsify.mkdir()
    (sparsify / "cfg.json").write_text(json.dumps({"expansion_factor": 32, "k": 32, "d_in": 2}))
    save_file({"encoder.weight": torch.zeros(2, 2)}, str(sparsify / "sae.safetensors"))
    with pytest.raises(InputError, match="a sparsify SAE"):
        detect_format(sparsify)


def test_import_writes_a_saekit_checkpoint(tmp_path: Path) -> None:
    state = _dl_state("GatedAutoEncoder", 4, 6)
    folder = _dl_folder(tmp_path / "dl", "GatedAutoEncoder", state, {"lm_name": "pythia", "layer": 3})
    summary = import_sae(folder, tmp_path / "out" / "runs" / "gated")
    assert (summary["arch"], summary["d"], summary["dict_size"]) == ("gated", 4, 6)
    sae = load_sae(tmp_path / "out" / "runs" / "gated")  # saekit's own loader, checksums and all
    x = _x(16, 4)
    c_want, r_want = _dl_reference("GatedAutoEncoder", state, x)
    torch.testing.assert_close(_codes_and_recon(sae, x)[0], c_want, atol=TOL, rtol=0)
    torch.testing.assert_close(_codes_and_recon(sae, x)[1], r_want, atol=TOL, rtol=0)
    cfg = json.loads((tmp_path / "out" / "runs" / "gated" / "cfg.json").read_text())
    assert cfg["input_scale"] == 1.0 and cfg["imported"]["format"] == "dictionary_learning"
    assert cfg["imported"]["dict_class"] == "GatedAutoEncoder" and cfg["imported"]["lm_name"] == "pythia"
    import_sae(folder, tmp_path / "out" / "runs" / "gated")  # an earlier import may be replaced
    trained = _run(tmp_path / "trained", _random_sae("relu"))
    with pytest.raises(InputError, match="holds a saekit checkpoint that was not imported"):
        import_sae(folder, trained)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "saekit.cli", *args], capture_output=True, text=True, env=env, timeout=300)


def test_cli_export_and_import(tmp_path: Path) -> None:
    sae = _random_sae("topk")
    run = _run(tmp_path / "run", sae, 3.0)
    r = _cli("export", str(run), "--format", "saelens", str(tmp_path / "sl"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(tmp_path / "sl")
    r = _cli("import", str(tmp_path / "sl"), "--out", str(tmp_path / "imported"), "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert (summary["arch"], summary["k"], summary["source"]["format"]) == ("topk", [3], "saelens")
    x = _x()
    c_want = sae.encode(x * 3.0)[0]
    torch.testing.assert_close(_codes_and_recon(load_sae(tmp_path / "imported"), x)[0], c_want, atol=TOL, rtol=0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["export", "{run}", "--format", "sparsify", "{tmp}/x"], "--format must be one of saelens, got 'sparsify'"),
        (["export", "{tmp}/nowhere", "--format", "saelens", "{tmp}/x"], "no such file or folder"),
        (["import", "{tmp}/empty", "--out", "{tmp}/x"], "no SAE found"),
    ],
)
def test_cli_bad_input_exits_2_in_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    run = _run(tmp_path / "run", _random_sae("relu"))
    (tmp_path / "empty").mkdir()
    r = _cli(*[a.format(run=run, tmp=tmp_path) for a in args])
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and message in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------- against the real sae-lens (marker: interop)


@pytest.fixture
def sae_lens():
    return pytest.importorskip("sae_lens")


@pytest.mark.interop
@pytest.mark.parametrize("arch", ARCHS)
def test_saelens_loads_what_saekit_exports(tmp_path: Path, sae_lens, arch: str) -> None:
    sae = _random_sae(arch, seed=5)
    out = export_saelens(_run(tmp_path / "run", sae, 2.5), tmp_path / "sl")
    theirs = sae_lens.SAE.load_from_disk(str(out))
    expected_class = {
        "relu": "StandardSAE",
        "topk": "TopKSAE",
        "batchtopk": "JumpReLUSAE",
        "jumprelu": "JumpReLUSAE",
        "gated": "GatedSAE",
        "matryoshka": "JumpReLUSAE",
    }
    assert type(theirs).__name__ == expected_class[arch]
    x = _x(128)
    c_want = sae.encode(x * 2.5)[0]
    with torch.no_grad():
        c_theirs = theirs.encode(x)
        r_theirs = theirs.decode(c_theirs)
    torch.testing.assert_close(c_theirs, c_want, atol=TOL, rtol=0)
    torch.testing.assert_close(r_theirs, sae.decode(c_want[None])[0] / 2.5, atol=TOL, rtol=0)


def _randomise(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            if name == "threshold":
                p.copy_(torch.rand(p.shape, generator=g) * 0.3)


@pytest.mark.interop
@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu", "gated"])
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_saekit_loads_what_saelens_saves(tmp_path: Path, sae_lens, architecture: str, apply_b_dec: bool) -> None:
    from sae_lens.registry import get_sae_class

    cls, cfg_cls = get_sae_class(architecture)
    extra = {"k": 3} if architecture == "topk" else {}
    theirs = cls(cfg_cls(d_in=D, d_sae=M, apply_b_dec_to_input=apply_b_dec, **extra))
    _randomise(theirs, seed=7)
    theirs.save_model(str(tmp_path / "sl"))
    ours = saekit.load(tmp_path / "sl")
    x = _x(128)
    with torch.no_grad():
        c_want = theirs.encode(x)
        r_want = theirs.decode(c_want)
    assert (c_want != 0).any() and (c_want == 0).any()
    c_got, r_got = _codes_and_recon(ours, x)
    torch.testing.assert_close(c_got, c_want, atol=TOL, rtol=0)
    torch.testing.assert_close(r_got, r_want, atol=TOL, rtol=0)


@pytest.mark.interop
def test_saekit_loads_saelens_training_topk_and_batchtopk(tmp_path: Path, sae_lens) -> None:
    # TopK trained with rescale_acts_by_decoder_norm (SAELens's training default), decoder rows of random norm,
    # saved both as a training checkpoint and as an inference model; BatchTopK likewise (inference: a JumpReLU).
    topk = sae_lens.TopKTrainingSAE(sae_lens.TopKTrainingSAEConfig(d_in=D, d_sae=M, k=3))
    _randomise(topk, seed=8)
    x = _x(128)
    with torch.no_grad():
        c_want = topk.encode(x)
        r_want = topk.decode(c_want)
    for name, save in (("train", topk.save_model), ("inference", topk.save_inference_model)):
        save(str(tmp_path / f"topk_{name}"))
        c_got, r_got = _codes_and_recon(saekit.load(tmp_path / f"topk_{name}"), x)
        # codes of the training SAE are pre * ||W_dec_j|| (rescaled); what the folded SAE produces too
        torch.testing.assert_close(c_got, c_want, atol=TOL, rtol=0)
        torch.testing.assert_close(r_got, r_want, atol=TOL, rtol=0)

    batch = sae_lens.BatchTopKTrainingSAE(sae_lens.BatchTopKTrainingSAEConfig(d_in=D, d_sae=M, k=3))
    _randomise(batch, seed=9)
    batch.topk_threshold = torch.tensor(0.4, dtype=torch.float64)
    batch.save_inference_model(str(tmp_path / "btk_inference"))
    batch.save_model(str(tmp_path / "btk_train"))
    inference = sae_lens.SAE.load_from_disk(str(tmp_path / "btk_inference"))
    with torch.no_grad():
        c_want = inference.encode(x)
        r_want = inference.decode(c_want)
    assert (c_want != 0).any() and (c_want == 0).any()
    for name in ("btk_inference", "btk_train"):
        ours = saekit.load(tmp_path / name)
        assert ours.arch == ("jumprelu" if name == "btk_inference" else "batchtopk")
        c_got, r_got = _codes_and_recon(ours, x)
        torch.testing.assert_close(c_got, c_want, atol=TOL, rtol=0)
        torch.testing.assert_close(r_got, r_want, atol=TOL, rtol=0)


def _saelens_matryoshka(sae_lens, seed: int, **cfg):
    """SAELens's Matryoshka BatchTopK training SAE (d=6, m=10, widths 3, 6, 10, k=3), every parameter random."""
    theirs = sae_lens.MatryoshkaBatchTopKTrainingSAE(
        sae_lens.MatryoshkaBatchTopKTrainingSAEConfig(d_in=D, d_sae=M, k=3, matryoshka_widths=[3, 6, 10], **cfg)
    )
    _randomise(theirs, seed=seed)
    return theirs


@pytest.mark.interop
def test_saekit_loads_saelens_matryoshka(tmp_path: Path, sae_lens) -> None:
    # Trained with rescale_acts_by_decoder_norm (SAELens's default), decoder rows of random norm; saved as a training
    # checkpoint (architecture matryoshka_batchtopk, read as saekit matryoshka) and for inference (a JumpReLU).
    theirs = _saelens_matryoshka(sae_lens, seed=10)
    theirs.topk_threshold = torch.tensor(0.4, dtype=torch.float64)
    theirs.save_model(str(tmp_path / "train"))
    theirs.save_inference_model(str(tmp_path / "inference"))
    inference = sae_lens.SAE.load_from_disk(str(tmp_path / "inference"))
    assert inference.cfg.metadata.training_architecture == "matryoshka_batchtopk"
    x = _x(128)
    with torch.no_grad():
        c_want = inference.encode(x)
        r_want = inference.decode(c_want)
    assert (c_want != 0).any() and (c_want == 0).any()
    for name, arch in (("train", "matryoshka"), ("inference", "jumprelu")):
        ours = saekit.load(tmp_path / name)
        assert ours.arch == arch
        c_got, r_got = _codes_and_recon(ours, x)
        torch.testing.assert_close(c_got, c_want, atol=TOL, rtol=0)
        torch.testing.assert_close(r_got, r_want, atol=TOL, rtol=0)
    ours = saekit.load(tmp_path / "train")
    assert ours.prefix_sizes == [3, 6, 10] and ours.k_values == [3]


@pytest.mark.interop
def test_prefix_losses_are_saelens_training_losses(tmp_path: Path, sae_lens) -> None:
    """On one batch, SAELens's training forward pass and saekit's training loss agree: SAELens's inner_mse_loss_w
    (summed over d, mean over the batch) is d times saekit's prefix loss (mean over both), its mse_loss d times the
    last prefix's, and its loss (mse_loss plus every inner loss, no dead latent) d times saekit's summed reconstruction."""
    from sae_lens.saes.sae import TrainStepInput

    theirs = _saelens_matryoshka(sae_lens, seed=11, rescale_acts_by_decoder_norm=False)
    theirs.save_model(str(tmp_path / "sl"))
    ours = saekit.load(tmp_path / "sl")
    x = _x(64)
    step = TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=None, n_training_steps=0, is_logging_step=False)
    with torch.no_grad():
        out = theirs.training_forward_pass(step)
        terms = ours.training_loss(x)
    prefix = terms["prefix_losses"][0] * D
    torch.testing.assert_close(out.losses["inner_mse_loss_3"], prefix[0], atol=TOL, rtol=1e-5)
    torch.testing.assert_close(out.losses["inner_mse_loss_6"], prefix[1], atol=TOL, rtol=1e-5)
    torch.testing.assert_close(out.losses["mse_loss"], prefix[2], atol=TOL, rtol=1e-5)
    torch.testing.assert_close(out.loss, terms["reconstruction"][0] * D, atol=TOL, rtol=1e-5)
    torch.testing.assert_close(out.feature_acts, terms["codes"][0], atol=TOL, rtol=0)  # the same k*B latents


@pytest.mark.interop
def test_saekit_loads_dictionary_learning_matryoshka(tmp_path: Path) -> None:
    """Against dictionary_learning's own MatryoshkaBatchTopKSAE and trainer, where the package imports (it is not
    a saekit dependency): saekit reads its ae.pt + config.json with the same codes and reconstructions, and its
    l2_loss (each group's error summed over d, mean over the batch, weighted 1/G, then averaged over the G groups)
    is saekit's summed prefix losses (means over batch and d) times d / G^2."""
    module = pytest.importorskip("dictionary_learning.trainers.matryoshka_batch_top_k")
    trainer = module.MatryoshkaBatchTopKTrainer(
        steps=10,
        activation_dim=D,
        dict_size=M,
        k=2,
        layer=0,
        lm_name="none",
        group_fractions=[0.3, 0.3, 0.4],
        warmup_steps=1,
        device="cpu",
    )
    ae = trainer.ae
    _randomise(ae, seed=12)
    with torch.no_grad():
        ae.W_dec.div_(ae.W_dec.norm(dim=1, keepdim=True))
        ae.threshold.fill_(0.2)
    folder = tmp_path / "dl"
    folder.mkdir()
    torch.save(ae.state_dict(), folder / "ae.pt")
    (folder / "config.json").write_text(json.dumps({"trainer": trainer.config}))
    ours = saekit.load(folder)
    assert ours.arch == "matryoshka" and ours.prefix_sizes == [3, 6, 10] and ours.k_values == [2]
    x = _x(64)
    with torch.no_grad():
        c_want = ae.encode(x)
        r_want = ae.decode(c_want)
    assert (c_want != 0).any() and (c_want == 0).any()
    c_got, r_got = _codes_and_recon(ours, x)
    torch.testing.assert_close(c_got, c_want, atol=TOL, rtol=0)
    torch.testing.assert_close(r_got, r_want, atol=TOL, rtol=0)
    with torch.no_grad():  # training moves saekit's threshold (dictionary_learning's only after threshold_start_step)
        log = trainer.loss(x, step=0, logging=True)
        terms = ours.training_loss(x)
    assert log.losses["l2_loss"] == pytest.approx(terms["reconstruction"].item() * D / 3**2, rel=1e-5)


# ---------------------------------------------------------------- an imported SAE in the dashboard


def test_imported_saelens_sae_feeds_the_dashboard(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from lm_fixtures import make_tiny_llama
    from saekit.lm.extract import extract_activations
    from saekit.lm.models import load_model
    from saekit.lm.shards import ShardReader
    from saekit.report.dashboard import write_dashboard

    model = make_tiny_llama(tmp_path / "model")
    acts = tmp_path / "acts"
    extract_activations(str(model), 1, "resid", "stdlib", tokens=1024, out=acts, window=64, dtype="float32", progress=False)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 48, generator=g)
    tensors = {"W_enc": w, "b_enc": torch.zeros(48), "W_dec": w.T.clone(), "b_dec": torch.randn(32, generator=g)}
    sl = _saelens_folder(tmp_path / "sl", {"architecture": "standard", "d_in": 32, "d_sae": 48}, tensors)

    with pytest.raises(InputError, match="activations of width 32, the SAE reads width 6"):
        import_sae(export_saelens(_run(tmp_path / "run", _random_sae("relu")), tmp_path / "sl6"), tmp_path / "x", activations=acts)
    import_sae(sl, tmp_path / "out" / "runs" / "imported", activations=acts)
    page = write_dashboard(tmp_path / "out", "imported", n_tokens=640, contexts=3, batch=256, lm=load_model(str(model)))
    text = page.read_text(encoding="utf-8")
    payload = json.loads(re.search(r'<script[^>]*type="application/json"[^>]*>(.*?)</script>', text, re.S).group(1))

    # Expected counts: SAELens's codes of the same rows, ReLU((x - b_dec) W_enc + b_enc) > 0, per latent.
    x = ShardReader(acts).read(0, 640)
    codes = torch.relu((x - tensors["b_dec"]) @ w)
    assert payload["count"] == (codes > 0).sum(0).tolist()
