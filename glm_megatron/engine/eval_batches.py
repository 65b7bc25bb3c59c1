"""Rows dealt to the data-parallel ranks for a pass over a whole split (evaluation, scoring).

The first ``n`` rows go out in global batches of ``batch_size`` rows per data-parallel rank; a
short last batch is filled with copies of row 0, flagged as filler so that they count for
nothing. Every rank runs the same number of micro-batches, and every micro-batch of one global
batch has one length (Megatron's pipeline sends fixed shapes and the MoE all-gather dispatcher
needs equal token counts on every expert-parallel rank).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from megatron.core import parallel_state as ps


def dealt_batches(batcher, batch_size: int, n: int) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """For each global batch: (this rank's row indices, their filler flags, the padded length)."""
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per_step = batch_size * dp
    for start in range(0, n, per_step):
        rows = np.arange(start, start + per_step)
        filler = rows >= n
        rows = np.where(filler, 0, rows)
        length = batcher.step_length(rows)
        rows, filler = rows.reshape(dp, batch_size), filler.reshape(dp, batch_size)
        yield rows[dp_rank], filler[dp_rank], length
