"""Sparse sampling of a synthetic model (saekit.sources.synth_model): codes as (row, feature, value) entries.

Nothing here forms a dense (B, G) tensor. Features without a parent are drawn as Bernoulli positions
(geometric gaps between firings, `bernoulli_positions`); a child is drawn only in the rows where its
parent is on, so the cost follows the number of active features, not G. With a low-rank copula,
z_i = f_i . e + s_i * eta_i (s_i = sqrt(diag_i)) given the per-row factor draw e; features without a
parent use thinning: in a block of rows, eta_i > (t_i - max_row f_i . e) / s_i is necessary for firing,
those candidate rows are Bernoulli positions, eta is drawn from the normal tail above that bound,
and the exact test z_i > t_i keeps the ones that fire.

The order of operations is SAELens's (sae_lens.synthetic, ActivationGenerator.sample and its hierarchy
modifier): firing (copula or independent), magnitudes max(0, mean + std * N(0, 1)) (a 0 is off), then level
by level: a child survives only where its parent's value is > 0 (times parent value / parent mean where
rescaled), and among the surviving members of a mutually exclusive group one uniformly random winner
stays. Every random number comes from one CPU generator in a fixed order.

Sampling runs on one CPU thread (`one_thread`): its operations are many and small (about a hundred per batch,
none above a few million elements), so a thread pool adds little, and on a machine busy with other work
waiting for each pool's threads cost more than the work (a default-model batch of 4096 took 0.8-4.5 s with 2
threads and 0.16 s with 1 on this project's shared 2-core machine, 2026-12-06).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from saekit.sources.synth_model import SynthModel

ROW_BLOCK = 256  # rows per thinning block of the copula: smaller blocks give tighter bounds, more (feature, block) cells
CHUNK_ELEMENTS = 2**22  # (features x rows) of f . e held at once


@dataclass
class Entries:
    """Active codes of a batch: `rows` (n,), `feats` (n,) int64 and `values` (n,) float32 > 0, sorted by row."""

    rows: torch.Tensor
    feats: torch.Tensor
    values: torch.Tensor

    def dense(self, batch_size: int, n_features: int) -> torch.Tensor:
        """The codes as a dense (B, G) float32 tensor (0 where off)."""
        codes = torch.zeros(batch_size, n_features)
        codes[self.rows, self.feats] = self.values
        return codes


@contextmanager
def one_thread() -> Iterator[None]:
    """torch runs on one intra-op thread inside, as many as before after."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def bernoulli_positions(q: torch.Tensor, n: int, g: torch.Generator, ordered: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """For each i, the indices in [0, n) of an i.i.d. Bernoulli(q[i]) sequence of length n that come up 1.

    q (F,) float64 in [0, 1]. Returns (which (E,), pos (E,)) int64, sorted by (which, pos) when `ordered`.
    Gaps between successes are geometric: floor(log(U) / log(1 - q)) failures, U uniform on (0, 1]. Each
    feature draws mean + 2 sd + 2 gaps at first; the few whose draws all fall inside [0, n) draw again.
    """
    start = torch.zeros(q.shape[0], dtype=torch.float64)  # where each feature's sequence continues
    active = torch.nonzero(q > 0).flatten()
    out_which, out_pos = [], []
    while active.numel():
        left, qa = n - start[active], q[active]
        budget = (qa * left + 2 * (qa * (1 - qa) * left).sqrt() + 2).ceil().clamp(max=left + 1).long()
        u = torch.rand(int(budget.sum()), dtype=torch.float64, generator=g)
        # gaps + 1 between successes, summed within each feature's run (float64 holds these integers exactly)
        steps = (torch.log1p(-u) / torch.repeat_interleave(torch.log1p(-qa), budget)).floor_().clamp_(max=n + 1).add_(1).cumsum(0)
        ends = budget.cumsum(0) - 1
        before = torch.cat([torch.zeros(1, dtype=torch.float64), steps[ends[:-1]]])  # steps before each run
        pos = steps + torch.repeat_interleave(start[active] - 1 - before, budget)
        keep = pos < n
        out_which.append(torch.repeat_interleave(active, budget)[keep])
        out_pos.append(pos[keep].long())
        last = pos[ends]
        unfinished = last < n  # every drawn success fell inside: the sequence continues after `last`
        start[active[unfinished]] = last[unfinished] + 1
        active = active[unfinished]
    if not out_which:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    which, pos = torch.cat(out_which), torch.cat(out_pos)
    if ordered and len(out_which) > 1:  # later rounds appended after the first: restore (which, pos) order
        order = _argsort(which * (n + 1) + pos)
        which, pos = which[order], pos[order]
    return which, pos


def _argsort(keys: torch.Tensor) -> torch.Tensor:
    """A stable argsort of a 1-D int64 tensor on one thread (torch's parallel 1-D sort is slow on busy CPUs)."""
    return keys.view(1, -1).sort(dim=1, stable=True).indices.view(-1)


class SamplingPlan:
    """The tables sampling reads, made once from a model: thresholds, levels, group slots."""

    def __init__(self, model: SynthModel) -> None:
        self.G = model.n_features
        self.p = model.sampling_probs.double()
        self.mean, self.std = model.mean.float(), model.std.float()
        self.parent, self.rescale = model.parent, model.rescale & (model.parent >= 0)
        self.roots = torch.nonzero(model.parent < 0).flatten()
        depth = model.depth
        self.levels = []
        for level in range(1, int(depth.max()) + 1 if self.G else 1):
            children = torch.nonzero(depth == level).flatten()
            self.levels.append((children, model.parent[children]))
        self.slot, self.n_slots = _group_slots(model.group, model.parent)
        self.factor = None if model.factor is None else model.factor.float()
        if self.factor is not None:
            self.scale = model.diag.double().sqrt()  # s_i
            self.threshold = torch.special.ndtri(1 - self.p)  # t_i: fire when z_i > t_i (+inf when p = 0, -inf when p = 1)


def _group_slots(group: torch.Tensor, parent: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(G,) the slot of each feature's group among the groups sharing its parent (-1 outside any group), and
    the number of slots S (1 unless one parent holds several groups)."""
    slot = torch.full_like(group, -1)
    members = torch.nonzero(group >= 0).flatten()
    if not members.numel():
        return slot, 1
    pairs = torch.unique(torch.stack([parent[members], group[members]], dim=1), dim=0)  # sorted by parent, then group
    same = torch.cat([torch.tensor([False]), pairs[1:, 0] == pairs[:-1, 0]])
    run_start = torch.cummax(torch.where(same, 0, torch.arange(pairs.shape[0])), 0).values
    slot_of_group = torch.full((int(group.max()) + 1,), -1, dtype=torch.long)
    slot_of_group[pairs[:, 1]] = torch.arange(pairs.shape[0]) - run_start
    slot[members] = slot_of_group[group[members]]
    return slot, int(slot_of_group.max()) + 1


def _one_winner(keys: torch.Tensor, n_keys: int, g: torch.Generator) -> torch.Tensor:
    """(n,) bool: for each key value, one uniformly random entry among those holding it is True."""
    scores = torch.randperm(keys.shape[0], generator=g)
    best = torch.full((n_keys,), -1, dtype=torch.long).scatter_reduce(0, keys, scores, "amax")
    return scores == best[keys]


def _magnitudes(plan: SamplingPlan, feats: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """max(0, mean + std * N(0, 1)) for each entry's feature: (n,) float32."""
    noise = torch.randn(feats.shape[0], generator=g)
    return (plan.mean[feats] + plan.std[feats] * noise).clamp_min(0)


def _exclusive(
    plan: SamplingPlan, feats: torch.Tensor, parent_entry: torch.Tensor, n_parent_entries: int, g: torch.Generator
) -> torch.Tensor:
    """(n,) bool keep-mask: outside groups True; inside, one winner per (parent entry, group)."""
    slot = plan.slot[feats]
    member = slot >= 0
    keep = torch.ones(feats.shape[0], dtype=torch.bool)
    if bool(member.any()):
        keys = parent_entry[member] * plan.n_slots + slot[member]
        keep[member] = _one_winner(keys, n_parent_entries * plan.n_slots, g)
    return keep


def _root_firing(plan: SamplingPlan, B: int, eps: torch.Tensor | None, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Features without a parent: (rows, feats) where they fire, sorted by (feat, row)."""
    roots = plan.roots
    if eps is None:
        which, rows = bernoulli_positions(plan.p[roots], B, g)
        return rows, roots[which]
    F0 = roots.numel()
    chunk = max(ROW_BLOCK, CHUNK_ELEMENTS // max(1, F0) // ROW_BLOCK * ROW_BLOCK)  # rows whose f . e are held at once
    out_rows, out_which = [], []
    for first in range(0, B, chunk):
        rows, which = _thinned(plan, roots, eps[first : first + chunk], g)
        out_rows.append(rows + first)
        out_which.append(which)
    rows, which = torch.cat(out_rows), torch.cat(out_which)
    order = _argsort(which * B + rows)
    return rows[order], roots[which[order]]


def _thinned(plan: SamplingPlan, roots: torch.Tensor, eps: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Copula firing of parentless features over the rows of eps (b, r): (rows, index into roots), unordered.

    In each block of ROW_BLOCK rows, feature i can fire only where eta_i > (t_i - max over the block of f_i . e) / s_i;
    those candidate rows are Bernoulli positions with that tail's probability, eta is drawn from the tail, and
    s_i eta + f_i . e > t_i decides."""
    factor, scale, threshold = plan.factor[roots], plan.scale[roots], plan.threshold[roots]
    F0, b = roots.numel(), eps.shape[0]
    n_blocks = -(-b // ROW_BLOCK)
    mix = factor @ eps.T  # (F0, b): f_i . e per row
    padded = torch.nn.functional.pad(mix, (0, n_blocks * ROW_BLOCK - b), value=-math.inf)
    top = padded.view(F0, n_blocks, ROW_BLOCK).amax(dim=2).double()  # (F0, n_blocks)
    tail = torch.special.ndtr((top - threshold[:, None]) / scale[:, None]).view(-1)  # P(eta > bound) per (feature, block)
    cell, pos = bernoulli_positions(tail, ROW_BLOCK, g, ordered=False)
    which, rows = cell // n_blocks, cell % n_blocks * ROW_BLOCK + pos
    inside = rows < b
    cell, which, rows = cell[inside], which[inside], rows[inside]
    u = 1 - torch.rand(cell.shape[0], dtype=torch.float64, generator=g)
    eta = -torch.special.ndtri(u * tail[cell])  # N(0, 1) conditioned on eta > bound
    fire = scale[which] * eta + mix[which, rows].double() > threshold[which]
    return rows[fire], which[fire]


def _child_pairs(
    counts: torch.Tensor, starts: torch.Tensor, children: torch.Tensor, parents: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (child, active entry of its parent): (child (N,), parent entry index (N,)), child-major, rows ascending."""
    n = counts[parents]
    child = torch.repeat_interleave(children, n)
    offset = torch.repeat_interleave(starts[parents] - (n.cumsum(0) - n), n)
    return child, torch.arange(child.shape[0]) + offset


def _child_firing(
    plan: SamplingPlan, child: torch.Tensor, rows: torch.Tensor, eps: torch.Tensor | None, g: torch.Generator
) -> torch.Tensor:
    """(N,) bool: whether each child fires in its row (drawn afresh, independently of its parent given e)."""
    if eps is None:
        return torch.rand(child.shape[0], dtype=torch.float64, generator=g) < plan.p[child]
    eta = torch.randn(child.shape[0], dtype=torch.float64, generator=g)
    mix = torch.cat([(plan.factor[c] * eps[r]).sum(dim=1) for c, r in zip(child.split(65536), rows.split(65536))]) if child.numel() else eta
    return plan.scale[child] * eta + mix.double() > plan.threshold[child]


def sample_entries(plan: SamplingPlan, B: int, g: torch.Generator) -> Entries:
    """The active codes of a fresh batch of B samples, drawn with generator g."""
    eps = None if plan.factor is None else torch.randn(B, plan.factor.shape[1], generator=g)
    rows, feats = _root_firing(plan, B, eps, g)
    values = _magnitudes(plan, feats, g)
    on = values > 0  # a value of 0 is off: it neither counts nor competes in a mutually exclusive group
    rows, feats, values = rows[on], feats[on], values[on]
    keep = _exclusive(plan, feats, rows, B, g)  # groups of parentless features: one winner per row
    rows, feats, values = rows[keep], feats[keep], values[keep]
    all_rows, all_feats, all_values = [rows], [feats], [values]
    total = rows.shape[0]
    counts, starts = torch.zeros(plan.G, dtype=torch.long), torch.zeros(plan.G, dtype=torch.long)
    _index_level(counts, starts, feats, 0)
    for children, parents in plan.levels:
        flat_rows, flat_values = torch.cat(all_rows), torch.cat(all_values)
        child, parent_entry = _child_pairs(counts, starts, children, parents)
        child_rows = flat_rows[parent_entry]
        fire = _child_firing(plan, child, child_rows, eps, g)
        child, parent_entry, child_rows = child[fire], parent_entry[fire], child_rows[fire]
        values = _magnitudes(plan, child, g)
        on = values > 0
        child, parent_entry, child_rows, values = child[on], parent_entry[on], child_rows[on], values[on]
        scaled = plan.rescale[child]
        values[scaled] *= flat_values[parent_entry[scaled]] / plan.mean[plan.parent[child[scaled]]]
        keep = _exclusive(plan, child, parent_entry, total, g)
        all_rows.append(child_rows[keep])
        all_feats.append(child[keep])
        all_values.append(values[keep])
        _index_level(counts, starts, child[keep], total)
        total += int(keep.sum())
    rows, feats, values = torch.cat(all_rows), torch.cat(all_feats), torch.cat(all_values)
    order = _argsort(rows)
    return Entries(rows[order], feats[order], values[order])


def _index_level(counts: torch.Tensor, starts: torch.Tensor, feats: torch.Tensor, offset: int) -> None:
    """Record where each feature's entries of one level (sorted by feature) start in the flat arrays."""
    if not feats.numel():
        return
    present, n = torch.unique_consecutive(feats, return_counts=True)
    counts[present] = n
    starts[present] = offset + n.cumsum(0) - n


def decode(entries: Entries, batch_size: int, vectors: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x = codes @ vectors + bias without a dense product: (B, d) float32 on the vectors' device."""
    dev = vectors.device
    per_row = torch.bincount(entries.rows, minlength=batch_size)
    offsets = (per_row.cumsum(0) - per_row).to(dev)
    x = torch.nn.functional.embedding_bag(
        entries.feats.to(dev), vectors, offsets, mode="sum", per_sample_weights=entries.values.to(dev)
    )
    return x + bias
