"""The SFT loss: token cross-entropy on the supervised (assistant) tokens only."""

from __future__ import annotations

from functools import partial

import torch


def masked_lm_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Megatron's loss contract: (sum over supervised tokens, their count, report)."""
    mask = loss_mask.float()
    total = (per_token_loss.float() * mask).sum()
    count = mask.sum()
    return total, count.to(torch.int), {"lm loss": torch.stack([total.detach(), count])}


def lm_forward_step(model, batch: dict):
    output = model(input_ids=batch["tokens"], position_ids=batch["position_ids"],
                   attention_mask=batch["attn_mask"], labels=batch["labels"])
    return output, partial(masked_lm_loss, batch["loss_mask"])
