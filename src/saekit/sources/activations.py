"""A language model's activations from disk: shards written by `saekit activations`, served through a shuffle buffer.

The folder's windows are split in two: the last `eval_fraction` of them are held out (the evaluation
stream reads them in order, and the downstream-loss evaluation runs the model on their tokens); the
rest feed training. The first `skip_positions` positions of every window are left out of both (position
0 of a causal model is an attention sink whose norm is about 100 times the others'), and so is any token
whose activation norm exceeds `max_norm_ratio` times the median norm (`norm_threshold`): such massive
activations also occur a few positions later (on SmolLM2's layer 15, 0.05% of tokens, mostly at positions
1-2, hold 86% of the squared norm) and would otherwise dominate the scale, the loss and the FVU. Batches are
therefore a few rows short of `batch_size` when they drew such a token.

Training batches come from a shuffle buffer of `buffer_size` rows: the training rows are read in
chunks (whole windows, in a seeded order per epoch), and each batch takes B random rows of the buffer
and refills their slots with the next rows read. Batch t of the stream is a pure function of (seed, t):
a request for any other step than the next one replays the buffer's bookkeeping on row indices alone
(no data read) and then loads the buffer's rows, so a resumed sweep sees exactly the batches it would
have seen. With `normalize`, every batch is multiplied by `input_scale` = sqrt(d / E||x||²), measured
on a spread sample of the training rows; the scale is recorded with each SAE.

In data-parallel training (`shard` = (rank, N)) a source trains only on the windows of the shard files
i with i % N == rank (its own shuffle buffer over them); the held-out windows, the norm threshold and the
scale stay those of the whole folder (measured by rank 0, given to the others as `norms`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from saekit.errors import InputError
from saekit.sources.seeding import seeded_generator
from saekit.sources.streams import Stream

_ORDER_SALT, _DRAW_SALT, _RANDOM_SALT = 0x6F72, 0x6472, 0x726E
CHUNK_TOKENS = 16_384  # training rows are read in chunks of whole windows of about this many tokens
SCALE_SAMPLE_ROWS = 65_536  # rows (in 16 spread chunks) that set the normalising scale


class _Buffer:
    """The shuffle buffer of one stream: which training rows it holds, and (when loaded) their data."""

    def __init__(self, source: ActivationSource) -> None:
        self.src = source
        self.draws = seeded_generator(source.seed, _DRAW_SALT)
        self.epoch, self.chunk, self.offset = 0, 0, 0  # the next training row to read
        self.incoming: torch.Tensor = torch.empty(0, dtype=torch.long)  # row ids of the current chunk not yet read
        self.rows = self._take(source.buffer_rows)  # (S,) training-row ids held
        self.data: torch.Tensor | None = None  # (S, d) float32 once loaded
        self.step = 0  # the batch it gives next

    def _take(self, n: int) -> torch.Tensor:
        """The next n training-row ids of the epoch-ordered chunk stream."""
        parts, need = [], n
        while need > 0:
            if self.incoming.numel() == 0:
                self.incoming = self.src.chunk_rows(self.epoch, self.chunk)
                self.chunk += 1
                if self.chunk == self.src.n_chunks:
                    self.epoch, self.chunk = self.epoch + 1, 0
            part, self.incoming = self.incoming[:need], self.incoming[need:]
            parts.append(part)
            need -= part.numel()
        return torch.cat(parts)

    def advance(self, batch_size: int, with_data: bool) -> torch.Tensor | None:
        """Give batch `self.step` (B, d) when `with_data`, else only update the bookkeeping."""
        slots = torch.randperm(self.rows.numel(), generator=self.draws)[:batch_size]
        new_rows = self._take(slots.numel())
        out = None
        if with_data:
            assert self.data is not None
            out = self.data[slots].clone()
            self.data[slots] = self.src.read_training_rows(new_rows)
        self.rows[slots] = new_rows
        self.step += 1
        return out

    def load(self) -> None:
        self.data = self.src.read_training_rows(self.rows)


class ActivationSource:
    """Activation shards as a Source: `d`, `ground_truth` (None), `batch(batch_size, step, stream)` -> (B, d) float32."""

    ground_truth = None

    def __init__(
        self,
        path: str | Path,
        *,
        buffer_size: int = 100_000,
        skip_positions: int = 1,
        max_norm_ratio: float = 10.0,
        normalize: bool = True,
        eval_fraction: float = 0.05,
        seed: int = 0,
        device: str | torch.device = "cpu",
        shard: tuple[int, int] | None = None,
        norms: tuple[float, float] | None = None,
    ) -> None:
        from saekit.lm.shards import ShardReader

        self.path = Path(path)
        self.reader = ShardReader(self.path)
        self.manifest: dict[str, Any] = self.reader.manifest
        self.d, self.window = self.reader.d, self.reader.window
        self.seed, self.device = seed, torch.device(device)
        if not 0 <= skip_positions < self.window:
            raise InputError(f"source.skip_positions is {skip_positions} but the windows hold {self.window} tokens")
        self.skip_positions = skip_positions
        self.kept_per_window = self.window - skip_positions
        n_windows = self.reader.n_rows // self.window
        if n_windows < 2:
            raise InputError(f"{self.path}: {n_windows} window(s) of activations; at least 2 are needed (one held out)")
        self.eval_windows = min(n_windows - 1, max(1, round(eval_fraction * n_windows)))
        self.eval_start = n_windows - self.eval_windows  # the first held-out window
        self.eval_rows = self.eval_windows * self.kept_per_window
        self.windows_per_chunk = max(1, CHUNK_TOKENS // self.window)
        self.shard = shard
        self._window_ids: torch.Tensor | None = None  # training window j -> window of the folder (None: j itself)
        self._set_training_windows(self.eval_start)
        # measured on all training windows (or given: rank 0's measurement), so every rank scales alike
        self.norm_threshold, self.input_scale = norms if norms is not None else self._measure_norms(max_norm_ratio, normalize)
        if shard is not None:
            self._restrict_to_shard_files(*shard)
        self.buffer_rows = min(buffer_size, self.train_rows)
        self._buffer: _Buffer | None = None
        self._eval_kept: int | None = None

    # -- row bookkeeping ------------------------------------------------------------------------------

    def _set_training_windows(self, n: int) -> None:
        self.train_windows = n
        self.train_rows = n * self.kept_per_window
        self.n_chunks = math.ceil(n / self.windows_per_chunk)

    def _restrict_to_shard_files(self, rank: int, world_size: int) -> None:
        """Train only on the windows of shard files i with i % world_size == rank (held-out windows stay held out)."""
        starts = self.reader._starts
        ids = [
            w
            for i in range(rank, len(starts) - 1, world_size)
            for w in range(starts[i] // self.window, min(starts[i + 1] // self.window, self.eval_start))
        ]
        if not ids:
            raise InputError(
                f"{self.path}: rank {rank} of {world_size} has no training windows in its shard files (every {world_size}th of "
                f"{len(starts) - 1} from shard {rank}); write more shards or start fewer processes"
            )
        self._window_ids = torch.tensor(ids, dtype=torch.long)
        self._set_training_windows(len(ids))

    @property
    def norms(self) -> tuple[float, float]:
        """(norm_threshold, input_scale), to give to the sources of other ranks."""
        return self.norm_threshold, self.input_scale

    def global_rows(self, rows: torch.Tensor, first_window: int = 0) -> torch.Tensor:
        """Rows counted over kept positions (from window `first_window` on) -> rows of the shards."""
        return (first_window + rows // self.kept_per_window) * self.window + self.skip_positions + rows % self.kept_per_window

    def chunk_rows(self, epoch: int, chunk: int) -> torch.Tensor:
        """Training-row ids of chunk number `chunk` in epoch `epoch`'s seeded chunk order."""
        order = torch.randperm(self.n_chunks, generator=seeded_generator(self.seed, _ORDER_SALT, epoch))
        c = int(order[chunk])
        w0, w1 = c * self.windows_per_chunk, min((c + 1) * self.windows_per_chunk, self.train_windows)
        return torch.arange(w0 * self.kept_per_window, w1 * self.kept_per_window)

    def _read_global(self, rows: torch.Tensor) -> torch.Tensor:
        """Shard rows (any order) -> (n, d) float32, reading each touched span of windows once."""
        out = torch.empty(rows.numel(), self.d)
        if rows.numel() == 0:
            return out
        order = torch.argsort(rows)
        sorted_rows = rows[order]
        span = self.windows_per_chunk * self.window  # read in window-aligned spans of about a chunk
        starts = sorted_rows // span
        boundaries = torch.nonzero(starts[1:] != starts[:-1]).flatten() + 1
        for lo, hi in zip([0, *boundaries.tolist()], [*boundaries.tolist(), rows.numel()]):
            first = int(sorted_rows[lo])
            last = int(sorted_rows[hi - 1])
            block = self.reader.read(first, last + 1)
            out[order[lo:hi]] = block[sorted_rows[lo:hi] - first]
        return out

    def read_training_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Training-row ids -> (n, d) float32, unscaled."""
        if self._window_ids is None:
            return self._read_global(self.global_rows(rows))
        windows = self._window_ids[rows // self.kept_per_window]
        return self._read_global(windows * self.window + self.skip_positions + rows % self.kept_per_window)

    def _measure_norms(self, max_norm_ratio: float, normalize: bool) -> tuple[float, float]:
        """(norm_threshold, input_scale) from up to SCALE_SAMPLE_ROWS training rows read in 16 spread chunks:
        the threshold is max_norm_ratio x their median norm (inf when 0), the scale sqrt(d / mean ||x||²) over
        the rows below it (1 without `normalize`)."""
        n_parts = 16
        per_part = max(1, min(SCALE_SAMPLE_ROWS, self.train_rows) // n_parts)
        starts = torch.linspace(0, self.train_rows - per_part, n_parts).long().unique()
        rows = torch.cat([torch.arange(s, s + per_part) for s in starts.tolist()])
        x = self.read_training_rows(rows)
        if not torch.isfinite(x).all():
            raise InputError(f"{self.path}: activations contain NaN/Inf values")
        norms = x.double().norm(dim=1)
        threshold = max_norm_ratio * norms.median().item() if max_norm_ratio > 0 else math.inf
        kept = norms[norms <= threshold]
        mean_sq = kept.pow(2).mean().item() if kept.numel() else 0.0
        if mean_sq <= 0:
            raise InputError(f"{self.path}: activations are all zero")
        return threshold, (math.sqrt(self.d / mean_sq) if normalize else 1.0)

    @property
    def eval_rows_kept(self) -> int:
        """Held-out rows below the norm threshold: how many the evaluation stream gives before it wraps."""
        if self._eval_kept is None:
            kept, step = 0, 65_536
            for start in range(0, self.eval_rows, step):
                rows = torch.arange(start, min(start + step, self.eval_rows))
                kept += int(self.ordinary(self._read_global(self.global_rows(rows, first_window=self.eval_start))).sum())
            self._eval_kept = kept
        return self._eval_kept

    def ordinary(self, x: torch.Tensor) -> torch.Tensor:
        """(n,) bool: raw rows x (n, d) whose norm is within the threshold (not a massive activation)."""
        return x.norm(dim=1) <= self.norm_threshold

    # -- the Source interface -------------------------------------------------------------------------

    def _scaled(self, x: torch.Tensor, what: str) -> torch.Tensor:
        """Raw rows -> the ordinary ones, scaled, on the device."""
        if not torch.isfinite(x).all():
            raise InputError(f"{self.path}: {what} contains NaN/Inf values")
        return (x[self.ordinary(x)] * self.input_scale).to(self.device)

    def batch(self, batch_size: int, step: int, stream: int = Stream.TRAIN) -> torch.Tensor:
        """Stream.TRAIN: batch `step` of the shuffle buffer; Stream.EVAL: held-out rows in order (wrapping);
        other streams: `batch_size` random training rows seeded by (stream, step). Rows above the norm threshold
        are dropped, so a batch may be a few rows short."""
        if stream == Stream.TRAIN:
            return self._scaled(self._training_batch(batch_size, step), f"training batch {step}")
        if stream == Stream.EVAL:
            start = (step * batch_size) % self.eval_rows
            rows = (torch.arange(start, start + batch_size)) % self.eval_rows
            return self._scaled(self._read_global(self.global_rows(rows, first_window=self.eval_start)), "held-out rows")
        g = seeded_generator(self.seed, _RANDOM_SALT, stream, step)
        rows = torch.randint(self.train_rows, (batch_size,), generator=g)
        return self._scaled(self.read_training_rows(rows), f"random batch {step}")

    def _training_batch(self, batch_size: int, step: int) -> torch.Tensor:
        buf = self._buffer
        if buf is None or buf.step > step:
            buf = self._buffer = _Buffer(self)
        if buf.step < step:  # replay on row ids only (a resume, or a step skipped), then reload the buffer
            buf.data = None
            while buf.step < step:
                buf.advance(batch_size, with_data=False)
        if buf.data is None:
            buf.load()
        out = buf.advance(batch_size, with_data=True)
        assert out is not None
        return out

    def eval_token_windows(self, n_tokens: int) -> torch.Tensor:
        """Token ids (N, window) of the first held-out windows holding at least `n_tokens` kept positions."""
        n = min(self.eval_windows, max(1, math.ceil(n_tokens / self.kept_per_window)))
        start = self.eval_start * self.window
        return self.reader.token_ids(start, start + n * self.window).view(n, self.window)

    def describe(self) -> dict[str, Any]:
        """What the source says of itself (OUT/source.json)."""
        m = self.manifest
        return {
            "kind": "activations",
            "path": str(self.path),
            **{key: m.get(key) for key in ("model", "model_class", "causal", "layer", "site", "window", "dtype", "text", "tokens")},
            "d": self.d,
            "input_scale": self.input_scale,
            "skip_positions": self.skip_positions,
            "norm_threshold": self.norm_threshold if math.isfinite(self.norm_threshold) else None,
            "train_windows": self.train_windows,
            **({} if self.shard is None else {"shard": list(self.shard)}),
            "eval_windows": self.eval_windows,
            "train_rows": self.train_rows,
            "eval_rows": self.eval_rows,
            "buffer_rows": self.buffer_rows,
        }
