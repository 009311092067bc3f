"""What a feature dashboard shows, collected from an SAE and the language-model activations it was trained on.

`collect_dashboard(run_folder, n_tokens=..., contexts=...)` reads the run's cfg.json and weights, streams the
first `n_tokens` rows of its activations folder in batches, twice, with memory bounded by one batch of codes
(batch, m) plus per-latent state:

- pass 1 (`scan_top`): per latent a running top-K of (activation, global row), merged with `torch.topk` batch by
  batch (its first entry is the latent's max); also FVU over the first `FVU_ROWS` rows (decoding costs as much
  as encoding).
- pass 2 (`scan_distribution`): from the nonzero codes (code > 0 = fires), per latent the number of rows it fires
  on, the sum of its activations, and, now that its max is known, an exact histogram in `HIST_BINS` equal bins on
  [0, max] (an activation equal to the max lands in the last bin); and the latent's activation and token id on
  every token of its top contexts (a window of `CONTEXT_BEFORE` tokens before the top token and `CONTEXT_AFTER`
  after it, never crossing into another window). Pass 2 uses pass 1's batch boundaries, so the activations it
  recomputes are bit-identical to those pass 1 ranked.

The result is the data dict `saekit.report.dashboard.render_dashboard` lays out (its keys are documented there).
Codes are the SAE's codes of `x_raw * input_scale` (cfg.json "input_scale", default 1): that is what it was
trained on. Logit weights of latent j are (W_dec[j] / input_scale) ⊙ g @ W_U^T, with W_dec[j] / input_scale its
decoder direction in the model's raw activation scale, g the final norm's weight (when the model has one) and
W_U (vocab, d) the output embedding: the direct effect on the logits of one unit of the latent, ignoring the
normalisation's division by the residual's scale.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from saekit.archspec import ARCH_SPECS
from saekit.errors import InputError
from saekit.io import load_sae, read_cfg

CONTEXT_BEFORE, CONTEXT_AFTER = 12, 4
HIST_BINS = 24
LOGIT_TOP = 10
FVU_ROWS = 65_536


class RowReader(Protocol):
    """What the collection needs from an activations folder (`saekit.lm.shards.ShardReader`)."""

    manifest: dict[str, Any]
    d: int
    window: int
    n_rows: int

    def read(self, start: int, stop: int) -> torch.Tensor: ...  # float32 (stop - start, d)

    def token_ids(self, start: int, stop: int) -> torch.Tensor: ...  # int64 (stop - start,)


@dataclass
class TopScan:
    """Pass 1 over `n_rows` rows for m latents: each latent's max and top k (k, m), best first (value 0 = no entry)."""

    n_rows: int
    max: torch.Tensor  # (m,) float32
    top_values: torch.Tensor  # (k, m) float32
    top_rows: torch.Tensor  # (k, m) int64, -1 where there is no entry
    fvu: float
    fvu_rows: int  # rows the FVU was measured on


@dataclass
class Distribution:
    """Pass 2 over the same rows: how often and how strongly each latent fires, and its top contexts' activations."""

    count: torch.Tensor  # (m,) int64: rows with code > 0
    total: torch.Tensor  # (m,) float64: sum of codes
    hist: torch.Tensor  # (m, bins) int64: nonzero codes in equal bins on [0, max]
    ctx_acts: torch.Tensor  # (m, k, L) float32: the latent's code on each context token, 0 at padding
    ctx_tokens: torch.Tensor  # (m, k, L) int64: token ids, -1 at padding


Encoder = Callable[[torch.Tensor], torch.Tensor]  # x_raw (B, d) -> codes (B, m)
Decoder = Callable[[torch.Tensor], torch.Tensor]  # codes (B, m) -> x_hat (B, d) in the SAE's input scale
Logits = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # promote ids, values, suppress ids, values


def sae_functions(sae: Any, input_scale: float) -> tuple[Encoder, Decoder]:
    """encode(x_raw) = member 0's codes of x_raw * input_scale, on the SAE's device; decode(codes) = its
    reconstruction (input scale)."""
    device = sae.W_dec.device

    def encode(x: torch.Tensor) -> torch.Tensor:
        return sae.encode(x.to(device) * input_scale)[0]

    def decode(c: torch.Tensor) -> torch.Tensor:
        return sae.decode(c[None])[0]

    return encode, decode


def _batches(n: int, batch: int) -> list[tuple[int, int]]:
    return [(s, min(n, s + batch)) for s in range(0, n, batch)]


def skipped_rows(
    start: int, stop: int, window: int, skip_positions: int, x: torch.Tensor | None = None, norm_threshold: float = math.inf
) -> torch.Tensor:
    """(stop - start,) bool: rows the SAE was not trained on: the first `skip_positions` positions of their window
    (a causal model's attention sink at position 0 has ~100x the norm of the others) and, given the raw rows x,
    those whose norm exceeds `norm_threshold` (massive activations, left out of training too)."""
    skip = (torch.arange(start, stop) % window) < skip_positions
    if x is not None and math.isfinite(norm_threshold):
        skip |= x.norm(dim=1).cpu() > norm_threshold
    return skip


def kept_rows(n_rows: int, window: int, skip_positions: int) -> int:
    """How many of rows [0, n_rows) are not skipped."""
    whole, rest = divmod(n_rows, window)
    return whole * (window - skip_positions) + max(0, rest - skip_positions)


@torch.no_grad()
def scan_top(
    reader: RowReader,
    encode: Encoder,
    decode: Decoder | None,
    *,
    n_rows: int,
    k: int,
    batch: int,
    input_scale: float = 1.0,
    fvu_rows: int = FVU_ROWS,
    skip_positions: int = 0,
    norm_threshold: float = math.inf,
) -> TopScan:
    """Pass 1 over rows [0, n_rows): a running top-k of (code, row) per latent, merged batch by batch, and FVU.

    FVU is measured on the batches that start before row `fvu_rows` (decoding costs as much as encoding), in the
    SAE's input scale (x_raw * input_scale), where it was trained; FVU does not depend on the scale anyway.
    Rows at the first `skip_positions` positions of a window count as not firing and are left out of the FVU.
    """
    top_v = top_r = sum_x = None
    sum_xx, err, seen = 0.0, 0.0, 0
    for start, stop in _batches(n_rows, batch):
        x = reader.read(start, stop).float()
        c = encode(x)  # (B, m)
        skip = skipped_rows(start, stop, reader.window, skip_positions, x, norm_threshold).to(c.device)
        c[skip] = 0.0
        if top_v is None:
            top_v = torch.zeros(k, c.shape[1], device=c.device)
            top_r = torch.full((k, c.shape[1]), -1, dtype=torch.long, device=c.device)
            sum_x = torch.zeros(x.shape[1], dtype=torch.float64, device=c.device)
        bv, bi = torch.topk(c, min(k, c.shape[0]), dim=0)  # (k', m), best first
        top_v, idx = torch.topk(torch.cat([top_v, bv]), k, dim=0)
        top_r = torch.cat([top_r, bi + start]).gather(0, idx)
        if decode is not None and start < fvu_rows:
            keep = ~skip
            xs = x.to(c.device)[keep].double() * input_scale
            sum_x += xs.sum(dim=0)
            sum_xx += xs.pow(2).sum().item()
            err += (decode(c[keep]).double() - xs).pow(2).sum().item()
            seen += xs.shape[0]
    if top_v is None:
        raise InputError("no activation rows to scan")
    top_r = torch.where(top_v > 0, top_r, torch.full_like(top_r, -1)).cpu()
    top_v = top_v.clamp_min(0.0).cpu()
    variance = sum_xx - sum_x.pow(2).sum().item() / max(seen, 1)
    fvu = err / variance if seen and variance > 0 else float("nan")
    return TopScan(n_rows, top_v[0].clone(), top_v, top_r, fvu, seen)


def context_rows(top_rows: torch.Tensor, *, window: int, n_rows: int, before: int, after: int) -> torch.Tensor:
    """Global rows of each top context: top_rows (k, m) -> (m, k, before + 1 + after), -1 outside the window or data.

    Slot `before` holds the top row itself; a context never crosses into another window (another text).
    """
    top = top_rows.T  # (m, k)
    offsets = torch.arange(-before, after + 1)
    rows = top[..., None] + offsets  # (m, k, L)
    ok = (top[..., None] >= 0) & (rows >= 0) & (rows < n_rows) & (rows // window == top[..., None] // window)
    return torch.where(ok, rows, torch.full_like(rows, -1))


@torch.no_grad()
def scan_distribution(
    reader: RowReader,
    encode: Encoder,
    top: TopScan,
    rows: torch.Tensor,
    *,
    batch: int,
    bins: int = HIST_BINS,
    skip_positions: int = 0,
    norm_threshold: float = math.inf,
) -> Distribution:
    """Pass 2 over rows [0, top.n_rows), in pass 1's batches: from the nonzero codes, per latent their count, sum
    and histogram in `bins` equal bins on [0, max] (the max itself in the last bin); and for the context rows
    (m, k, L) (-1 = padding) each latent's own code and the token ids."""
    m = top.max.shape[0]
    count = total = hist = None
    acts = torch.zeros(rows.numel())
    toks = torch.full((rows.numel(),), -1, dtype=torch.long)
    flat = rows.reshape(-1)
    latent_of = torch.arange(m)[:, None, None].expand_as(rows).reshape(-1)
    wanted = (flat >= 0).nonzero().squeeze(1)
    order = wanted[torch.argsort(flat[wanted], stable=True)]  # context entries sorted by row
    sorted_rows = flat[order]
    scale = torch.where(top.max > 0, bins / top.max.clamp_min(1e-30), torch.zeros_like(top.max))  # (m,)
    last = int(sorted_rows[-1]) + 1 if sorted_rows.numel() else 0
    spans = _batches(top.n_rows, batch)
    if last > top.n_rows:  # contexts reach a few rows past the scan: one extra read for them
        spans.append((top.n_rows, last))
    for start, stop in spans:
        x = reader.read(start, stop).float()
        c = encode(x)  # (B, m)
        c[skipped_rows(start, stop, reader.window, skip_positions, x, norm_threshold).to(c.device)] = 0.0
        if count is None:
            count, total = torch.zeros(m, dtype=torch.long, device=c.device), torch.zeros(m, dtype=torch.float64, device=c.device)
            hist, scale = torch.zeros(m * bins, dtype=torch.long, device=c.device), scale.to(c.device)
        if start < top.n_rows:
            r, j = (c > 0).nonzero(as_tuple=True)
            v = c[r, j]
            count += torch.bincount(j, minlength=m)
            total += torch.bincount(j, weights=v.double(), minlength=m)
            hist += torch.bincount(j * bins + (v * scale[j]).floor().long().clamp_(0, bins - 1), minlength=m * bins)
        lo, hi = torch.searchsorted(sorted_rows, torch.tensor([start, stop])).tolist()
        if hi > lo:
            entries = order[lo:hi]
            local = flat[entries] - start
            acts[entries] = c[local.to(c.device), latent_of[entries].to(c.device)].float().cpu()
            toks[entries] = reader.token_ids(start, stop)[local]
    return Distribution(count.cpu(), total.cpu(), hist.cpu().view(m, bins), acts.view(rows.shape), toks.view(rows.shape))


# -- token strings ------------------------------------------------------------------------------------------------


def _byte_level_alphabet() -> dict[str, int]:
    """The character -> byte table of byte-level BPE: printable Latin-1 bytes stand for themselves, every other
    byte b for chr(256 + its rank among those others)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in table.values()]
    table.update({chr(256 + i): b for i, b in enumerate(others)})
    return table


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _is_byte_level(tokenizer: Any) -> bool:
    try:
        return '"ByteLevel"' in json.dumps(json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder"))
    except Exception:  # noqa: BLE001 - a slow tokenizer or an unusual backend: no byte-level table
        return False


def token_strings(tokenizer: Any, ids: list[int]) -> list[str]:
    """The text each token id stands for, on its own: byte-level markers (Ġ, Ċ) mapped back to bytes, SentencePiece's
    ▁ to a space and its <0xNN> byte tokens to the character; special tokens as they are; bytes that are not whole
    UTF-8 characters as \\xNN escapes."""
    if tokenizer is None:
        return [f"⟨{i}⟩" for i in ids]
    pieces = tokenizer.convert_ids_to_tokens([int(i) for i in ids])
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    byte_level = _is_byte_level(tokenizer)
    table = _byte_level_alphabet() if byte_level else {}
    out = []
    for i, piece in zip(ids, pieces):
        if piece is None:
            out.append(f"⟨{i}⟩")
        elif int(i) in special:
            out.append(piece)
        elif byte_level and all(ch in table for ch in piece):
            out.append(bytes(table[ch] for ch in piece).decode("utf-8", errors="backslashreplace"))
        elif byte_level:
            out.append(piece)
        else:
            text = piece.replace("▁", " ")
            out.append(_BYTE_FALLBACK.sub(lambda mt: chr(int(mt.group(1), 16)) if int(mt.group(1), 16) < 0x80 else mt.group(0), text))
    return out


# -- logit weights -------------------------------------------------------------------------------------------------


def unembedding(model: Any) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(W_U (vocab, d), final norm weight (d,) or None) of a causal LM, or None when it has no output embedding."""
    try:
        out = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if out is None or getattr(out, "weight", None) is None:
        return None
    w_u = out.weight.detach().float().cpu()
    norm = None
    for path in ("model.norm", "transformer.ln_f", "model.final_layernorm", "gpt_neox.final_layer_norm"):
        obj = model
        for name in path.split("."):
            obj = getattr(obj, name, None)
        w = getattr(obj, "weight", None)
        if isinstance(w, torch.Tensor) and w.shape == (w_u.shape[1],):
            norm = w.detach().float().cpu()
            break
    return w_u, norm


@torch.no_grad()
def logit_weights(
    directions: torch.Tensor, w_u: torch.Tensor, norm: torch.Tensor | None, *, top: int = LOGIT_TOP, chunk: int = 256
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """directions (m, d) in raw scale -> (promote ids, values, suppress ids, values), each (m, top): the largest and
    the smallest entries of (directions ⊙ norm) @ w_u^T (vocab,) per latent, computed `chunk` latents at a time."""
    top = min(top, w_u.shape[0])
    d = directions.float() * (norm if norm is not None else 1.0)
    pi, pv, ni, nv = [], [], [], []
    for s in range(0, d.shape[0], chunk):
        logits = d[s : s + chunk] @ w_u.T  # (c, vocab)
        v, i = torch.topk(logits, top, dim=1)
        pi.append(i), pv.append(v)
        v, i = torch.topk(logits, top, dim=1, largest=False)
        ni.append(i), nv.append(v)
    return torch.cat(pi), torch.cat(pv), torch.cat(ni), torch.cat(nv)


# -- the whole collection ---------------------------------------------------------------------------------------


def _language_model(spec: str) -> Any:
    from saekit.lm.models import load_model

    return load_model(spec)


def _check_collect_args(sae: Any, reader: RowReader, *, n_tokens: int, contexts: int, batch: int, skip_positions: int) -> tuple[int, int]:
    """Validate collect_from's arguments; (rows to scan, rows kept after skipping positions)."""
    if n_tokens < 1 or contexts < 1 or batch < 1:
        raise InputError("--tokens, --contexts and the batch size must be at least 1")
    if reader.d != sae.d:
        raise InputError(f"activations have d={reader.d} but the SAE expects d={sae.d}")
    if not 0 <= skip_positions < reader.window:
        raise InputError(f"skip_positions is {skip_positions} but the windows hold {reader.window} tokens")
    n = min(n_tokens, reader.n_rows)
    kept = kept_rows(n, reader.window, skip_positions)
    if kept == 0:
        raise InputError("no activation rows to scan")
    return n, kept


def _dashboard_logits(lm: Any, causal: bool, directions: torch.Tensor) -> tuple[Logits | None, list[str]]:
    """The logit weights of `directions` (m, d) when `lm` is a causal model with a matching unembedding, and the
    notes explaining why there are none otherwise."""
    notes: list[str] = []
    if lm is None:
        notes.append("The model was not loaded: tokens are shown as ids and there are no logit weights.")
        return None, notes
    if not causal:
        return None, notes
    unemb = unembedding(lm.model)
    if unemb is None:
        notes.append("The model has no output embedding: no logit weights.")
    elif unemb[0].shape[1] != directions.shape[1]:
        notes.append(f"The unembedding has width {unemb[0].shape[1]}, the activations {directions.shape[1]}: no logit weights.")
    else:
        return logit_weights(directions, *unemb), notes
    return None, notes


def _shown_token_ids(toks: torch.Tensor, logits: Logits | None) -> torch.Tensor:
    """Every token id the page shows, sorted: the context tokens and, when present, the logit-weight tokens."""
    used = [toks[toks >= 0]] + ([logits[0].reshape(-1), logits[2].reshape(-1)] if logits is not None else [])
    return torch.unique(torch.cat(used))


def _to_table(vocab_ids: torch.Tensor, ids: torch.Tensor) -> np.ndarray:
    """Token ids -> their index in the token table (`vocab_ids` is sorted and holds every id used); -1 stays -1."""
    pos = torch.searchsorted(vocab_ids, ids.clamp_min(0))
    return torch.where(ids >= 0, pos, torch.full_like(pos, -1)).numpy()


def _collect_meta(
    sae: Any,
    reader: RowReader,
    top: TopScan,
    dist: Distribution,
    *,
    rows_scanned: int,
    kept: int,
    input_scale: float,
    skip_positions: int,
    causal: bool,
    notes: list[str],
    meta: dict[str, Any] | None,
) -> dict[str, Any]:
    """The dashboard's "meta" entry: the caller's `meta` plus the scan's settings and summary statistics."""
    count = dist.count.numpy()
    return {
        **(meta or {}),
        "d": int(sae.d),
        "dict_size": int(sae.dict_size),
        "input_scale": float(input_scale),
        "n_tokens": kept,  # the frequencies' denominator: scanned rows less the skipped positions
        "rows_scanned": rows_scanned,
        "skip_positions": skip_positions,
        "window": int(reader.window),
        "causal": causal,
        "context_before": CONTEXT_BEFORE,
        "context_after": CONTEXT_AFTER,
        "scan": {
            "l0": float(count.sum() / kept),
            "fvu": top.fvu,
            "fvu_rows": top.fvu_rows,
            "dead_fraction": float((count == 0).mean()),
        },
        "notes": notes,
    }


def _scan(
    sae: Any,
    reader: RowReader,
    *,
    n_rows: int,
    contexts: int,
    batch: int,
    input_scale: float,
    skip_positions: int,
    norm_threshold: float,
) -> tuple[TopScan, Distribution]:
    """Both passes over the first `n_rows` rows of `reader`: the per-latent top contexts, then the distributions."""
    encode, decode = sae_functions(sae, input_scale)
    top = scan_top(
        reader, encode, decode, n_rows=n_rows, k=contexts, batch=batch, input_scale=input_scale, skip_positions=skip_positions,
        norm_threshold=norm_threshold,
    )  # fmt: skip
    rows = context_rows(top.top_rows, window=reader.window, n_rows=reader.n_rows, before=CONTEXT_BEFORE, after=CONTEXT_AFTER)
    dist = scan_distribution(reader, encode, top, rows, batch=batch, skip_positions=skip_positions, norm_threshold=norm_threshold)
    return top, dist


def _feature_arrays(top: TopScan, dist: Distribution, vocab_ids: torch.Tensor) -> dict[str, np.ndarray]:
    """The per-latent arrays of the dashboard data: firing counts, mean and max, histogram and top contexts."""
    count = dist.count.numpy()
    return {
        "count": count,
        "mean": np.where(count > 0, dist.total.numpy() / np.maximum(count, 1), 0.0),
        "max": top.max.numpy(),
        "hist": dist.hist.numpy(),
        "ctx_rows": top.top_rows.T.numpy(),
        "ctx_values": top.top_values.T.numpy(),
        "ctx_tokens": _to_table(vocab_ids, dist.ctx_tokens),
        "ctx_acts": dist.ctx_acts.numpy(),
    }


def _logit_arrays(logits: Logits | None, vocab_ids: torch.Tensor) -> dict[str, np.ndarray]:
    """The promoted and suppressed tokens and their logit weights, or nothing when there are no logit weights."""
    if logits is None:
        return {}
    return {
        "promote_tokens": _to_table(vocab_ids, logits[0]),
        "promote_values": logits[1].numpy(),
        "suppress_tokens": _to_table(vocab_ids, logits[2]),
        "suppress_values": logits[3].numpy(),
    }


@torch.no_grad()
def collect_from(
    sae: Any,
    reader: RowReader,
    *,
    n_tokens: int,
    contexts: int,
    batch: int = 4096,
    input_scale: float = 1.0,
    skip_positions: int = 0,
    norm_threshold: float = math.inf,
    lm: Any = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The dashboard data of member 0 of `sae` on the first `n_tokens` rows of `reader`, leaving out the first
    `skip_positions` positions of every window as the SAE's training did; `lm` (with .tokenizer, .model, .causal)
    gives token strings and, when causal, logit weights; without it tokens show as ⟨id⟩."""
    n, kept = _check_collect_args(sae, reader, n_tokens=n_tokens, contexts=contexts, batch=batch, skip_positions=skip_positions)
    top, dist = _scan(
        sae, reader, n_rows=n, contexts=contexts, batch=batch, input_scale=input_scale, skip_positions=skip_positions,
        norm_threshold=norm_threshold,
    )  # fmt: skip

    directions = sae.W_dec.detach()[0].float().cpu() / input_scale  # (m, d), raw activation scale
    causal = bool(getattr(lm, "causal", False)) if lm is not None else bool(reader.manifest.get("causal", False))
    logits, notes = _dashboard_logits(lm, causal, directions)
    vocab_ids = _shown_token_ids(dist.ctx_tokens, logits)
    info = _collect_meta(
        sae, reader, top, dist, rows_scanned=n, kept=kept, input_scale=input_scale, skip_positions=skip_positions,
        causal=causal, notes=notes, meta=meta,
    )  # fmt: skip
    return {
        "meta": info,
        "tokens": token_strings(getattr(lm, "tokenizer", None), vocab_ids.tolist()),
        **_feature_arrays(top, dist, vocab_ids),
        **_logit_arrays(logits, vocab_ids),
    }


def collect_dashboard(
    run_folder: Path,
    *,
    n_tokens: int,
    contexts: int,
    batch: int = 4096,
    lm: Any = None,
    train_metrics: dict[str, Any] | None = None,
    device: str | torch.device = "auto",
) -> dict[str, Any]:
    """The dashboard data of the SAE in `run_folder` (cfg.json + weights) on its activations folder; the model named
    in the activations' manifest is loaded for token strings and logit weights unless `lm` is given. The SAE runs
    on `device` ("auto": CUDA when present, else CPU); the model stays on the CPU."""
    from saekit.lm.shards import ShardReader

    run_folder = Path(run_folder)
    cfg = read_cfg(run_folder)
    source = (cfg.get("config") or {}).get("source") or {}
    if source.get("kind") != "activations" or not source.get("path"):
        raise InputError(f"{run_folder}: the run was not trained on language-model activations (source.kind is {source.get('kind')!r})")
    if len(cfg["seeds"]) != 1:
        raise InputError(f"{run_folder}: expected one SAE, the checkpoint holds {len(cfg['seeds'])}")
    scale = cfg.get("input_scale", 1.0)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not scale > 0:
        raise InputError(f"{run_folder / 'cfg.json'}: input_scale must be a positive number, got {scale!r}")
    skip = source.get("skip_positions", 0)
    if not isinstance(skip, int) or isinstance(skip, bool):
        raise InputError(f"{run_folder / 'cfg.json'}: source.skip_positions must be an integer, got {skip!r}")
    threshold = cfg.get("norm_threshold")  # raw-scale norm above which tokens were left out of training (None: none)
    if threshold is not None and (not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not threshold > 0):
        raise InputError(f"{run_folder / 'cfg.json'}: norm_threshold must be a positive number, got {threshold!r}")
    reader = ShardReader(source["path"])
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    sae = load_sae(run_folder, device=device).eval()
    manifest = reader.manifest
    if lm is None:
        lm = _language_model(str(manifest["model"]))
    meta = {
        "run_id": run_folder.name,
        "arch": cfg["arch"],
        "knob": ARCH_SPECS[cfg["arch"]].knob,
        "knob_value": cfg[ARCH_SPECS[cfg["arch"]].knob][0],
        "model": manifest.get("model_name") or manifest.get("model"),
        "layer": manifest.get("layer"),
        "site": manifest.get("site"),
        "train": train_metrics,
    }
    return collect_from(
        sae, reader, n_tokens=n_tokens, contexts=contexts, batch=batch, input_scale=float(scale), skip_positions=skip,
        norm_threshold=math.inf if threshold is None else float(threshold), lm=lm, meta=meta,
    )  # fmt: skip
