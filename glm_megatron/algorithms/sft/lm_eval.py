"""Loss and perplexity of a causal LM on held-out data, over every data-parallel rank.

The rows are dealt to data-parallel ranks in global eval batches; a last, short batch is filled
with copies of row 0 whose loss is masked, so every rank runs the same number of equally shaped
micro-batches (the MoE dispatcher and the pipeline need that). Perplexity is ``exp`` of the
token-mean loss over all supervised tokens.
"""

from __future__ import annotations

import math

import numpy as np
from megatron.core import parallel_state as ps

from ...engine.engine import Engine, sum_reports


def evaluate_lm(engine: Engine, batcher, forward_step, batch_size: int,
                max_samples: int | None = None) -> dict:
    n = len(batcher) if max_samples is None else min(len(batcher), max_samples)
    dp = ps.get_data_parallel_world_size()
    dp_rank = ps.get_data_parallel_rank()
    per_step = batch_size * dp
    totals = np.zeros(2)
    for start in range(0, n, per_step):
        rows = np.arange(start, start + per_step)
        filler = rows >= n
        rows = np.where(filler, 0, rows).reshape(dp, batch_size)
        filler = filler.reshape(dp, batch_size)
        length = batcher.step_length(rows.reshape(-1))
        mb = batcher.microbatch(rows[dp_rank], length, mask_rows=filler[dp_rank])
        reports = engine.eval_step([mb], forward_step)
        totals += sum_reports(reports, "lm loss").numpy()
    loss_sum, count = totals
    loss = loss_sum / max(count, 1.0)
    return {"eval_loss": float(loss), "eval_perplexity": float(math.exp(min(loss, 80.0))),
            "eval_tokens": float(count), "eval_samples": float(n)}
