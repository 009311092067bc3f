"""saekit.report.dashboard: the feature dashboard's data collection (hand-computed), escaping, a real browser, the CLI."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

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
