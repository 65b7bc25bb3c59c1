"""Plain references the tests compare every path against. Slow and memory-hungry on purpose:
full [N, V] fp32 logits with log_softmax, and GAE as a per-timestep loop."""

from __future__ import annotations

import torch

from .kl import kl_penalty
from .token_logprobs import TokenLogProbs


def token_logprobs_reference(
    hidden,
    weight,
    labels,
    *,
    temperature=1.0,
    ref_logprobs=None,
    kl_type=None,
    return_entropy=False,
    ignore_index=-100,
) -> TokenLogProbs:
    """`weight` is the FULL [V, H] output matrix (concatenate the TP shards to compare); fp64."""
    logits = (hidden.double() @ weight.double().t()) / temperature
    logsm = torch.log_softmax(logits, dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    logp = torch.where(valid, logsm.gather(-1, safe.unsqueeze(-1)).squeeze(-1), torch.zeros(()))
    ent = None
    if return_entropy:
        ent = torch.where(valid, -(logsm.exp() * logsm).sum(-1), torch.zeros(()))
    kl = None
    if kl_type is not None:
        kl = torch.where(valid, kl_penalty(logp, ref_logprobs.double(), kl_type).double(), torch.zeros(()))
    return TokenLogProbs(logp, kl, ent)


def gae_reference(rewards, values, mask, gamma, lam, cu_seqlens=None):
    """Per-timestep loop (the verl / OpenRLHF / TRL formulation) in fp64, our mask semantics:
    delta_t = r_t + gamma*V_{t+1}*m_{t+1} - V_t, A_t = m_t*(delta_t + gamma*lam*A_{t+1}), where
    t+1 must be in the same row / packed segment; returns = (A + V) * m."""
    if cu_seqlens is not None:
        adv = torch.zeros_like(rewards, dtype=torch.float64)
        for s, e in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
            a, _ = gae_reference(rewards[None, s:e], values[None, s:e], mask[None, s:e], gamma, lam)
            adv[s:e] = a[0]
        m = mask.double()
        return adv, (adv + values.double()) * m
    r, v, m = rewards.double(), values.double(), mask.double()
    T = r.shape[1]
    adv = torch.zeros_like(r)
    nxt_a = torch.zeros(r.shape[0], dtype=torch.float64)
    nxt_v = torch.zeros(r.shape[0], dtype=torch.float64)
    nxt_m = torch.zeros(r.shape[0], dtype=torch.float64)
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * nxt_v * nxt_m - v[:, t]
        a = m[:, t] * (delta + gamma * lam * nxt_a)
        adv[:, t] = a
        nxt_a, nxt_v, nxt_m = a, v[:, t], m[:, t]
    return adv, (adv + v) * m
