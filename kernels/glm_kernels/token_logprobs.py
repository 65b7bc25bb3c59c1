"""Fused vocab-parallel token log-prob (+ entropy, + KL) straight from hidden states.

    out = token_logprobs(hidden, weight, labels, tp_group=tp, temperature=0.7,
                         ref_logprobs=ref, kl_type="k3", return_entropy=True)
    out.logprobs, out.kl, out.entropy          # each shaped like labels, fp32

`weight` is this rank's vocab shard [V/TP, H] of the output layer (rows rank*V/TP ... of the full
[V, H] matrix, Megatron's ColumnParallelLinear partition) and `hidden` the full [..., H] input of
that layer, identical on every TP rank. Logits z = hidden @ weight.T / temperature are computed
one [token-chunk, vocab-chunk] tile at a time and reduced on the fly (online max / sum-exp /
entropy / target logit); TP ranks then all-reduce those per-token stats (MAX, then one SUM). The
backward recomputes each tile (one extra GEMM) instead of storing [N, V] softmax.

Gradients (log-probs and entropy are differentiable w.r.t. hidden and weight; KL is a torch
function of logprobs, so it is differentiable through them):
  * weight: this rank's shard gradient, complete.
  * hidden: the *partial* gradient from this rank's vocab shard. The full gradient is its sum over
    the TP group -- exactly what Megatron's ColumnParallelLinear backward does. So `hidden` must
    reach this function through Megatron's region op that reduces in backward:
    `copy_to_tensor_model_parallel_region` (no sequence parallelism; all-reduce) or
    `gather_from_sequence_parallel_region` (sequence parallelism: hidden is the all-gathered
    [N, H]; its backward reduce-scatters the partial gradients back to sequence shards). The
    kernel itself runs no collective in backward. Every TP rank must receive the same upstream
    gradient (true when the loss is computed redundantly on each TP rank, as in Megatron).
Ignored tokens (label == ignore_index) get logprob = entropy = kl = 0 and no gradient.

The op's files, all named token_logprobs*: this one (result type, the autograd op from hidden
states, the steps both entry points share), token_logprobs_from_logits.py (the entry point for
logits the caller already holds), token_logprobs_torch.py / token_logprobs_triton.py (the chunk
operations: CPU torch path / Triton kernels), token_logprobs_chunking.py (tile plan, fp32 GEMM),
token_logprobs_tp.py (vocab-shard stats and their all-reduce), token_logprobs_checks.py
(argument checks).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import token_logprobs_tp as tp
from .backend import resolve_backend
from .kl import kl_penalty
from .token_logprobs_checks import check_common, check_hidden_weight
from .token_logprobs_chunking import local_labels, mm_f32, plan, ranges


class TokenLogProbs(NamedTuple):
    """Per-token outputs, each shaped like `labels`, fp32. kl / entropy are None unless asked."""

    logprobs: torch.Tensor
    kl: torch.Tensor | None
    entropy: torch.Tensor | None


def chunk_ops(backend: str):
    """The chunk operations (chunk_stats, chunk_grad) of a backend: a module with both."""
    if backend == "triton":
        from . import token_logprobs_triton as ops
    else:
        from . import token_logprobs_torch as ops
    return ops


# Steps both entry points (`token_logprobs` here, `logprobs_from_logits` in
# token_logprobs_from_logits.py) share around their chunk loops.
def flat_labels(labels: torch.Tensor, ignore_index: int):
    """(labels as flat int64 with ignored ones set to -1, validity mask)."""
    lab = labels.reshape(-1).long()
    valid = lab != ignore_index
    return torch.where(valid, lab, torch.full_like(lab, -1)), valid


def outputs_from_stats(stats, tp_group, valid, want_ent):
    """(lse, logp, entropy) per token from this rank's (m, s, w, t); 0 at ignored tokens."""
    lse, target, ent = tp.finish(tp.allreduce_stats(tuple(stats), tp_group))
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


def package_outputs(logp, ent, valid, shape, ref_logprobs, kl_type, return_entropy) -> TokenLogProbs:
    """The TokenLogProbs result shaped like the labels, with the KL (0 at ignored tokens) if asked."""
    kl = None
    if kl_type is not None:
        kl = kl_penalty(logp, ref_logprobs.reshape(-1), kl_type)
        kl = torch.where(valid, kl, torch.zeros((), dtype=kl.dtype, device=kl.device)).view(shape)
    return TokenLogProbs(logp.view(shape), kl, ent.view(shape) if return_entropy else None)


class _FusedLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, valid, inv_temp, tp_group, want_ent, backend, tile):
        ops = chunk_ops(backend)
        n, vs = hidden.shape[0], weight.shape[0]
        rank, _ = tp.tp_rank_world(tp_group)
        nt, vc = plan(n, vs, hidden.device, tile)
        buf = torch.empty(nt * vc, dtype=torch.float32, device=hidden.device)
        scratch = torch.empty_like(buf) if (want_ent and backend == "torch") else None
        stats = torch.empty(4, n, dtype=torch.float32, device=hidden.device)
        for i0, i1 in ranges(n, nt):
            acc = None
            for v0, v1 in ranges(vs, vc):
                z = mm_f32(
                    hidden[i0:i1], weight[v0:v1].t(), out=buf[: (i1 - i0) * (v1 - v0)].view(i1 - i0, v1 - v0)
                )
                loc = local_labels(labels[i0:i1], rank * vs + v0, v1 - v0)
                sc = None if scratch is None else scratch[: z.numel()].view_as(z)
                acc = tp.merge(acc, ops.chunk_stats(z, inv_temp, loc, want_ent, sc))
            for k in range(4):
                stats[k, i0:i1] = acc[k]
        lse, logp, ent = outputs_from_stats(stats, tp_group, valid, want_ent)
        ctx.save_for_backward(hidden, weight, labels, valid, lse, ent)
        ctx.cfg = (inv_temp, tp_group, want_ent, backend, tile)
        if not want_ent:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        hidden, weight, labels, valid, lse, ent = ctx.saved_tensors
        inv_temp, tp_group, want_ent, backend, tile = ctx.cfg
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ops = chunk_ops(backend)
        n, vs = hidden.shape[0], weight.shape[0]
        rank, _ = tp.tp_rank_world(tp_group)
        g_lp, g_ent = masked_upstream(g_lp, g_ent, valid, want_ent)
        want_ent = g_ent is not None
        nt, vc = plan(n, vs, hidden.device, tile)
        buf = torch.empty(nt * vc, dtype=torch.float32, device=hidden.device)
        scratch = torch.empty_like(buf) if (want_ent and backend == "torch") else None
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        grad_w = torch.empty(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for i0, i1 in ranges(n, nt):
            h = hidden[i0:i1]
            for v0, v1 in ranges(vs, vc):
                w = weight[v0:v1]
                z = mm_f32(h, w.t(), out=buf[: (i1 - i0) * (v1 - v0)].view(i1 - i0, v1 - v0))
                loc = local_labels(labels[i0:i1], rank * vs + v0, v1 - v0)
                sc = None if scratch is None else scratch[: z.numel()].view_as(z)
                g = ops.chunk_grad(
                    z,
                    inv_temp,
                    lse[i0:i1],
                    ent[i0:i1],
                    loc,
                    g_lp[i0:i1],
                    None if g_ent is None else g_ent[i0:i1],
                    want_ent,
                    sc,
                )
                if need_h:
                    if g.dtype == w.dtype:
                        grad_h[i0:i1].addmm_(g, w)
                    else:
                        grad_h[i0:i1] += mm_f32(g, w)
                if need_w:
                    if i0 == 0:
                        mm_f32(g.t(), h, out=grad_w[v0:v1])
                    else:
                        grad_w[v0:v1] += mm_f32(g.t(), h)
        grad_h = grad_h.to(hidden.dtype) if need_h else None
        grad_w = grad_w.to(weight.dtype) if need_w else None
        return grad_h, grad_w, None, None, None, None, None, None, None


def token_logprobs(
    hidden,
    weight,
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
    """Per-token log p(label | hidden) over a TP-sharded vocabulary; see the module docstring.

    backend: "auto" (Triton on CUDA, chunked torch on CPU), "torch" or "triton" (CPU only under
    TRITON_INTERPRET=1). tile_elems: elements of one fp32 logits tile (memory / speed knob).
    """
    check_hidden_weight(hidden, weight, labels)
    _, world = tp.tp_rank_world(tp_group)
    check_common(
        labels, temperature, ref_logprobs, kl_type, weight.shape[0] * world, ignore_index, hidden.device
    )
    backend = resolve_backend(backend, hidden)
    shape = labels.shape
    h2 = hidden.reshape(-1, hidden.shape[-1])
    lab, valid = flat_labels(labels, ignore_index)
    logp, ent = _FusedLogProbs.apply(
        h2, weight, lab, valid, 1.0 / float(temperature), tp_group, bool(return_entropy), backend, tile_elems
    )
    return package_outputs(logp, ent, valid, shape, ref_logprobs, kl_type, return_entropy)
