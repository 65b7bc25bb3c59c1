"""GAE as a Triton associative scan: one program per row (or packed segment).

Each program walks its row right to left in blocks of BLOCK steps. A block is loaded *reversed*
(time t = end - 1 - k) and scanned forward with the non-commutative combine of affine maps
x -> d + c*x; a forward scan on reversed data sidesteps the Triton issue reporting wrong results
for `associative_scan(reverse=True)` with non-commutative combines. The block's last value is the
carry into the next (earlier) block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _affine_combine(c1, d1, c2, d2):
    # (c1, d1) is the earlier-applied map (later time step), (c2, d2) the next one.
    return c1 * c2, d2 + c2 * d1


@triton.jit
def gae_kernel(
    r_ptr,
    v_ptr,
    m_ptr,
    nxt_ptr,
    adv_ptr,
    ret_ptr,
    starts_ptr,
    lens_ptr,
    gamma,
    gamma_lam,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    start = tl.load(starts_ptr + row)
    n = tl.load(lens_ptr + row)
    carry = tl.zeros((), tl.float32)
    for k0 in range(0, n, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        valid = k < n
        t = start + n - 1 - k
        r = tl.load(r_ptr + t, mask=valid, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + t, mask=valid, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + t, mask=valid, other=0).to(tl.float32)
        nxt = tl.load(nxt_ptr + t, mask=valid, other=0).to(tl.float32)
        # nxt is 0 at each row's last step, so this load never leaves the row.
        v_next = tl.load(v_ptr + t + 1, mask=valid & (nxt > 0), other=0.0).to(tl.float32)
        d = m * (r + gamma * v_next - v)
        c = gamma_lam * m * nxt
        cc, dd = tl.associative_scan((c, d), 0, _affine_combine)
        a = dd + cc * carry
        tl.store(adv_ptr + t, a, mask=valid)
        tl.store(ret_ptr + t, (a + v) * m, mask=valid)
        carry = tl.sum(tl.where(k == k0 + BLOCK - 1, a, 0.0), axis=0)


def gae_scan(r, v, m, nxt, gamma, lam, starts, lens):
    """Flat r, v (float), m, nxt (uint8) of one contiguous buffer; rows given by starts/lens."""
    adv = torch.empty(r.shape, dtype=torch.float32, device=r.device)
    ret = torch.empty_like(adv)
    if lens.numel() == 0:
        return adv, ret
    block = 1024 if r.is_cuda else 32  # the interpreter pays per element: keep blocks small
    gae_kernel[(lens.numel(),)](
        r, v, m, nxt, adv, ret, starts, lens, float(gamma), float(gamma * lam), BLOCK=block
    )
    return adv, ret
