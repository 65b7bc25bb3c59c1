"""Chunk operations of the token log-prob as Triton kernels: the CUDA path.

Same contract as `token_logprobs_torch` (see there): the driver computes a [tokens, vocab-chunk]
fp32 logits tile with cuBLAS and these kernels make one fused pass over it, one program per row
(online max / sum-exp / entropy / target in the forward; softmax-gradient in the backward).
They also run under TRITON_INTERPRET=1 on CPU, which is how the test suite checks them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK_V = 1024


@triton.jit
def stats_kernel(
    z_ptr,
    stride_z,
    labels_ptr,
    n_cols,
    inv_temp,
    m_ptr,
    s_ptr,
    w_ptr,
    t_ptr,
    WANT_ENT: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    base = z_ptr + row.to(tl.int64) * stride_z
    label = tl.load(labels_ptr + row)
    # -1e30 rather than -inf: keeps (m_old - m_new) * s finite (= 0) on the first block.
    m = tl.full((), -1e30, tl.float32)
    s = tl.zeros((), tl.float32)
    w = tl.zeros((), tl.float32)
    t = tl.zeros((), tl.float32)
    for c0 in range(0, n_cols, BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V)
        valid = cols < n_cols
        z = tl.load(base + cols, mask=valid, other=0.0).to(tl.float32) * inv_temp
        m_new = tl.maximum(m, tl.max(tl.where(valid, z, -1e30), axis=0))
        shift = m - m_new
        a = tl.exp(shift)
        zs = tl.where(valid, z - m_new, 0.0)
        e = tl.where(valid, tl.exp(zs), 0.0)
        if WANT_ENT:
            w = a * (w + shift * s) + tl.sum(e * zs, axis=0)
        s = a * s + tl.sum(e, axis=0)
        m = m_new
        t += tl.sum(tl.where(cols == label, z, 0.0), axis=0)
    tl.store(m_ptr + row, m)
    tl.store(s_ptr + row, s)
    tl.store(w_ptr + row, w)
    tl.store(t_ptr + row, t)


@triton.jit
def grad_kernel(
    z_ptr,
    stride_z,
    labels_ptr,
    n_cols,
    inv_temp,
    lse_ptr,
    ent_ptr,
    glp_ptr,
    gent_ptr,
    WANT_ENT: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    base = z_ptr + row.to(tl.int64) * stride_z
    label = tl.load(labels_ptr + row)
    lse = tl.load(lse_ptr + row)
    g_lp = tl.load(glp_ptr + row) * inv_temp
    if WANT_ENT:
        b = -tl.load(gent_ptr + row) * inv_temp
        a = b * tl.load(ent_ptr + row) - g_lp
    for c0 in range(0, n_cols, BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V)
        valid = cols < n_cols
        logp = tl.load(base + cols, mask=valid, other=0.0).to(tl.float32) * inv_temp - lse
        p = tl.exp(logp)
        if WANT_ENT:
            g = p * (a + b * logp)
        else:
            g = -g_lp * p
        g += tl.where(cols == label, g_lp, 0.0)
        tl.store(base + cols, g, mask=valid)


def _block(n_cols: int) -> int:
    return min(_BLOCK_V, triton.next_power_of_2(max(n_cols, 16)))


def chunk_stats(z, inv_temp, labels, want_entropy, scratch=None):
    n, vc = z.shape
    out = torch.empty(4, n, dtype=torch.float32, device=z.device)
    stats_kernel[(n,)](
        z,
        z.stride(0),
        labels,
        vc,
        float(inv_temp),
        out[0],
        out[1],
        out[2],
        out[3],
        WANT_ENT=bool(want_entropy),
        BLOCK_V=_block(vc),
    )
    return out[0], out[1], out[2], out[3]


def chunk_grad(z, inv_temp, lse, ent, labels, g_lp, g_ent, want_entropy, scratch=None):
    n, vc = z.shape
    g_ent = g_ent if want_entropy else g_lp  # unread when WANT_ENT is False
    grad_kernel[(n,)](
        z,
        z.stride(0),
        labels,
        vc,
        float(inv_temp),
        lse.contiguous(),
        ent.contiguous(),
        g_lp.contiguous(),
        g_ent.contiguous(),
        WANT_ENT=bool(want_entropy),
        BLOCK_V=_block(vc),
    )
    return z
