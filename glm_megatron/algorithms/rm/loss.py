"""The pairwise ranking loss and the reward model's forward step (Megatron's loss contract).

Bradley-Terry with margin: ``loss = -log sigmoid(r_chosen - r_rejected - margin)`` per pair,
summed over the micro-batch and returned with the pair count, so that (with the engine's
``calculate_per_token_loss``) the gradient is that of the mean over every pair of the global
batch, whatever the layout.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from ...models.reward_head import read_scores


def ranking_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin) -> torch.Tensor:
    """Per-pair ``-log sigmoid(chosen - rejected - margin)`` (numerically stable)."""
    return -F.logsigmoid(chosen - rejected - margin)


def pair_loss(last_index: torch.Tensor, margin: torch.Tensor, weight: torch.Tensor,
              output: torch.Tensor):
    """``output`` [2B, T, 1] scores of B chosen then B rejected rows -> (sum, pairs, report)."""
    rewards = read_scores(output, last_index)
    n = rewards.shape[0] // 2
    chosen, rejected = rewards[:n], rewards[n:]
    weight = weight.float()
    total = (ranking_loss(chosen, rejected, margin.float()) * weight).sum()
    count = weight.sum()
    correct = ((chosen > rejected).float() * weight).sum()
    return total, count.to(torch.int), {
        "rm loss": torch.stack([total.detach(), count]),
        "rm accuracy": torch.stack([correct.detach(), count]),
        # Per pair (chosen, rejected, weight): evaluation gathers them for calibration.
        "rm pairs": torch.stack([chosen.detach(), rejected.detach(), weight], dim=1),
    }


def rm_forward_step(model, batch: dict):
    output = model(input_ids=batch["tokens"], position_ids=batch["position_ids"],
                   attention_mask=batch["attn_mask"])
    return output, partial(pair_loss, batch["last_index"], batch["margin"], batch["weight"])
