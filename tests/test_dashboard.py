"""saekit.report.dashboard: the feature dashboard's data collection (hand-computed), escaping, a real browser, the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saekit.errors import InputError
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
