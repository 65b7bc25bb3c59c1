"""GAE on CPU as one native pass per row (numba), the CPU default of `compute_gae`.

Why numba: GAE is memory-bound. One backward walk over a row reads r, v, m once and writes adv,
ret once, so it costs about what copying the inputs costs. Torch eager can only express the
recurrence as whole-tensor ops (see gae_torch.py), which is ~8 passes over memory however they are
blocked. Rows (or packed segments) are independent, so they are spread over threads with prange.

Same semantics as gae.py's docstring: "next valid" (m_{t+1}, inside the row / segment) is derived
on the fly while walking t backwards; a masked-out position writes 0 to both outputs and resets
the carried A and bootstrap value, so nothing flows across it. Arithmetic is in the output dtype
(fp32 or fp64); mask bytes are read as they are, no float mask and no "next valid" array.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

_NUMBA_THREADS = numba.config.NUMBA_NUM_THREADS
# Only fused multiply-add: the loop is bound by the latency of the A_t <- A_{t+1} chain, and an
# FMA halves it (and rounds once instead of twice). No reassociation, NaN or inf assumptions.
_FM = {"contract"}


@numba.njit(inline="always", fastmath=_FM)
def _segment(r, v, m, s, e, gamma, gl, adv, ret):
    zero = gamma - gamma  # 0 of the arithmetic dtype (gamma * 0 would be fp64 for fp32 gamma)
    a = zero  # A_{t+1}, already 0 when t+1 is masked out or past the segment end
    gv = zero  # gamma * V_{t+1} * m_{t+1}
    for j in range(e - s):
        t = numba.uint64(e - 1 - j)  # unsigned: no negative-index wraparound code per access
        if m[t]:  # r and v are only read under the mask (padding costs only the mask byte)
            vt = v[t]
            a = (r[t] + gv - vt) + gl * a
            adv[t] = a
            ret[t] = a + vt
            gv = gamma * vt
        else:
            a = zero
            gv = zero
            adv[t] = zero
            ret[t] = zero


@numba.njit(parallel=True, cache=True, fastmath=_FM)
def _gae_rows(r, v, m, B, T, gamma, gl, adv, ret):
    """Flat [B*T] arrays holding B rows of length T; m is uint8."""
    for b in numba.prange(B):
        _segment(r, v, m, b * T, b * T + T, gamma, gl, adv, ret)


@numba.njit(parallel=True, cache=True, fastmath=_FM)
def _gae_packed(r, v, m, cu, gamma, gl, adv, ret):
    """1-D arrays; segment k is [cu[k], cu[k+1])."""
    for k in numba.prange(cu.shape[0] - 1):
        _segment(r, v, m, cu[k], cu[k + 1], gamma, gl, adv, ret)


def gae_numba(r, v, m, gamma, lam, cu_seqlens=None):
    """r, v: CPU float tensors of the output dtype (fp32 / fp64); m: bool tensor of the same shape.
    Returns (adv, ret) new tensors of r's dtype and shape."""
    r, v = r.detach().contiguous(), v.detach().contiguous()
    mu8 = m.detach().contiguous().view(torch.uint8)  # bool storage read as bytes, no copy
    adv, ret = torch.empty_like(r), torch.empty_like(r)
    scalar = np.float32 if r.dtype == torch.float32 else np.float64
    g, gl = scalar(gamma), scalar(gamma * lam)
    numba.set_num_threads(max(1, min(torch.get_num_threads(), _NUMBA_THREADS)))
    arrs = [x.view(-1).numpy() for x in (r, v, mu8)]
    outs = [x.view(-1).numpy() for x in (adv, ret)]
    if cu_seqlens is None:
        _gae_rows(*arrs, r.shape[0], r.shape[1], g, gl, *outs)
    else:
        cu = cu_seqlens.detach().to(device="cpu", dtype=torch.int64).contiguous().numpy()
        _gae_packed(*arrs, cu, g, gl, *outs)
    return adv, ret
