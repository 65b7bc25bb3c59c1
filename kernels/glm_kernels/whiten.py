"""Advantage whitening over response tokens, optionally across data-parallel ranks.

Mean and variance are taken over the masked-in tokens of the whole batch -- of every rank in
`group` when one is given, so each DP rank whitens with the same global statistics instead of
its own micro-batch's. Two all-reduces (sum/count, then sum of squared deviations) in fp64: the
one-pass E[x^2] - E[x]^2 form loses precision when |mean| >> std. The variance is unbiased
(Bessel), as verl's masked_whiten.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def whiten_advantages(adv, mask, *, group=None, shift_mean=True, eps=1e-8):
    """(adv - mean) / sqrt(var + eps) on masked-in tokens (mean added back if not shift_mean);
    masked-out tokens are 0."""
    if adv.shape != mask.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != advantages shape {tuple(adv.shape)}")
    m = mask.to(torch.float64)
    x = adv.to(torch.float64)
    sums = torch.stack([(x * m).sum(), m.sum()])
    if group is not None:
        dist.all_reduce(sums, group=group)
    total, count = sums[0], sums[1]
    if count.item() == 0:
        raise ValueError("whitening needs at least one masked-in token (mask is all zero)")
    mean = total / count
    sq = ((x - mean) ** 2 * m).sum()
    if group is not None:
        dist.all_reduce(sq, group=group)
    var = sq / torch.clamp(count - 1, min=1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return (out * m).to(adv.dtype)
