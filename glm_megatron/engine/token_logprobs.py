"""Per-token log-probs of a causal LM from its hidden states, never from full logits.

``kernels.token_logprobs`` takes the hidden states and this rank's vocabulary shard of the LM
head (the output layer in *hidden* mode, :mod:`glm_megatron.models.policy_heads`) and returns the
target tokens' log-probs (and entropy) at a temperature, all-reducing over the tensor-parallel
group. Batches hold ``tokens`` (right-padded, so positions are ``0..T-1`` and no attention mask
is needed), ``labels`` (the next token of each position) and ``mask`` (1 where a position is
scored); unscored positions get log-prob 0 and no gradient.

* :func:`token_stats` is used inside a loss function (PPO's policy loss, DPO's loss): the
  log-probs of the output it is given, plus the value channel when the model has a value head;
  the forward step produces that output with the model in hidden mode (PPO wraps its training
  step in ``hidden_output``; DPO's forward step uses :func:`run_hidden`, scoped to one call).
* :func:`score_logprobs` scores micro-batches forward-only with :func:`.collect.collect`
  (PPO's old / reference log-probs, DPO's reference log-probs): per-token tensors on every rank.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state as ps

import glm_kernels as kernels

from ..models.policy_heads import hidden_output, lm_head_weight, split_value
from .collect import collect

IGNORE = -100


def _positions(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)


def _tp_group():
    return ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None


def _masked_labels(batch: dict) -> torch.Tensor:
    # Non-response positions are ignored by the kernel: log-prob 0, no gradient.
    return torch.where(batch["mask"] > 0, batch["labels"], torch.full_like(batch["labels"], IGNORE))


def run_causal(model, batch: dict):
    return model(input_ids=batch["tokens"], position_ids=_positions(batch["tokens"]), attention_mask=None)


def token_stats(model, output, batch: dict, temperature: float, hidden_size: int, entropy: bool):
    hidden, value = split_value(output, hidden_size)
    res = kernels.token_logprobs(hidden, lm_head_weight(model), _masked_labels(batch),
                                 tp_group=_tp_group(), temperature=temperature,
                                 return_entropy=entropy, ignore_index=IGNORE)
    return res, value


def logprob_step(temperature: float, hidden_size: int):
    """Forward step returning {logprobs[, values]} per token (policy or reference)."""

    def forward_step(model, batch):
        output = run_causal(model, batch)

        def gather(out, non_loss_data=True):
            res, value = token_stats(model, out, batch, temperature, hidden_size, entropy=False)
            found = {"logprobs": res.logprobs}
            if value is not None:
                found["values"] = value
            return found

        return output, gather

    return forward_step


def score_logprobs(chunks, microbatches, temperature: float, hidden_size: int, values: bool) -> dict:
    fields = ("logprobs", "values") if values else ("logprobs",)
    with hidden_output(chunks):
        return collect(chunks, microbatches, logprob_step(temperature, hidden_size), fields)


def run_hidden(model, batch: dict):
    """:func:`run_causal` with the output layer in hidden mode for this call only, so that the
    loss function gets hidden states for :func:`token_stats` (a training forward step; the chunk
    may be DDP-wrapped). Scoped to the call, it never nests with :func:`score_logprobs` on the
    same chunks (a LoRA policy that is also its own reference)."""
    inner = model
    while hasattr(inner, "module"):
        inner = inner.module
    with hidden_output([inner]):
        return run_causal(model, batch)
