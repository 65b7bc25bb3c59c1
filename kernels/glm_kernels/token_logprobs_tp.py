"""Tensor-parallel pieces of the vocab-parallel log-prob: shard offsets and the stats all-reduce.

Each rank holds a contiguous vocab shard [rank * Vs, (rank + 1) * Vs), the partition Megatron's
VocabParallelEmbedding / ColumnParallelLinear use. Per token a rank summarises its shard by
(m, s, w, t): the max scaled logit m, s = sum exp(z - m), w = sum exp(z - m) * (z - m) (for the
entropy) and the target logit t (zero unless the target is in the shard). Two all-reduces make
them global: MAX of m, then one SUM of the stacked, rescaled (s, w, t).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def tp_rank_world(group) -> tuple[int, int]:
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def rescale(m_from, s, w, m_to):
    """Re-express (s, w) accumulated against max m_from against a larger max m_to."""
    shift = m_from - m_to
    a = torch.exp(shift)
    return a * s, a * (w + shift * s)


def merge(acc, new):
    """Combine two partial (m, s, w, t) summaries of disjoint vocab ranges (online softmax)."""
    if acc is None:
        return new
    m1, s1, w1, t1 = acc
    m2, s2, w2, t2 = new
    m = torch.maximum(m1, m2)
    s1, w1 = rescale(m1, s1, w1, m)
    s2, w2 = rescale(m2, s2, w2, m)
    return m, s1 + s2, w1 + w2, t1 + t2


def allreduce_stats(stats, group):
    """Make per-shard (m, s, w, t) global across the TP group (no-op for TP=1)."""
    _, world = tp_rank_world(group)
    if world == 1:
        return stats
    m_loc, s, w, t = stats
    m = m_loc.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    s, w = rescale(m_loc, s, w, m)
    packed = torch.stack([s, w, t])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    return m, packed[0], packed[1], packed[2]


def finish(stats):
    """(lse, target logit, entropy) from global stats."""
    m, s, w, t = stats
    log_s = torch.log(s)
    return m + log_s, t, log_s - w / s
