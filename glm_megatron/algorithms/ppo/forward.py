"""PPO's forward passes: per-token log-probs / values / rewards of rollouts, and the training loss.

Everything goes through Megatron's forward/backward schedule, so PP (and VPP) work unchanged:

* :func:`glm_megatron.engine.collect.collect` runs forward-only micro-batches and gathers what
  the last pipeline stage's loss function returns, then broadcasts it over the pipeline group,
  so every rank ends with the same per-token tensors (GAE, whitening and metrics then run
  identically everywhere; they are tiny next to the forward passes).
* Log-probs and entropy come from ``kernels.token_logprobs`` on the policy's hidden states and
  this rank's vocabulary shard (never full logits; see :mod:`glm_megatron.engine.token_logprobs`
  and :mod:`glm_megatron.models.policy_heads`), at the sampling temperature.
* :func:`ppo_loss_step` is the trainable policy's forward step: clipped surrogate, clipped value
  loss (value head), entropy bonus, as token sums with the token count (Megatron divides by the
  global count across micro-batches and data-parallel ranks).
"""

from __future__ import annotations

from functools import partial

import torch

from ...engine.token_logprobs import run_causal, token_stats
from ...models.reward_head import read_scores
from .loss import masked_sum, policy_loss, ppo_total_loss, value_loss

# Sums reported by the loss: policy, value, entropy, approx KL, clipped (policy), clipped
# (value), tokens. Summed over micro-batches and data-parallel ranks by engine.sum_reports.
REPORT_KEYS = ("policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction",
               "value_clip_fraction", "tokens")


def value_step(model, batch):
    """A separate value model (reward-head architecture): values per token."""
    output = run_causal(model, batch)
    return output, lambda out, non_loss_data=True: {"values": out.squeeze(-1).float()}


def reward_step(model, batch):
    """The reward model: its scalar score at each sequence's last real token."""
    output = run_causal(model, batch)
    return output, lambda out, non_loss_data=True: {"scores": read_scores(out, batch["last_index"])}


def _report(terms: dict) -> torch.Tensor:
    return torch.stack([terms[k].detach().float().reshape(()) for k in REPORT_KEYS])


def _ppo_loss(model, batch, hp, hidden_size, output):
    mask = batch["mask"]
    res, value = token_stats(model, output, batch, hp["temperature"], hidden_size, entropy=True)
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
        return run_causal(model, batch), partial(_ppo_loss, model, batch, hp, hidden_size)

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
        return run_causal(model, batch), partial(_value_loss, batch, hp)

    return forward_step
