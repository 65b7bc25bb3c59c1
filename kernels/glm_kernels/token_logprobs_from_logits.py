"""`logprobs_from_logits`: the token log-prob op (+ entropy, + KL) from vocab-parallel logits the
caller already holds, the second entry point next to `token_logprobs` (token_logprobs.py).

For callers whose model returns logits (e.g. Megatron's GPTModel with the output layer inside):
`logits` is this rank's [..., V/TP] shard, left untouched (peers' in-place softmax tricks make the
logits unusable afterwards; we copy one token chunk at a time into an fp32 tile instead). Same
contract, stats all-reduce and result type as `token_logprobs`; the gradient is w.r.t. `logits`
(this rank's shard, complete: no TP reduction needed).
"""

from __future__ import annotations

import torch

from . import token_logprobs_tp as tp
from .backend import resolve_backend
from .token_logprobs import (
    TokenLogProbs,
    chunk_ops,
    flat_labels,
    masked_upstream,
    outputs_from_stats,
    package_outputs,
)
from .token_logprobs_checks import check_common, check_logits
from .token_logprobs_chunking import CPU_TILE_ELEMS, GPU_TILE_ELEMS, MAX_TOKEN_CHUNK, local_labels, ranges


def _token_chunk(n, vs, device, tile):
    # Whole rows per tile here (the caller's logits are already [N, V/TP]); chunk tokens only.
    tile = tile or (GPU_TILE_ELEMS if device.type == "cuda" else CPU_TILE_ELEMS)
    return max(1, min(n, MAX_TOKEN_CHUNK, tile // max(vs, 1)))


class _LogitsLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, valid, inv_temp, tp_group, want_ent, backend, tile):
        ops = chunk_ops(backend)
        n, vs = logits.shape
        rank, _ = tp.tp_rank_world(tp_group)
        nt = _token_chunk(n, vs, logits.device, tile)
        buf = torch.empty(nt * vs, dtype=torch.float32, device=logits.device)
        scratch = torch.empty_like(buf) if (want_ent and backend == "torch") else None
        stats = torch.empty(4, n, dtype=torch.float32, device=logits.device)
        for i0, i1 in ranges(n, nt):
            z = buf[: (i1 - i0) * vs].view(i1 - i0, vs).copy_(logits[i0:i1])
            sc = None if scratch is None else scratch[: z.numel()].view_as(z)
            res = ops.chunk_stats(z, inv_temp, local_labels(labels[i0:i1], rank * vs, vs), want_ent, sc)
            for k in range(4):
                stats[k, i0:i1] = res[k]
        lse, logp, ent = outputs_from_stats(stats, tp_group, valid, want_ent)
        ctx.save_for_backward(logits, labels, valid, lse, ent)
        ctx.cfg = (inv_temp, tp_group, want_ent, backend, tile)
        if not want_ent:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        logits, labels, valid, lse, ent = ctx.saved_tensors
        inv_temp, tp_group, want_ent, backend, tile = ctx.cfg
        ops = chunk_ops(backend)
        n, vs = logits.shape
        rank, _ = tp.tp_rank_world(tp_group)
        g_lp, g_ent = masked_upstream(g_lp, g_ent, valid, want_ent)
        nt = _token_chunk(n, vs, logits.device, tile)
        buf = torch.empty(nt * vs, dtype=torch.float32, device=logits.device)
        scratch = torch.empty_like(buf) if (g_ent is not None and backend == "torch") else None
        grad = torch.empty_like(logits)
        for i0, i1 in ranges(n, nt):
            z = buf[: (i1 - i0) * vs].view(i1 - i0, vs).copy_(logits[i0:i1])
            sc = None if scratch is None else scratch[: z.numel()].view_as(z)
            g = ops.chunk_grad(
                z,
                inv_temp,
                lse[i0:i1],
                ent[i0:i1],
                local_labels(labels[i0:i1], rank * vs, vs),
                g_lp[i0:i1],
                None if g_ent is None else g_ent[i0:i1],
                g_ent is not None,
                sc,
            )
            grad[i0:i1].copy_(g)
        return grad, None, None, None, None, None, None, None


def logprobs_from_logits(
    logits,
    labels,
    *,
    tp_group=None,
    temperature=1.0,
    ref_logprobs=None,
    kl_type=None,
    return_entropy=False,
    ignore_index=-100,
    backend="auto",
    tile_elems=None,
) -> TokenLogProbs:
    """Per-token log-probs from this rank's vocab-parallel logits shard [..., V/TP]."""
    check_logits(logits, labels)
    _, world = tp.tp_rank_world(tp_group)
    check_common(
        labels, temperature, ref_logprobs, kl_type, logits.shape[-1] * world, ignore_index, logits.device
    )
    backend = resolve_backend(backend, logits)
    shape = labels.shape
    lg = logits.reshape(-1, logits.shape[-1])
    lab, valid = flat_labels(labels, ignore_index)
    logp, ent = _LogitsLogProbs.apply(
        lg, lab, valid, 1.0 / float(temperature), tp_group, bool(return_entropy), backend, tile_elems
    )
    return package_outputs(logp, ent, valid, shape, ref_logprobs, kl_type, return_entropy)
