"""Exact per-column counts of 0/1 masks through a matrix product (a bool tensor's sum over rows is slow on CPU),
built a bounded number of rows at a time so that a mask never costs more than CHUNK_ELEMENTS floats."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

EXACT_ROWS = 2**24  # float32 holds every integer up to 2^24: a sum of at most this many 0/1 values is exact
CHUNK_ELEMENTS = 2**24  # masks are built for at most this many elements at once (64 MB of float32)


def row_chunks(n_rows: int, row_width: int) -> Iterator[slice]:
    """Slices covering rows 0..n_rows in chunks of at most CHUNK_ELEMENTS / row_width rows (at least one)."""
    step = min(max(1, CHUNK_ELEMENTS // max(row_width, 1)), EXACT_ROWS)
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def column_counts(mask: torch.Tensor) -> torch.Tensor:
    """mask (K, B, m) of 0/1 values, float32 -> (K, m) int64: how many rows are 1 in each column."""
    K, B, m = mask.shape
    counts = torch.zeros(K, m, dtype=torch.long, device=mask.device)
    ones = torch.ones(K, 1, min(B, EXACT_ROWS), dtype=mask.dtype, device=mask.device)
    for start in range(0, B, EXACT_ROWS):
        part = mask[:, start : start + EXACT_ROWS]
        counts += torch.bmm(ones[:, :, : part.shape[1]], part)[:, 0].long()
    return counts


@contextmanager
def one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run the enclosed tensor operations on one CPU thread (restored afterwards; nothing changes on other devices).
    For the small, irregular gathers of the sparse counts: split across threads, they spend more time waiting
    for each other than working, most of all on a busy machine."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def fired(codes: torch.Tensor) -> torch.Tensor:
    """Where codes (..., m) are non-zero, as float32 0/1 (a latent fires where its code is non-zero)."""
    return (codes != 0).to(torch.float32)


def fire_counts(codes: torch.Tensor) -> torch.Tensor:
    """codes (K, B, m) -> (K, m) int64: on how many rows each latent fires."""
    K, B, m = codes.shape
    counts = torch.zeros(K, m, dtype=torch.long, device=codes.device)
    for rows in row_chunks(B, K * m):
        counts += column_counts(fired(codes[:, rows]))
    return counts


class Groups:
    """Items labelled with groups: labels (n,) int64 in [0, n_groups). `members(queries)` lists, for each queried
    group label, every item in that group, without building a (queries, n) table."""

    def __init__(self, labels: torch.Tensor, n_groups: int) -> None:
        self.order = torch.argsort(labels, stable=True)  # items sorted by group
        self.sizes = torch.bincount(labels, minlength=n_groups)
        self.starts = torch.cumsum(self.sizes, 0) - self.sizes  # where each group begins in `order`

    def members(self, queries: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(positions i in queries, items) with one pair per item of group queries[i], in chunks of at most
        CHUNK_ELEMENTS pairs (a single larger group is one chunk)."""
        ends = torch.cumsum(self.sizes[queries], 0)
        start = 0
        while start < len(queries):
            base = int(ends[start - 1]) if start else 0
            stop = max(start + 1, int(torch.searchsorted(ends, base + CHUNK_ELEMENTS, right=True)))
            yield self._expand(queries[start:stop], start)
            start = stop

    def _expand(self, queries: torch.Tensor, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        sizes = self.sizes[queries]
        position = torch.repeat_interleave(torch.arange(len(queries), device=queries.device), sizes)
        first = torch.cumsum(sizes, 0) - sizes
        within = torch.arange(len(position), device=queries.device) - first[position]
        return position + offset, self.order[self.starts[queries][position] + within]
