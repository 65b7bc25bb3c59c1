"""GAE on CPU in vectorised torch: A_t = d_t + c_t * A_{t+1}, with c_t = gamma*lam or 0.

Two exact paths, no exp/log or 1/(gamma*lam)^t rescaling, so both are stable for any gamma, lambda
and length:

* Right-padded rows (every mask row is a prefix of ones: variable lengths, the common PPO batch).
  Within a row nothing resets before the padding, where d = 0, so A is the discounted suffix sum
  of d with the constant factor k = gamma*lam. That is computed blockwise as a GEMM with the
  [L, L] matrix M[s, j] = k^(s-j) (s >= j), and block starts are fixed up by the same operation
  applied recursively to the block-start values with factor k^L: a handful of full-width passes
  and no Python loop over time.
* Anything else (holes inside a response, packed segments): a two-level blocked scan. Level 1
  walks the L positions of every block at once (time-major, so each step is one wide contiguous
  op), level 2 walks the T/L blocks on [rows] vectors, one pass adds suffix-product * carry:
  L + T/L Python steps instead of T.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _block_len(T: int) -> int:
    # ~sqrt(T) balances the two python loops; at least 8 so each step is a wide op.
    return max(8, 1 << max(0, round(math.log2(max(T, 1)) / 2)))


# 32 keeps the block GEMM (2*L flops per element) cheaper than a memory pass on CPU.
_GEMM_BLOCK = 32


def _suffix_matrix(k: float, n: int, dtype) -> torch.Tensor:
    """M[s, j] = k^(s - j) for s >= j, else 0 (built in fp64; tiny powers underflow to 0)."""
    idx = torch.arange(n, dtype=torch.float64)
    diff = idx[:, None] - idx[None, :]
    return torch.where(diff >= 0, torch.pow(k, diff.clamp(min=0)), 0.0).to(dtype)


def discounted_suffix_sum(x: torch.Tensor, k: float) -> torch.Tensor:
    """y_t = sum_{s >= t} k^(s-t) x_s along the last dim of [R, n], by blocked GEMMs."""
    R, n = x.shape
    L = min(n, _GEMM_BLOCK)
    nC = -(-n // L)
    if nC * L != n:
        x = F.pad(x, (0, nC * L - n))
    y = (x.reshape(-1, L) @ _suffix_matrix(k, L, x.dtype)).view(R, nC, L)
    if nC > 1:
        # True value at each block start = local start + k^L * true value at the next start.
        starts = discounted_suffix_sum(y[:, :, 0].contiguous(), k**L)
        decay = torch.pow(k, torch.arange(L, 0, -1, dtype=torch.float64)).to(x.dtype)  # k^(L-j)
        y[:, :-1].addcmul_(starts[:, 1:, None], decay)
    y = y.view(R, nC * L)
    return y[:, :n] if nC * L != n else y


def right_padded(mf: torch.Tensor) -> bool:
    """True when every row of the 0/1 float mask is ones then zeros.

    A set of n positions has the smallest possible position sum, n(n-1)/2, exactly when it is
    {0, ..., n-1}. The sums come from one GEMM against [T, 3] columns (t // b, t % b, 1) with
    b = ceil(sqrt(T)): all partial sums stay integers below 2^24, so fp32 is exact, and the
    check costs one read of the mask (bool reductions in torch are several times slower).
    """
    R, T = mf.shape
    if T == 0 or R == 0:
        return True
    if T > 1 << 16:  # the fp32 exactness argument above needs T^1.5 < 2^24
        m = mf.bool()
        return not bool((m[:, 1:] & ~m[:, :-1]).any())
    base = math.isqrt(T - 1) + 1
    t = torch.arange(T)
    cols = torch.stack([t // base, t % base, torch.ones_like(t)], dim=1).to(mf.dtype)
    hi, lo, n = (mf @ cols).double().unbind(dim=1)
    return bool(torch.equal(hi * base + lo, n * (n - 1) / 2))


def gae_right_padded(r, v, mf, gamma, lam):
    """Fast path; mf 0/1 [R, T] (dtype of r) with right-padded rows (so nxt_t = m_{t+1})."""
    d = torch.sub(r, v)
    d[:, :-1].addcmul_(v[:, 1:], mf[:, 1:], value=gamma)
    d.mul_(mf)
    adv = discounted_suffix_sum(d, gamma * lam)  # zero on the padding: only zeros follow it
    # returns = (A + V) * m = A + V * m as A is already 0 there; reuse d's memory for it.
    return adv, torch.addcmul(adv, v, mf, out=d)


def gae_scan(r, v, m, nxt, gamma, lam):
    """r, v float [R, T]; m, nxt bool [R, T] (nxt_t: t+1 is valid and in the same segment)."""
    R, T = r.shape
    L = _block_len(T)
    nC = -(-T // L)
    pad = nC * L - T
    if pad:  # trailing zeros do not change a right-to-left recurrence
        r, v = F.pad(r, (0, pad)), F.pad(v, (0, pad))
        m, nxt = F.pad(m, (0, pad)), F.pad(nxt, (0, pad))
    Tp = nC * L
    dtype = r.dtype
    # d_t = m_t * (r_t - v_t + gamma * nxt_t * v_{t+1}); written straight into the time-major
    # [L, R, nC] layout through a strided view, so the layout change costs no extra pass.
    d_tm = torch.empty(L, R, nC, dtype=dtype)
    delta = torch.sub(r, v)
    delta[:, :-1].add_(torch.where(nxt[:, :-1], v[:, 1:], 0.0), alpha=gamma)
    torch.mul(delta.view(R, nC, L), m.view(R, nC, L), out=d_tm.permute(1, 2, 0))
    c_tm = torch.empty(L, R, nC, dtype=dtype)
    # The mask is cast first: bool * float computes in fp32, which would cap fp64 at ~4e-7.
    torch.mul((m & nxt).to(dtype).view(R, nC, L), gamma * lam, out=c_tm.permute(1, 2, 0))

    # Level 1: local suffix scan and suffix products inside each block.
    a_tm = torch.empty_like(d_tm)
    p_tm = torch.empty_like(c_tm)
    a_tm[L - 1] = d_tm[L - 1]
    p_tm[L - 1] = c_tm[L - 1]
    for j in range(L - 2, -1, -1):
        torch.addcmul(d_tm[j], c_tm[j], a_tm[j + 1], out=a_tm[j])
        torch.mul(c_tm[j], p_tm[j + 1], out=p_tm[j])
    # Level 2: carry into block k is the true A at the first step of block k + 1.
    carry = torch.zeros(R, nC + 1, dtype=dtype)
    a0, p0 = a_tm[0], p_tm[0]
    for k in range(nC - 1, -1, -1):
        torch.addcmul(a0[:, k], p0[:, k], carry[:, k + 1], out=carry[:, k])
    adv = torch.empty(R, nC, L, dtype=dtype)
    torch.addcmul(a_tm.permute(1, 2, 0), p_tm.permute(1, 2, 0), carry[:, 1:, None], out=adv)
    adv = adv.view(R, Tp)
    ret = torch.add(adv, v)
    ret.mul_(m)
    if pad:
        adv, ret = adv[:, :T].contiguous(), ret[:, :T].contiguous()
    return adv, ret
