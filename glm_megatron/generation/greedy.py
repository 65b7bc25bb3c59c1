"""Greedy generation by full recompute through ``forward_logits`` (evaluation samples, the demo).

Each new token re-runs the whole sequence: simple and exact at every layout, slow for long
outputs. The KV-cache generator for PPO rollouts is a separate component. The sequence is
right-padded to the layout's multiple (sequence parallelism); padding after the last real token
cannot change its logits under the causal mask.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from ..models.forward import forward_logits


def _next_token(modules, ids: list[int], pad_multiple: int, pad_id: int, device) -> int:
    length = -(-len(ids) // pad_multiple) * pad_multiple
    x = torch.full((1, length), pad_id, dtype=torch.long)
    x[0, :len(ids)] = torch.tensor(ids)
    logits = forward_logits(modules, x.to(device))
    token = torch.zeros(1, dtype=torch.long, device=device)
    if logits is not None:
        token[0] = int(logits[0, len(ids) - 1].argmax())
    if ps.get_pipeline_model_parallel_world_size() > 1:
        # Only the last stage has logits; every stage needs the token for the next pass.
        dist.broadcast(token, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
    return int(token[0])


@torch.no_grad()
def greedy_generate(modules, prompt: list[int], max_new_tokens: int, stop_ids,
                    pad_multiple: int = 1, pad_id: int = 0, device="cpu") -> list[int]:
    """New token ids (the stop token included when one was produced). Collective."""
    for m in modules:
        m.eval()
    ids, out = list(prompt), []
    stop = set(stop_ids)
    for _ in range(max_new_tokens):
        tok = _next_token(modules, ids, pad_multiple, pad_id, device)
        ids.append(tok)
        out.append(tok)
        if tok in stop:
            break
    return out
