"""saekit.report.dashboard: the feature dashboard's data collection (hand-computed), escaping, a real browser, the CLI."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from browser import chromium_page
from saekit.errors import InputError
from saekit.report.dashboard import density_svg, encode_payload, render_dashboard, write_dashboard
from saekit.report.dashboard_data import (
    CONTEXT_AFTER,
    CONTEXT_BEFORE,
    HIST_BINS,
    collect_from,
    context_rows,
    logit_weights,
    token_strings,
)
from saekit.sae import ReluSAE

EVIL = ["</script><script>alert(1)</script>", "<b>bold</b>", "a & b", "\"quoted\" 'single'", "\n", "  ", "\t", " the", "<!--"]
L = CONTEXT_BEFORE + 1 + CONTEXT_AFTER


# -- synthetic data in the shape collect_dashboard returns ----------------------------------------------------------


def make_data(m: int = 600, k: int = 10, seed: int = 0, vocab: int = 300) -> dict:
    """A data dict like collect_dashboard's: every 7th latent dead, the others fire with log-uniform frequencies;
    latent 3's top token is always EVIL[0] (for the escaping checks), latent 5's always ' the'."""
    rng = np.random.default_rng(seed)
    tokens = EVIL + [f"w{i}" for i in range(vocab - len(EVIL))]
    n_tokens = 100_000
    count = np.where(np.arange(m) % 7 == 6, 0, np.round(10 ** rng.uniform(0.5, 4.5, m))).astype(np.int64)
    vmax = np.where(count > 0, rng.uniform(0.5, 12.0, m), 0.0)
    mean = vmax * rng.uniform(0.1, 0.5, m) * (count > 0)
    hist = np.zeros((m, HIST_BINS), dtype=np.int64)
    rows = np.full((m, k), -1, dtype=np.int64)
    values = np.zeros((m, k))
    toks = np.full((m, k, L), -1, dtype=np.int64)
    acts = np.zeros((m, k, L))
    for j in range(m):
        if count[j] == 0:
            continue
        h = rng.exponential(1.0, HIST_BINS)
        hist[j] = np.floor(h / h.sum() * count[j])
        hist[j, -1] = max(hist[j, -1], 1)
        nk = int(min(k, count[j]))
        values[j, :nk] = np.sort(rng.uniform(0.3, 1.0, nk))[::-1] * vmax[j]
        values[j, 0] = vmax[j]
        rows[j, :nk] = rng.choice(n_tokens, nk, replace=False)
        toks[j, :nk] = rng.integers(0, vocab, (nk, L))
        toks[j, :nk, CONTEXT_BEFORE] = 0 if j == 3 else 7 if j == 5 else rng.integers(0, vocab, nk)
        acts[j, :nk] = np.where(rng.random((nk, L)) < 0.3, rng.uniform(0, 1, (nk, L)) * values[j, :nk, None], 0.0)
        acts[j, :nk, CONTEXT_BEFORE] = values[j, :nk]
    logits = rng.normal(size=(m, vocab))
    order = np.argsort(-logits, axis=1)
    return {
        "meta": {
            "run_id": "lm-<i>run</i>",
            "model": "tiny & <model>",
            "layer": 2,
            "site": "resid_post",
            "arch": "relu",
            "d": 64,
            "dict_size": m,
            "l1": 0.1,
            "input_scale": 1.5,
            "n_tokens": n_tokens,
            "window": 64,
            "causal": True,
            "context_before": CONTEXT_BEFORE,
            "context_after": CONTEXT_AFTER,
            "scan": {"l0": 12.5, "fvu": 0.123, "dead_fraction": float((count == 0).mean())},
            "train": {"fvu": 0.12, "l0": 12.0, "dead_fraction": 0.14},
            "notes": [],
        },
        "tokens": tokens,
        "count": count,
        "mean": mean,
        "max": vmax,
        "hist": hist,
        "ctx_rows": rows,
        "ctx_values": values,
        "ctx_tokens": toks,
        "ctx_acts": acts,
        "promote_tokens": order[:, :10],
        "promote_values": np.take_along_axis(logits, order[:, :10], 1),
        "suppress_tokens": order[:, ::-1][:, :10],
        "suppress_values": np.take_along_axis(logits, order[:, ::-1][:, :10], 1),
    }


# -- collection: a hand-computed case -------------------------------------------------------------------------------


class FakeReader:
    """Rows of a RowReader held in memory: d=4, window 8, 32 rows (4 windows), token id of row g = 100 + g."""

    def __init__(self, x: torch.Tensor, window: int = 8) -> None:
        self.x, self.window, self.d, self.n_rows = x, window, x.shape[1], x.shape[0]
        self.manifest = {"causal": False}
        self.reads: list[tuple[int, int]] = []

    def read(self, start: int, stop: int) -> torch.Tensor:
        assert 0 <= start <= stop <= self.n_rows
        self.reads.append((start, stop))
        return self.x[start:stop].clone()

    def token_ids(self, start: int, stop: int) -> torch.Tensor:
        return torch.arange(start, stop) + 100


# Raw activations: latent j reads coordinate j (W_enc = identity on the first 3 coordinates, b_enc = 0), and the SAE
# sees x * 2 (input_scale), so its code is 2 * x_j where positive.
LATENT0 = {3: 1.0, 10: 2.5, 11: 0.25, 17: 0.5, 30: 1.5}  # row -> raw value; codes 2, 5, 0.5, 1, 3
LATENT1 = {0: 0.5, 8: 1.0, 16: 1.5, 24: 2.0}  # codes 1, 2, 3, 4


def hand_sae_and_reader() -> tuple[ReluSAE, FakeReader]:
    x = torch.zeros(32, 4)
    for g, v in LATENT0.items():
        x[g, 0] = v
    for g, v in LATENT1.items():
        x[g, 1] = v
    x[:, 2] = -1.0  # latent 2 never fires: dead
    x[:, 3] = torch.linspace(-0.5, 0.5, 32)  # a coordinate no latent reads: reconstruction error
    sae = ReluSAE(d=4, dict_size=3, seeds=[0], l1=[0.1])
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_dec.zero_()
        for j in range(3):
            sae.W_enc[0, j, j] = 1.0
            sae.W_dec[0, j, j] = 1.0
    return sae, FakeReader(x)


def test_collection_hand_computed() -> None:
    sae, reader = hand_sae_and_reader()
    data = collect_from(sae, reader, n_tokens=31, contexts=3, batch=5, input_scale=2.0)
    assert data["count"].tolist() == [5, 4, 0]
    assert np.allclose(data["mean"], [(2 + 5 + 0.5 + 1 + 3) / 5, (1 + 2 + 3 + 4) / 4, 0])
    assert np.allclose(data["max"], [5, 4, 0])
    # Top contexts, best first: latent 0 at rows 10 (5), 30 (3), 3 (2); latent 1 at rows 24, 16, 8; latent 2 none.
    assert data["ctx_rows"].tolist() == [[10, 30, 3], [24, 16, 8], [-1, -1, -1]]
    assert np.allclose(data["ctx_values"], [[5, 3, 2], [4, 3, 2], [0, 0, 0]])
    # Histogram of nonzero codes in 24 bins on [0, max]: latent 0 (max 5, width 5/24): 0.5 -> bin 2, 1 -> 4, 2 -> 9,
    # 3 -> 14, 5 (the max) -> 23; latent 1 (max 4, width 1/6): 1 -> 6, 2 -> 12, 3 -> 18, 4 -> 23.
    h = data["hist"]
    assert h.shape == (3, HIST_BINS)
    assert np.nonzero(h[0])[0].tolist() == [2, 4, 9, 14, 23] and h[0].sum() == 5
    assert np.nonzero(h[1])[0].tolist() == [6, 12, 18, 23] and h[1].sum() == 4
    assert h[2].sum() == 0
    # The context of row 10 (window 1 = rows 8..15, position 2): rows 8..14, the top row at slot CONTEXT_BEFORE;
    # latent 0's activation on it is 5 at row 10 and 0.5 at row 11.
    table = data["tokens"]
    toks = [table[i] if i >= 0 else None for i in data["ctx_tokens"][0, 0].tolist()]
    assert toks == [None] * (CONTEXT_BEFORE - 2) + [f"⟨{100 + g}⟩" for g in range(8, 15)]
    acts = data["ctx_acts"][0, 0]
    assert acts[CONTEXT_BEFORE] == pytest.approx(5.0) and acts[CONTEXT_BEFORE + 1] == pytest.approx(0.5)
    assert np.count_nonzero(acts) == 2
    # Row 30 (window 3 = rows 24..31): the context stops at the window's end, row 31, which lies past the 31 scanned rows.
    toks30 = [table[i] if i >= 0 else None for i in data["ctx_tokens"][0, 1].tolist()]
    assert toks30 == [None] * (CONTEXT_BEFORE - 6) + [f"⟨{100 + g}⟩" for g in range(24, 32)] + [None] * (CONTEXT_AFTER - 1)
    # Latent 1's context of row 24 (position 0) starts at the window's first token.
    assert (data["ctx_tokens"][1, 0, :CONTEXT_BEFORE] == -1).all() and data["ctx_acts"][1, 0, CONTEXT_BEFORE] == pytest.approx(4.0)
    assert (data["ctx_tokens"][2] == -1).all()
    # L0 = 9 firings over 31 rows; FVU against saekit.metrics.fvu on the same scaled rows and reconstruction.
    from saekit.metrics.reconstruction import fvu

    meta = data["meta"]
    assert meta["n_tokens"] == 31 and meta["scan"]["l0"] == pytest.approx(9 / 31)
    assert meta["scan"]["dead_fraction"] == pytest.approx(1 / 3)
    xs = reader.x[:31] * 2.0
    with torch.no_grad():
        x_hat, _ = sae(xs)
    assert meta["scan"]["fvu"] == pytest.approx(fvu(xs, x_hat[0]), rel=1e-9)
    # Bounded reads: never more than a batch at a time.
    assert max(b - a for a, b in reader.reads) <= 5


def test_collection_does_not_depend_on_batch_size() -> None:
    sae, reader = hand_sae_and_reader()
    a = collect_from(sae, reader, n_tokens=10_000, contexts=4, batch=3, input_scale=2.0)
    b = collect_from(sae, reader, n_tokens=10_000, contexts=4, batch=64, input_scale=2.0)
    assert a["meta"]["n_tokens"] == 32  # clamped to the rows there are
    for key in ("count", "hist", "ctx_rows", "ctx_tokens"):
        assert np.array_equal(a[key], b[key]), key
    for key in ("mean", "max", "ctx_values", "ctx_acts"):
        assert np.allclose(a[key], b[key]), key
    # Latent 0 fires 5 times; with 4 contexts its 4 best are rows 10, 30, 3, 17 (codes 5, 3, 2, 1).
    assert a["ctx_rows"][0].tolist() == [10, 30, 3, 17]
    assert a["ctx_rows"][1].tolist() == [24, 16, 8, 0]


def test_collection_leaves_out_skipped_positions() -> None:
    # With skip_positions=1 (the SAE never saw position 0 of a window), latent 1, which fires only at position 0
    # (rows 0, 8, 16, 24), is dead; latent 0 (positions 3, 2, 3, 1, 6) is as before; 28 of 32 rows count.
    sae, reader = hand_sae_and_reader()
    data = collect_from(sae, reader, n_tokens=32, contexts=3, batch=5, input_scale=2.0, skip_positions=1)
    assert data["count"].tolist() == [5, 0, 0]
    assert data["meta"]["n_tokens"] == 28 and data["meta"]["rows_scanned"] == 32
    assert data["meta"]["scan"]["l0"] == pytest.approx(5 / 28)
    assert data["ctx_rows"].tolist()[1] == [-1, -1, -1]
    # Row 8 (position 0) still shows in the context of row 10 as a token, with no activation.
    assert data["tokens"][data["ctx_tokens"][0, 0, CONTEXT_BEFORE - 2]] == "⟨108⟩" and data["ctx_acts"][0, 0, CONTEXT_BEFORE - 2] == 0
    with pytest.raises(InputError, match="skip_positions"):
        collect_from(sae, reader, n_tokens=32, contexts=3, skip_positions=8)


def test_collection_refuses_bad_input() -> None:
    sae, reader = hand_sae_and_reader()
    with pytest.raises(InputError):
        collect_from(sae, reader, n_tokens=0, contexts=3)
    wide = ReluSAE(d=5, dict_size=3, seeds=[0], l1=[0.1])
    with pytest.raises(InputError, match="d=4"):
        collect_from(wide, reader, n_tokens=10, contexts=3)


def test_context_rows_stay_inside_their_window() -> None:
    top = torch.tensor([[1, 9], [-1, 15]])  # (k=2, m=2)
    rows = context_rows(top, window=8, n_rows=16, before=3, after=2)
    assert rows.shape == (2, 2, 6)
    assert rows[0, 0].tolist() == [-1, -1, 0, 1, 2, 3]  # row 1: window 0 starts at row 0
    assert rows[0, 1].tolist() == [-1] * 6  # no entry
    assert rows[1, 0].tolist() == [-1, -1, 8, 9, 10, 11]  # row 9: rows 6, 7 belong to window 0
    assert rows[1, 1].tolist() == [12, 13, 14, 15, -1, -1]  # row 15: the last row of the data


def test_logit_weights_match_a_direct_product() -> None:
    g = torch.Generator().manual_seed(0)
    directions, w_u, norm = torch.randn(5, 3, generator=g), torch.randn(40, 3, generator=g), torch.rand(3, generator=g) + 0.5
    pi, pv, ni, nv = logit_weights(directions, w_u, norm, top=4, chunk=2)
    full = (directions * norm) @ w_u.T  # (5, 40)
    assert torch.allclose(pv, full.topk(4, dim=1).values) and torch.equal(pi, full.topk(4, dim=1).indices)
    assert torch.allclose(nv, full.topk(4, dim=1, largest=False).values) and torch.equal(ni, full.topk(4, dim=1, largest=False).indices)
    pi2, pv2, _, _ = logit_weights(directions, w_u, None, top=4)
    assert torch.allclose(pv2, (directions @ w_u.T).topk(4, dim=1).values)


def test_token_strings_of_a_byte_level_tokenizer() -> None:
    pytest.importorskip("transformers")
    from transformers import PreTrainedTokenizerFast

    from lm_fixtures import EOS, make_tokenizer

    tok = PreTrainedTokenizerFast(tokenizer_object=make_tokenizer(300, [EOS]), eos_token=EOS)
    text = "Return the path.\n\tx = a < b & 'c'  # done"
    ids = tok.encode(text)
    strings = token_strings(tok, ids)
    assert "".join(strings) == text  # every piece is the text it stands for: Ġ -> space, Ċ -> newline, ĉ -> tab
    assert token_strings(tok, [tok.convert_tokens_to_ids(EOS)]) == [EOS]
    assert token_strings(None, [5]) == ["⟨5⟩"]


# -- the page: escaping and size ------------------------------------------------------------------------------------


class _Elements(HTMLParser):
    """Start tags in document order, and the text inside each <script>."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.scripts: list[tuple[dict, str]] = []
        self._in_script: dict | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.append(tag)
        if tag == "script":
            self._in_script = dict(attrs)
            self.scripts.append((self._in_script, ""))

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = None

    def handle_data(self, data: str) -> None:
        if self._in_script is not None:
            attrs, text = self.scripts[-1]
            self.scripts[-1] = (attrs, text + data)


def page_payload(page: str) -> dict:
    parser = _Elements()
    parser.feed(page)
    blobs = [text for attrs, text in parser.scripts if attrs.get("type") == "application/json"]
    assert len(blobs) == 1
    return json.loads(blobs[0])


def test_page_escapes_everything_from_the_data() -> None:
    data = make_data(m=40)
    page = render_dashboard(data)
    parser = _Elements()
    parser.feed(page)
    # Exactly two scripts (the data and the page's code); the data's <b>, <i>, <script> and <!-- stay text.
    assert parser.tags.count("script") == 2 and "b" not in parser.tags and "i" not in parser.tags
    assert "<b>bold" not in page and "</script><script>alert" not in page and "<!--" not in page
    assert "lm-&lt;i&gt;run&lt;/i&gt;" in page and "tiny &amp; &lt;model&gt;" in page
    payload = page_payload(page)
    assert payload["tokens"][: len(EVIL)] == EVIL  # the JSON round-trips every string exactly
    assert payload["meta"]["run_id"] == "lm-<i>run</i>"
    # Latent 3's top token is always EVIL[0]; the index summary counts it.
    assert payload["summary"][3][:2] == [0, int(data["count"][3] > 0) and int((data["ctx_rows"][3] >= 0).sum())]
    # Nothing points outside the page.
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)


def test_payload_encodes_contexts_compactly() -> None:
    data = make_data(m=50, k=10)
    payload = encode_payload(data)
    valid = (data["ctx_rows"] >= 0) & (data["ctx_values"] > 0)
    assert payload["nctx"] == valid.sum(1).tolist()
    n = int(valid.sum())
    acts = np.frombuffer(base64.b64decode(payload["ctxAct"]), dtype=np.uint8).reshape(n, L)
    toks = np.frombuffer(base64.b64decode(payload["ctxTok"]), dtype="<u2").reshape(n, L)
    owner = np.repeat(np.arange(50), valid.sum(1))
    # Quantised relative to the latent's max: 255 at the max, within half a step elsewhere.
    expect = data["ctx_acts"][valid] / data["max"][owner][:, None] * 255
    assert np.abs(acts - expect).max() <= 0.5 + 1e-9
    assert np.array_equal(np.where(toks == 0xFFFF, -1, toks), data["ctx_tokens"][valid])
    hist = np.frombuffer(base64.b64decode(payload["hist"]), dtype="<u2").reshape(50, HIST_BINS)
    assert np.array_equal(hist, data["hist"])
    dead = np.flatnonzero(data["count"] == 0)
    assert all(payload["nctx"][j] == 0 and payload["summary"][j] == [] for j in dead)


def test_payload_uses_32_bit_token_indices_for_a_large_table() -> None:
    data = make_data(m=20, vocab=70_000)  # more token strings than a uint16 index can address
    payload = encode_payload(data)
    assert payload["tokType"] == "u4" and payload["pad"] == 0xFFFFFFFF
    valid = (data["ctx_rows"] >= 0) & (data["ctx_values"] > 0)
    toks = np.frombuffer(base64.b64decode(payload["ctxTok"]), dtype="<u4").reshape(-1, L)
    assert np.array_equal(np.where(toks == 0xFFFFFFFF, -1, toks.astype(np.int64)), data["ctx_tokens"][valid])
    promote = np.frombuffer(base64.b64decode(payload["promote"]["tok"]), dtype="<u4").reshape(20, 10)
    assert np.array_equal(promote, data["promote_tokens"])


def test_page_size_for_5000_latents_is_a_few_megabytes() -> None:
    page = render_dashboard(make_data(m=5000, k=10))
    assert len(page.encode()) < 6_000_000  # 5000 latents x 10 contexts x 17 tokens: about 4.8 MB


def test_density_svg_counts_dead_latents_separately() -> None:
    svg = density_svg(np.array([0, 0, 0, 1, 10, 100, 1000]), 10_000)
    assert "dead (never fired in the scan): 3 latents" in svg
    # frequencies 1e-4, 1e-3, 1e-2, 1e-1: one latent in each of four bins
    assert len(re.findall(r": 1 latents</title>", svg)) == 4


# -- the page in a real browser -------------------------------------------------------------------------------------


@pytest.mark.browser
def test_dashboard_works_in_chromium(tmp_path: Path) -> None:
    m = 1200
    data = make_data(m=m)
    path = tmp_path / "dashboard.html"
    path.write_text(render_dashboard(data), encoding="utf-8")
    started = time.perf_counter()
    with chromium_page(path, viewport=(1440, 950)) as opened:
        page, errors, requests, dialogs = opened.page, opened.errors, opened.requests, opened.dialogs
        assert all(u.startswith(("file:", "data:")) for u in requests), requests

        def ids() -> list[int]:
            return page.eval_on_selector_all("#index tbody tr", "rows => rows.map(r => +r.dataset.latent)")

        # Paginated: 200 rows, then 200 more on request; the first live latent's details are open.
        assert ids() == list(range(200))
        page.click("#more")  # clicking may scroll the table's end into view, which loads a page more by itself
        page.wait_for_function("document.querySelectorAll('#index tbody tr').length >= 400")
        # the rows and their dead marks read at once: a scroll event may still load a page more in between
        rows = page.eval_on_selector_all("#index tbody tr", "rows => rows.map(r => [+r.dataset.latent, r.classList.contains('dead')])")
        shown = [j for j, _ in rows]
        assert len(shown) % 200 == 0 and shown == list(range(len(shown)))
        assert page.get_attribute("#detail", "data-latent") == "0"

        # Dead latents are greyed and can be hidden.
        assert sum(dead for _, dead in rows) == sum(data["count"][: len(shown)] == 0)
        page.check("#hide-dead")
        assert all(data["count"][j] > 0 for j in ids())
        page.uncheck("#hide-dead")

        # Search by token text: latent 5's top token is always " the" (shown as ·the).
        page.fill("#search", "the")
        page.wait_for_function("document.querySelectorAll('#index tbody tr').length < 200")
        hits = ids()
        assert 5 in hits
        summaries = page.eval_on_selector_all("#index tbody tr td.toks", "cells => cells.map(c => c.textContent)")
        assert all("the" in s for s in summaries)
        # Search by id: "#42" finds the ids starting with 42; plain "42" finds those and the latents whose tokens hold "42".
        by_id = {j for j in range(m) if str(j).startswith("42")}
        page.fill("#search", "#42")
        page.wait_for_function("[...document.querySelectorAll('#index tbody tr')].every(r => r.dataset.latent.startsWith('42'))")
        assert set(ids()) == by_id
        page.fill("#search", "42")
        page.wait_for_function(f"document.querySelectorAll('#index tbody tr').length > {len(by_id)}")
        assert by_id < set(ids())
        page.fill("#search", "")
        page.wait_for_function("document.querySelectorAll('#index tbody tr').length === 200")

        # Sort by max activation (as the page holds it, to 4 significant digits): largest first, then reversed.
        shown_max = [float(f"{v:.4g}") for v in data["max"]]
        page.click("#index thead th[data-key=max]")
        maxes = [shown_max[j] for j in ids()]
        assert maxes == sorted(maxes, reverse=True) and ids()[0] == int(np.argmax(data["max"]))
        assert page.get_attribute("#index thead th[data-key=max]", "aria-sort") == "descending"
        page.click("#index thead th[data-key=max]")
        order = ids()
        maxes = [shown_max[j] for j in order]
        assert maxes == sorted(maxes) and order[0] in np.flatnonzero(data["count"] == 0)
        assert page.get_attribute("#index thead th[data-key=max]", "aria-sort") == "ascending"
        page.click("#index thead th[data-key=freq]")
        counts = [int(data["count"][j]) for j in ids()]
        assert counts == sorted(counts, reverse=True) and len(counts) == 200  # numeric: 100 > 10 > 9

        # Click latent 3: its contexts (top token EVIL[0], shown as text), histogram and logit tables appear.
        page.click("#index thead th[data-key=id]")
        page.click('#index tbody tr[data-latent="3"]')
        assert page.inner_text("#detail h2") == "Latent 3"
        n3 = int(((data["ctx_rows"][3] >= 0) & (data["ctx_values"][3] > 0)).sum())
        assert page.eval_on_selector_all("#detail .ctx", "c => c.length") == n3
        tops = page.eval_on_selector_all("#detail .ctx .tok.top", "s => s.map(x => x.textContent)")
        assert tops == [EVIL[0]] * n3
        bars = page.eval_on_selector_all("#detail svg.act-hist rect.bar", "r => r.length")
        assert bars == int((data["hist"][3] > 0).sum()) and bars > 0
        assert page.eval_on_selector_all("#detail .logits tr", "r => r.length") == 20
        assert page.evaluate("document.scripts.length") == 2 and dialogs == []
        # Whitespace is visible: a newline token as ↵, a spaces-only token as dots.
        texts = page.evaluate("[...document.querySelectorAll('#detail .tok')].map(t => t.textContent).join('')")
        assert "\n" not in texts and "\t" not in texts
        assert "#latent-3" in page.url

        shot = tmp_path / "dashboard.png"
        page.screenshot(path=str(shot), full_page=False)
        assert shot.stat().st_size > 10_000
    assert errors == []
    print(f"browser test: {time.perf_counter() - started:.1f}s in Chromium, screenshot {tmp_path / 'dashboard.png'}")


# -- end to end: a tiny Llama, its activations, an SAE, the command ------------------------------------------------


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OUT with runs/lm-run: a ReLU SAE (input_scale 1.5, skip_positions 1, latents 60..63 dead) on a tiny Llama's
    layer-1 residual stream."""
    pytest.importorskip("transformers")
    from lm_fixtures import make_tiny_llama
    from saekit.io import save_checkpoint
    from saekit.lm.extract import extract_activations

    root = tmp_path_factory.mktemp("dashboard-e2e")
    model = make_tiny_llama(root / "model")
    acts = root / "acts"
    extract_activations(str(model), 1, "resid", "stdlib", tokens=2048, out=acts, window=64, dtype="float32", progress=False)
    sae = ReluSAE(d=32, dict_size=64, seeds=[0], l1=[0.1])
    with torch.no_grad():
        sae.b_enc[0, 60:] = -1e6  # never fire
    out = root / "out"
    config = {
        "source": {"kind": "activations", "path": str(acts), "skip_positions": 1},
        "sae": {"arch": "relu", "dict_size": 64, "l1": [0.1]},
    }
    save_checkpoint(out / "runs" / "lm-run", sae, samples=0, config=config, extra={"input_scale": 1.5})
    return out


def test_dashboard_end_to_end(lm_run: Path) -> None:
    from saekit.io import load_sae
    from saekit.lm.models import load_model
    from saekit.lm.shards import ShardReader

    lm = load_model(str(lm_run.parent / "model"))
    path = write_dashboard(lm_run, "lm-run", n_tokens=1500, contexts=5, batch=512, lm=lm)
    assert path == lm_run / "dashboards" / "lm-run.html"
    page = path.read_text(encoding="utf-8")
    print(f"end-to-end page: {len(page.encode()):,} bytes for 64 latents x 5 contexts")
    payload = page_payload(page)
    meta = payload["meta"]
    assert meta["run_id"] == "lm-run" and meta["layer"] == 1 and meta["site"] == "resid" and meta["rows_scanned"] == 1500
    assert meta["n_tokens"] == 1500 - 24  # position 0 of the 24 windows the 1500 rows touch is left out (skip_positions=1)
    assert meta["input_scale"] == 1.5 and meta["causal"] is True
    assert payload["m"] == 64 and all(payload["count"][j] == 0 for j in range(60, 64))
    assert meta["scan"]["dead_fraction"] >= 4 / 64

    # The latents' top contexts agree with a direct computation on the same rows (codes of x * 1.5).
    reader = ShardReader(lm_run.parent / "acts")
    sae = load_sae(lm_run / "runs" / "lm-run")
    with torch.no_grad():
        codes = sae.encode(reader.read(0, 1500) * 1.5)[0]
    codes[torch.arange(1500) % 64 == 0] = 0  # skipped positions
    assert payload["count"] == (codes > 0).sum(0).tolist()
    best = int(np.argmax(payload["count"]))
    start = sum(payload["nctx"][:best])
    assert payload["ctxRow"][start] == int(codes[:, best].argmax())
    assert payload["ctxValue"][start] == pytest.approx(float(codes[:, best].max()), rel=1e-3)

    # The top context's tokens are the tokenizer's strings of the rows around it.
    g = payload["ctxRow"][start]
    window_start = g - g % 64
    lo = max(window_start, g - CONTEXT_BEFORE)
    ids = reader.token_ids(lo, min(g + CONTEXT_AFTER + 1, window_start + 64)).tolist()
    toks = np.frombuffer(base64.b64decode(payload["ctxTok"]), dtype="<u2").reshape(-1, L)[start]
    shown = [payload["tokens"][t] for t in toks.tolist() if t != 0xFFFF]
    assert shown == token_strings(lm.tokenizer, ids)

    # Logit weights: (W_dec[j] / 1.5) * final-norm weight @ lm_head^T; the top 10 token strings of latent `best`.
    w_u, norm = lm.model.get_output_embeddings().weight.detach(), lm.model.model.norm.weight.detach()
    logits = (sae.W_dec.detach()[0, best] / 1.5 * norm) @ w_u.T
    top = logits.topk(10).indices.tolist()
    got = np.frombuffer(base64.b64decode(payload["promote"]["tok"]), dtype="<u2").reshape(64, 10)[best]
    assert [payload["tokens"][t] for t in got.tolist()] == token_strings(lm.tokenizer, top)
    vals = np.frombuffer(base64.b64decode(payload["promote"]["val"]), dtype="<f4").reshape(64, 10)[best]
    assert np.allclose(vals, logits.topk(10).values.numpy(), rtol=1e-4, atol=1e-6)


# -- the command ----------------------------------------------------------------------------------------------------


def test_cli_writes_the_dashboard(lm_run: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from saekit.cli import app

    target = tmp_path / "page.html"
    r = CliRunner().invoke(
        app, ["dashboard", str(lm_run), "--run", "lm-run", "--tokens", "800", "--contexts", "3", "--output", str(target)]
    )
    assert r.exit_code == 0, r.output
    assert r.output.strip() == str(target) and target.stat().st_size > 10_000


def test_cli_refuses_a_missing_run_or_folder_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "out" / "runs").mkdir(parents=True)
    for args in (("dashboard", str(tmp_path / "out"), "--run", "no-such-run"), ("dashboard", str(tmp_path / "missing"), "--run", "r")):
        r = subprocess.run([sys.executable, "-m", "saekit.cli", *args], capture_output=True, text=True, timeout=300)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.startswith("saekit: error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "missing").exists()
    with pytest.raises(InputError, match="not a run id"):
        write_dashboard(tmp_path / "out", "../out")


def test_write_dashboard_refuses_a_run_not_on_activations(tmp_path: Path) -> None:
    from saekit.io import save_checkpoint

    sae = ReluSAE(d=4, dict_size=3, seeds=[0], l1=[0.1])
    save_checkpoint(tmp_path / "runs" / "toy", sae, samples=0, config={"source": {"kind": "toy"}})
    with pytest.raises(InputError, match="not trained on language-model activations"):
        write_dashboard(tmp_path, "toy")
