"""Run a batch through the (possibly pipelined) Megatron model: logits, or LM loss + backward.

Both go through Megatron's ``get_forward_backward_func`` so that the same code serves PP=1,
PP>1 and the interleaved (virtual) pipeline: the schedule moves activations between stages. The
batch is cut into micro-batches; the interleaved schedule needs at least PP of them.
"""

from __future__ import annotations

from functools import partial

import torch
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func


def _positions(input_ids: torch.Tensor) -> torch.Tensor:
    return torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0).expand_as(input_ids)


def _micro_batches(tensors: tuple, chunks: list, micro_batch_size: int | None):
    batch = tensors[0].shape[0]
    if micro_batch_size is None:
        pp = ps.get_pipeline_model_parallel_world_size()
        micro_batch_size = batch // pp if len(chunks) > 1 else batch
    if micro_batch_size < 1 or batch % micro_batch_size:
        raise ValueError(f"batch size {batch} is not a multiple of micro batch {micro_batch_size}")
    count = batch // micro_batch_size
    micro = [tuple(t[i * micro_batch_size:(i + 1) * micro_batch_size] for t in tensors)
             for i in range(count)]
    iterators = [iter(micro) for _ in chunks] if len(chunks) > 1 else iter(micro)
    return iterators, count, micro_batch_size


def forward_logits(chunks: list[torch.nn.Module], input_ids: torch.Tensor,
                   micro_batch_size: int | None = None) -> torch.Tensor | None:
    """Full-vocabulary logits [b, s, V] on the last pipeline stage, None on the others.

    With virtual pipeline stages and no micro-batch size given, a batch of fewer rows than PP
    (one evaluation prompt, say) is filled up with copies of its last row, because Megatron's
    interleaved schedule needs PP micro-batches; the copies' logits are dropped."""
    rows = input_ids.shape[0]
    if len(chunks) > 1 and micro_batch_size is None:
        fill = -rows % ps.get_pipeline_model_parallel_world_size()
        input_ids = torch.cat([input_ids, input_ids[-1:].expand(fill, -1)]) if fill else input_ids

    def step(data_iterator, model):
        (ids,) = next(data_iterator)
        out = model(input_ids=ids, position_ids=_positions(ids), attention_mask=None,
                    runtime_gather_output=True)
        return out, lambda output, non_loss_data=True: output

    data, count, mbs = _micro_batches((input_ids,), chunks, micro_batch_size)
    with torch.no_grad():
        store = get_forward_backward_func()(
            forward_step_func=step, data_iterator=data, model=chunks, num_microbatches=count,
            seq_length=input_ids.shape[1], micro_batch_size=mbs, forward_only=True,
            collect_non_loss_data=True,
        )
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        return torch.cat([out.float() for out in store], dim=0)[:rows]
    return None


def _lm_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Megatron's 3-tuple loss contract: (sum, token count, values to report)."""
    mask = loss_mask.float()
    total = (per_token_loss.float() * mask).sum()
    count = mask.sum().to(torch.int)
    return total, count, {"lm loss": torch.stack([total.detach(), mask.sum()])}


def forward_backward_lm_loss(
    chunks: list[torch.nn.Module],
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
    *,
    forward_only: bool = False,
    micro_batch_size: int | None = None,
) -> float | None:
    """Next-token loss over ``loss_mask``; runs backward unless ``forward_only``.

    Returns the token-mean loss on the last pipeline stage (None elsewhere). Megatron averages
    the micro-batches' token means for the gradient, which equals the token mean when the
    micro-batches hold equally many loss tokens. Gradients land in ``main_grad`` (DDP-wrapped
    chunks) or ``grad``.
    """
    if loss_mask is None:
        loss_mask = torch.ones_like(labels)

    def step(data_iterator, model):
        ids, lab, mask = next(data_iterator)
        out = model(input_ids=ids, position_ids=_positions(ids), attention_mask=None, labels=lab)
        return out, partial(_lm_loss, mask)

    data, count, mbs = _micro_batches((input_ids, labels, loss_mask), chunks, micro_batch_size)
    store = get_forward_backward_func()(
        forward_step_func=step, data_iterator=data, model=chunks, num_microbatches=count,
        seq_length=input_ids.shape[1], micro_batch_size=mbs, forward_only=forward_only,
    )
    if ps.is_pipeline_last_stage(ignore_virtual=True) and store:
        total = sum(float(s["lm loss"][0]) for s in store)
        tokens = sum(float(s["lm loss"][1]) for s in store)
        return total / max(tokens, 1.0)
    return None
