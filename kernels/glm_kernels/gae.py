"""Generalized advantage estimation over response tokens, as a scan.

    adv, ret = compute_gae(rewards, values, mask, gamma, lam)                 # [B, T]
    adv, ret = compute_gae(rewards, values, mask, gamma, lam, cu_seqlens=cu)  # packed [total]

Semantics (docs/ARCHITECTURE.md §7): delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t and
A_t = m_t * (delta_t + gamma * lam * A_{t+1}), where "t+1" only counts inside the same row /
packed segment. A zero in the mask ends a response: the step before it bootstraps from value 0
and nothing flows across it (so right padding and variable lengths need nothing else). Returns
are (A + V) * m; masked-out positions are 0 in both outputs.

It is the linear recurrence A_t = d_t + c_t * A_{t+1} with d_t = m_t * delta_t and
c_t = gamma * lam * m_t * m_{t+1}. Backends (`backend=`):

* "auto": "triton" for CUDA tensors, "numba" for CPU tensors ("torch" if numba is not installed).
* "triton": scans the (c, d) pairs on CUDA (or under TRITON_INTERPRET=1 on CPU, for tests; see
  gae_triton.py).
* "numba": CPU only; one native backward pass per row / packed segment, rows spread over
  torch.get_num_threads() threads (see gae_numba.py). Memory-bound: about the cost of a copy.
* "torch": vectorised torch on CPU; right-padded batches take a blocked-GEMM discounted suffix
  sum and anything else (holes, packed segments) a two-level blocked scan (see gae_torch.py).

Outputs are fp32 (fp64 inputs stay fp64 on CPU).
"""

from __future__ import annotations

import functools
import itertools
import math

import torch

from .backend import BACKENDS, resolve_backend
from .whiten import whiten_advantages


def _check(rewards, values, mask, gamma, lam, cu_seqlens):
    if rewards.shape != values.shape:
        raise ValueError(f"rewards shape {tuple(rewards.shape)} != values shape {tuple(values.shape)}")
    if mask is not None and mask.shape != rewards.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != rewards shape {tuple(rewards.shape)}")
    if not (rewards.is_floating_point() and values.is_floating_point()):
        raise ValueError("rewards and values must be floating point")
    for name, x in (("gamma", gamma), ("lam", lam)):
        if not (isinstance(x, (int, float)) and math.isfinite(x) and 0.0 <= x <= 1.0):
            raise ValueError(f"{name} must be a number in [0, 1], got {x!r}")
    if cu_seqlens is None:
        if rewards.dim() != 2:
            raise ValueError(
                f"rewards must be [B, T] (or 1-D with cu_seqlens), got shape {tuple(rewards.shape)}"
            )
        return
    if rewards.dim() != 1:
        raise ValueError(f"packed rewards (cu_seqlens given) must be 1-D, got shape {tuple(rewards.shape)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or cu_seqlens.is_floating_point():
        raise ValueError("cu_seqlens must be a 1-D integer tensor [num_segments + 1]")
    cu = cu_seqlens.tolist()
    if cu[0] != 0 or cu[-1] != rewards.numel() or any(b < a for a, b in itertools.pairwise(cu)):
        raise ValueError(
            f"cu_seqlens must start at 0, be non-decreasing and end at {rewards.numel()}, got {cu[:8]}..."
        )


GAE_BACKENDS = (*BACKENDS, "numba")


@functools.cache
def _numba_available() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def _pick_backend(backend, like):
    """resolve_backend plus "numba" (GAE only): the CPU default when numba is installed."""
    if backend not in GAE_BACKENDS:
        raise ValueError(f"backend must be one of {GAE_BACKENDS}, got {backend!r}")
    if backend == "numba":
        if like.device.type != "cpu":
            raise ValueError(f"backend='numba' needs CPU tensors, got device {like.device}")
        if not _numba_available():
            raise ValueError("backend='numba' requested but numba is not installed")
        return "numba"
    if backend == "auto" and like.device.type == "cpu" and _numba_available():
        return "numba"
    return resolve_backend(backend, like)


def next_valid(m, cu_seqlens):
    """nxt_t = m_{t+1} and t+1 in the same row / segment."""
    nxt = torch.zeros_like(m)
    nxt[..., :-1] = m[..., 1:]
    if cu_seqlens is not None:
        ends = cu_seqlens[1:].long() - 1
        nxt[ends[ends >= 0]] = False
    return nxt


def compute_gae(
    rewards,
    values,
    mask=None,
    gamma=1.0,
    lam=1.0,
    *,
    cu_seqlens=None,
    whiten=False,
    whiten_group=None,
    backend="auto",
):
    """(advantages, returns); see the module docstring. `whiten=True` whitens the advantages over
    masked-in tokens (across `whiten_group`, e.g. the DP group, when given)."""
    _check(rewards, values, mask, gamma, lam, cu_seqlens)
    m = torch.ones_like(rewards, dtype=torch.bool) if mask is None else mask.bool()
    backend = _pick_backend(backend, rewards)
    out_dtype = torch.promote_types(values.dtype, torch.float32)
    if backend == "numba":
        from .gae_numba import gae_numba

        adv, ret = gae_numba(rewards.to(out_dtype), values.to(out_dtype), m, gamma, lam, cu_seqlens)
    elif backend == "triton":
        adv, ret = _run_triton(rewards, values, m, next_valid(m, cu_seqlens), gamma, lam, cu_seqlens)
        adv, ret = adv.to(out_dtype), ret.to(out_dtype)
    else:
        from .gae_torch import gae_right_padded, gae_scan, right_padded

        r2, v2 = rewards.to(out_dtype), values.to(out_dtype)
        mf = m.to(out_dtype) if cu_seqlens is None else None
        if mf is not None and right_padded(mf):
            adv, ret = gae_right_padded(r2, v2, mf, gamma, lam)
        elif cu_seqlens is not None:
            adv, ret = gae_scan(r2[None], v2[None], m[None], next_valid(m, cu_seqlens)[None], gamma, lam)
        else:
            adv, ret = gae_scan(r2, v2, m, next_valid(m, None), gamma, lam)
        adv, ret = adv.view(rewards.shape), ret.view(rewards.shape)
    if whiten:
        adv = whiten_advantages(adv, m, group=whiten_group)
    return adv, ret


def _run_triton(rewards, values, m, nxt, gamma, lam, cu_seqlens):
    from .gae_triton import gae_scan

    dev = rewards.device
    if cu_seqlens is None:
        B, T = rewards.shape
        starts = torch.arange(B, device=dev, dtype=torch.int64) * T
        lens = torch.full((B,), T, device=dev, dtype=torch.int64)
    else:
        cu = cu_seqlens.to(device=dev, dtype=torch.int64)
        starts, lens = cu[:-1].contiguous(), (cu[1:] - cu[:-1]).contiguous()
    flat = [x.contiguous().view(-1) for x in (rewards, values)]
    if not rewards.is_cuda:  # the interpreter has no bf16 arithmetic
        flat = [x.float() for x in flat]
    masks = [x.contiguous().view(-1).to(torch.uint8) for x in (m, nxt)]
    adv, ret = gae_scan(flat[0], flat[1], masks[0], masks[1], gamma, lam, starts, lens)
    return adv.view(rewards.shape), ret.view(rewards.shape)
