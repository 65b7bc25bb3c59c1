"""Steps both log-prob entry points (`token_logprobs`, `logprobs_from_logits`) share around their
chunk loops: label flattening, per-token outputs from the stats, masked upstream gradients."""

from __future__ import annotations

import torch

from . import _tp


def flat_labels(labels: torch.Tensor, ignore_index: int):
    """(labels as flat int64 with ignored ones set to -1, validity mask)."""
    lab = labels.reshape(-1).long()
    valid = lab != ignore_index
    return torch.where(valid, lab, torch.full_like(lab, -1)), valid


def outputs_from_stats(stats, tp_group, valid, want_ent):
    """(lse, logp, entropy) per token from this rank's (m, s, w, t); 0 at ignored tokens."""
    lse, target, ent = _tp.finish(_tp.allreduce_stats(tuple(stats), tp_group))
    zero = torch.zeros((), dtype=torch.float32, device=lse.device)
    logp = torch.where(valid, target - lse, zero)
    ent = torch.where(valid, ent, zero) if want_ent else torch.zeros_like(logp)
    return lse, logp, ent


def masked_upstream(g_lp, g_ent, valid, want_ent):
    """Upstream gradients in fp32, zero at ignored tokens; g_ent None when entropy is unused."""
    zero = torch.zeros((), dtype=torch.float32, device=g_lp.device)
    g_lp = torch.where(valid, g_lp.float(), zero)
    g_ent = torch.where(valid, g_ent.float(), zero) if (want_ent and g_ent is not None) else None
    return g_lp, g_ent
