"""Chunk operations of the token log-prob, in torch: the default CPU path.

Both work in place on one fp32 [tokens, vocab-chunk] buffer of *unscaled* logits `z` (the driver
reuses the buffer chunk after chunk, so the full [N, V] logits never exist). Passes over the
buffer are kept few and in-place because on CPU they, not the GEMMs, are what a chunk costs on
top of the matmul. `labels` are chunk-local target columns, -1 where the target is elsewhere.
"""

from __future__ import annotations

import torch


def _gather_target(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    hit = labels >= 0
    cols = labels.clamp(min=0).unsqueeze(1)
    return torch.where(hit, z.gather(1, cols).squeeze(1), torch.zeros((), dtype=z.dtype, device=z.device))


def chunk_stats(z, inv_temp, labels, want_entropy, scratch=None):
    """Per-row (m, s, w, t) of the scaled logits z * inv_temp; clobbers z."""
    if inv_temp != 1.0:
        z.mul_(inv_temp)
    m = z.amax(dim=1)
    t = _gather_target(z, labels)
    z.sub_(m.unsqueeze(1))
    if not want_entropy:
        s = z.exp_().sum(dim=1)
        return m, s, torch.zeros_like(s), t
    e = torch.exp(z, out=scratch) if scratch is not None else torch.exp(z)
    s = e.sum(dim=1)
    # sum_j e_j * (z_j - m) as a batched dot: no [n, vc] temporary.
    w = torch.bmm(e.unsqueeze(1), z.unsqueeze(2)).view(-1)
    return m, s, w, t


def chunk_grad(z, inv_temp, lse, ent, labels, g_lp, g_ent, want_entropy, scratch=None):
    """d(sum g_lp*logp + g_ent*entropy)/dz for unscaled logits z, written into z.

    With logp_j = z_j*inv_temp - lse and p_j = exp(logp_j):
      dlogp_target/dz_j = inv_temp * (1[j = target] - p_j)
      dH/dz_j           = -inv_temp * p_j * (logp_j + H)
    """
    if inv_temp != 1.0:
        z.mul_(inv_temp)
    z.sub_(lse.unsqueeze(1))  # z now holds logp
    if want_entropy:
        p = torch.exp(z, out=scratch) if scratch is not None else torch.exp(z)
        b = -g_ent * inv_temp
        a = b * ent - g_lp * inv_temp
        torch.addcmul(a.unsqueeze(1), z, b.unsqueeze(1), out=z)  # a + b * logp, in place
        z.mul_(p)
    else:
        z.exp_().mul_((-g_lp * inv_temp).unsqueeze(1))
    hit = labels >= 0
    rows = torch.nonzero(hit).squeeze(1)
    z[rows, labels[rows]] += g_lp[rows] * inv_temp
    return z
