"""Downstream loss: a causal model's next-token cross-entropy with one site's activations replaced.

The fraction of loss recovered, (CE_zero - CE_sae) / (CE_zero - CE_clean), is the field's usual
measure (SAELens, SAEBench, dictionary_learning): 1 when splicing the SAE's reconstruction into the
forward pass costs nothing, 0 when it is as bad as zeroing the site. It compares losses on the true next
tokens, so a reconstruction can score above 1 on a sample where its change happens to lower the loss; the KL
divergence KL(P_clean || P_sae) of the next-token distributions, averaged over the scored positions, is 0 only
when the model's predictions are unchanged. Positions before
`skip_positions` are left clean (they were not trained on) and are not scored; every other position p
predicts token p + 1. Tokens whose activation norm exceeds the source's norm threshold (massive
activations, left out of training) are left clean too, in the SAE's pass and in the zero-ablated one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from saekit.lm.models import LanguageModel
from saekit.lm.sites import replace

Splice = Callable[[torch.Tensor], torch.Tensor]  # (n, d) raw activations -> (n, d)


@torch.inference_mode()
def next_token_loss(
    lm: LanguageModel,
    windows: torch.Tensor,
    *,
    layer: int,
    site: str,
    splice: Splice | None = None,
    skip_positions: int = 1,
    batch_windows: int = 8,
) -> float:
    """Mean next-token cross-entropy (nats) over windows (N, T), positions skip_positions .. T-2 as predictors.

    With `splice`, the site's activations at positions >= skip_positions are replaced by splice(them).
    """
    device = next(lm.model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_windows):
        ids = windows[i : i + batch_windows].to(device)
        if splice is None:
            logits = lm.model(input_ids=ids, use_cache=False).logits
        else:
            with replace(lm, layer, site, _patch(splice, skip_positions)):
                logits = lm.model(input_ids=ids, use_cache=False).logits
        pred = logits[:, skip_positions:-1].float()
        target = ids[:, skip_positions + 1 :]
        total += F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="sum").item()
        count += target.numel()
    return total / max(count, 1)


@torch.inference_mode()
def spliced_losses(
    lm: LanguageModel,
    windows: torch.Tensor,
    splices: list[Splice],
    *,
    layer: int,
    site: str,
    skip_positions: int = 1,
    batch_windows: int = 8,
) -> list[tuple[float, float]]:
    """Per splice: (mean next-token cross-entropy, mean KL(P_clean || P_spliced)) in nats over the positions
    `next_token_loss` scores. The clean forward pass runs once per batch of windows, shared by every splice."""
    device = next(lm.model.parameters()).device
    ce_sums, kl_sums, count = [0.0] * len(splices), [0.0] * len(splices), 0
    for i in range(0, windows.shape[0], batch_windows):
        ids = windows[i : i + batch_windows].to(device)
        target = ids[:, skip_positions + 1 :].reshape(-1)
        clean = _log_probs(lm.model(input_ids=ids, use_cache=False).logits, skip_positions)
        for j, splice in enumerate(splices):
            with replace(lm, layer, site, _patch(splice, skip_positions)):
                spliced = _log_probs(lm.model(input_ids=ids, use_cache=False).logits, skip_positions)
            ce_sums[j] += F.nll_loss(spliced, target, reduction="sum").item()
            kl_sums[j] += F.kl_div(spliced, clean, reduction="sum", log_target=True).item()
        count += target.numel()
    return [(ce / max(count, 1), kl / max(count, 1)) for ce, kl in zip(ce_sums, kl_sums)]


def _log_probs(logits: torch.Tensor, skip_positions: int) -> torch.Tensor:
    """(B·P, V) float32 next-token log-probabilities at the scored positions skip_positions .. T-2."""
    pred = logits[:, skip_positions:-1].float()
    return F.log_softmax(pred.reshape(-1, pred.shape[-1]), dim=-1)


def _patch(splice: Splice, skip_positions: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A site replacement: positions >= skip_positions of (B, T, d) activations go through `splice`."""

    def patched(act: torch.Tensor) -> torch.Tensor:
        out = act.clone()
        kept = act[:, skip_positions:]
        out[:, skip_positions:] = splice(kept.reshape(-1, act.shape[-1])).reshape(kept.shape).to(act.dtype)
        return out

    return patched


def loss_recovered(ce_clean: float, ce_zero: float, ce_sae: float) -> float:
    """(CE_zero - CE_sae) / (CE_zero - CE_clean); NaN when zero-ablation costs nothing."""
    gap = ce_zero - ce_clean
    return (ce_zero - ce_sae) / gap if gap > 0 else float("nan")


def sae_splice(sae: Any, member: int, input_scale: float, norm_threshold: float = math.inf) -> Splice:
    """Raw activations -> member's reconstruction in raw scale, x_hat(x * s) / s; rows whose norm exceeds
    `norm_threshold` (massive activations the SAE was not trained on) pass through unchanged."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        x_hat, _ = sae(x * input_scale)
        out = x_hat[member] / input_scale
        keep = x.norm(dim=1) > norm_threshold
        out[keep] = x[keep]
        return out

    return fn


class DownstreamEvaluator:
    """Runs the clean and zero-ablated losses once, then each SAE member's spliced loss, on the same windows."""

    def __init__(
        self, lm: LanguageModel, windows: torch.Tensor, *, layer: int, site: str, skip_positions: int, norm_threshold: float = math.inf
    ) -> None:
        self.lm, self.windows, self.norm_threshold = lm, windows, norm_threshold
        self.kw = {"layer": layer, "site": site, "skip_positions": skip_positions}
        self.ce_clean = next_token_loss(lm, windows, **self.kw)
        self.ce_zero = next_token_loss(lm, windows, splice=self._zero, **self.kw)

    def _zero(self, x: torch.Tensor) -> torch.Tensor:
        """Zero ablation of the rows the SAE replaces (the massive ones stay, as they do for the SAE)."""
        return torch.where((x.norm(dim=1) > self.norm_threshold)[:, None], x, torch.zeros_like(x))

    def evaluate(self, sae: Any, input_scale: float) -> list[dict[str, float]]:
        """Per member: ce_clean, ce_zero, ce_sae, ce_loss_recovered, ce_delta (CE_sae - CE_clean), ce_eval_tokens and
        kl_div (mean KL(P_clean || P_sae) per scored token, nats)."""
        # each member alone: the ensemble's forward would reconstruct every member at every spliced pass
        splices = [sae_splice(sae.member(k), 0, input_scale, self.norm_threshold) for k in range(sae.n_members)]
        tokens = int(self.windows.shape[0] * (self.windows.shape[1] - 1 - self.kw["skip_positions"]))
        return [
            {
                "ce_clean": self.ce_clean,
                "ce_zero": self.ce_zero,
                "ce_sae": ce,
                "ce_delta": ce - self.ce_clean,
                "ce_loss_recovered": loss_recovered(self.ce_clean, self.ce_zero, ce),
                "ce_eval_tokens": tokens,
                "kl_div": kl,
            }
            for ce, kl in spliced_losses(self.lm, self.windows, splices, **self.kw)
        ]


def downstream_evaluator(source: Any, n_tokens: int) -> DownstreamEvaluator | None:
    """For a source of a causal language model's activations: its model loaded and the clean and zero-ablated
    losses measured on held-out windows of at least `n_tokens` tokens (train.ce_eval_tokens; 0 = off).
    None for other sources. Raises InputError when the model cannot be loaded (before training, when called then)."""
    manifest = getattr(source, "manifest", None)
    if manifest is None or not manifest.get("causal") or n_tokens == 0:
        return None
    from saekit.lm.models import load_model

    lm = load_model(str(manifest["model"]), device=source.device)
    windows = source.eval_token_windows(n_tokens)
    return DownstreamEvaluator(
        lm,
        windows,
        layer=int(manifest["layer"]),
        site=str(manifest["site"]),
        skip_positions=source.skip_positions,
        norm_threshold=source.norm_threshold,
    )
