"""PPO's forward passes: per-token log-probs / values / rewards of rollouts, and the training loss.

Everything goes through Megatron's forward/backward schedule, so PP (and VPP) work unchanged:

* :func:`collect` runs forward-only micro-batches and gathers what the last pipeline stage's
  loss function returns (``collect_non_loss_data``), then broadcasts it over the pipeline group,
  so every rank ends with the same per-token tensors (GAE, whitening and metrics then run
  identically everywhere; they are tiny next to the forward passes).
* Log-probs and entropy come from ``kernels.token_logprobs`` on the policy's hidden states and
  this rank's vocabulary shard (never full logits; see :mod:`glm_megatron.models.policy_heads`),
  at the sampling temperature.
* :func:`ppo_loss_step` is the trainable policy's forward step: clipped surrogate, clipped value
  loss (value head), entropy bonus, as token sums with the token count (Megatron divides by the
  global count across micro-batches and data-parallel ranks).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

import glm_kernels as kernels

from ...models.policy_heads import hidden_output, lm_head_weight, split_value
from ...models.reward_head import read_scores
from .loss import masked_sum, policy_loss, ppo_total_loss, value_loss

IGNORE = -100
# Sums reported by the loss: policy, value, entropy, approx KL, clipped (policy), clipped
# (value), tokens. Summed over micro-batches and data-parallel ranks by engine.sum_reports.
REPORT_KEYS = ("policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction",
               "value_clip_fraction", "tokens")


def _positions(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)


def _tp_group():
    return ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None


def _masked_labels(batch: dict) -> torch.Tensor:
    # Non-response positions are ignored by the kernel: log-prob 0, no gradient.
    return torch.where(batch["mask"] > 0, batch["labels"], torch.full_like(batch["labels"], IGNORE))


def _run(model, batch: dict):
    return model(input_ids=batch["tokens"], position_ids=_positions(batch["tokens"]), attention_mask=None)


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


def _token_stats(model, output, batch: dict, temperature: float, hidden_size: int, entropy: bool):
    hidden, value = split_value(output, hidden_size)
    res = kernels.token_logprobs(hidden, lm_head_weight(model), _masked_labels(batch),
                                 tp_group=_tp_group(), temperature=temperature,
                                 return_entropy=entropy, ignore_index=IGNORE)
    return res, value


def logprob_step(temperature: float, hidden_size: int):
    """Forward step returning {logprobs[, values]} per token (policy or reference)."""

    def forward_step(model, batch):
        output = _run(model, batch)

        def gather(out, non_loss_data=True):
            res, value = _token_stats(model, out, batch, temperature, hidden_size, entropy=False)
            found = {"logprobs": res.logprobs}
            if value is not None:
                found["values"] = value
            return found

        return output, gather

    return forward_step


def value_step(model, batch):
    """A separate value model (reward-head architecture): values per token."""
    output = _run(model, batch)
    return output, lambda out, non_loss_data=True: {"values": out.squeeze(-1).float()}


def reward_step(model, batch):
    """The reward model: its scalar score at each sequence's last real token."""
    output = _run(model, batch)
    return output, lambda out, non_loss_data=True: {"scores": read_scores(out, batch["last_index"])}


def score_logprobs(chunks, microbatches, temperature: float, hidden_size: int, values: bool) -> dict:
    fields = ("logprobs", "values") if values else ("logprobs",)
    with hidden_output(chunks):
        return collect(chunks, microbatches, logprob_step(temperature, hidden_size), fields)


def _report(terms: dict) -> torch.Tensor:
    return torch.stack([terms[k].detach().float().reshape(()) for k in REPORT_KEYS])


def _ppo_loss(model, batch, hp, hidden_size, output):
    mask = batch["mask"]
    res, value = _token_stats(model, output, batch, hp["temperature"], hidden_size, entropy=True)
    pol = policy_loss(res.logprobs, batch["old_logprobs"], batch["advantages"], mask, hp["clip_range"])
    entropy_sum = masked_sum(res.entropy, mask)
    zero = pol.loss_sum.new_zeros(())
    value_sum, value_clipped = zero, zero
    if value is not None:
        vl = value_loss(value, batch["old_values"], batch["returns"], mask, hp["clip_range_vf"])
        value_sum, value_clipped = vl.loss_sum, vl.clipped_tokens
    total = ppo_total_loss(pol.loss_sum, value_sum, entropy_sum, hp["vf_coef"], hp["entropy_coef"])
    tokens = mask.sum()
    terms = {"policy_loss": pol.loss_sum, "value_loss": value_sum, "entropy": entropy_sum,
             "approx_kl": pol.approx_kl_sum, "clip_fraction": pol.clipped_tokens,
             "value_clip_fraction": value_clipped, "tokens": tokens}
    return total, tokens.to(torch.int), {"ppo": _report(terms)}


def ppo_loss_step(hp: dict, hidden_size: int):
    """The policy's training forward step (value head included when the model has one)."""

    def forward_step(model, batch):
        return _run(model, batch), partial(_ppo_loss, model, batch, hp, hidden_size)

    return forward_step


def _value_loss(batch, hp, output):
    mask = batch["mask"]
    vl = value_loss(output.squeeze(-1).float(), batch["old_values"], batch["returns"], mask,
                    hp["clip_range_vf"])
    tokens = mask.sum()
    zero = vl.loss_sum.new_zeros(())
    # "tokens" is reported by the policy's loss only: the value engine's reports are added to it.
    terms = {"policy_loss": zero, "value_loss": vl.loss_sum, "entropy": zero, "approx_kl": zero,
             "clip_fraction": zero, "value_clip_fraction": vl.clipped_tokens, "tokens": zero}
    return hp["vf_coef"] * vl.loss_sum, tokens.to(torch.int), {"ppo": _report(terms)}


def value_loss_step(hp: dict):
    """A separate value model's training forward step."""

    def forward_step(model, batch):
        return _run(model, batch), partial(_value_loss, batch, hp)

    return forward_step
