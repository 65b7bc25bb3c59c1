"""Forward-only passes that gather per-row results on every rank (scoring with a model).

:func:`collect` runs forward-only micro-batches through Megatron's schedule (so PP and VPP work
unchanged) and gathers what the last pipeline stage's loss function returns
(``collect_non_loss_data``), then broadcasts it over the pipeline group, so every rank ends with
the same tensors: PPO's log-probs / values / rewards of its rollouts, DPO's reference log-probs.
A field named ``scores`` is one value per row, every other field one value per token.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func


def collect(chunks: list, microbatches: list[dict], forward_step, fields: tuple[str, ...]) -> dict:
    """Forward-only over ``microbatches``; returns {field: tensor [rows, ...]} on every rank."""
    first = microbatches[0]["tokens"]

    def step(data_iterator, model):
        return forward_step(model, next(data_iterator))

    data = [iter(microbatches) for _ in chunks] if len(chunks) > 1 else iter(microbatches)
    for c in chunks:
        c.eval()
    with torch.no_grad():
        store = get_forward_backward_func()(
            forward_step_func=step, data_iterator=data, model=chunks,
            num_microbatches=len(microbatches), seq_length=first.shape[1],
            micro_batch_size=first.shape[0], forward_only=True, collect_non_loss_data=True)
    rows = sum(mb["tokens"].shape[0] for mb in microbatches)
    out = {}
    last = ps.is_pipeline_last_stage(ignore_virtual=True)
    for name in fields:
        if last:
            value = torch.cat([s[name].float() for s in store], dim=0).contiguous()
        else:
            shape = (rows, first.shape[1]) if name != "scores" else (rows,)
            value = torch.empty(shape, dtype=torch.float32, device=first.device)
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(value, src=ps.get_pipeline_model_parallel_last_rank(),
                           group=ps.get_pipeline_model_parallel_group())
        out[name] = value
    return out
