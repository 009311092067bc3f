"""The data streams of a source: batch t of stream s is a pure function of (seed, s, t), so each use of the
data draws from its own stream and never sees another's batches."""

from __future__ import annotations

from enum import IntEnum


class Stream(IntEnum):
    """Which stream `Source.batch(batch_size, step, stream)` reads (the numbers seed generators: never change them)."""

    TRAIN = 0  # the training batches, batch t at step t
    EVAL = 1  # held-out evaluation samples
    RESAMPLE = 2  # candidate inputs for resampling dead latents
    BIAS_INIT = 3  # samples whose geometric median starts the decoder bias
