"""DPO micro-batches: the reward model's ``[2B, T]`` preference batches plus next-token targets.

A micro-batch of B pairs holds the B chosen rows, then the B rejected rows of the same pairs
(``engine/preference_batches.py``), right-padded to one length per step; position ``t`` is
scored on the next token, ``labels[:, t] = tokens[:, t + 1]``, where that token is part of the
response (``mask``: the tokenized rows' loss masks, which the chat template limits to the
response turn, shifted by one). ``rows`` are the pairs' global indices: precomputed reference
log-probs are looked up by them.
"""

from __future__ import annotations

import numpy as np
import torch

from ...engine.preference_batches import PreferenceBatcher


def next_token_targets(tokens: torch.Tensor, loss_masks: list, pad_id: int):
    """(labels, mask) of right-padded ``tokens`` [R, T] whose rows carry ``loss_masks``."""
    r, t = tokens.shape
    labels = torch.full((r, t), pad_id, dtype=torch.long)
    labels[:, :-1] = tokens[:, 1:]
    mask = torch.zeros((r, t), dtype=torch.float32)
    for i, m in enumerate(loss_masks):
        target = torch.as_tensor(np.asarray(m[1:], dtype=np.float32))
        mask[i, :len(target)] = target
    return labels, mask


class DPOBatcher(PreferenceBatcher):
    """Row indices -> micro-batches for the DPO loss (``ref_logps`` is added per step)."""

    def __init__(self, dataset, pad_id: int, pad_multiple: int, device):
        super().__init__(dataset, pad_id, pad_multiple, 0.0, device)

    def microbatch(self, rows: np.ndarray, length: int, mask_rows: np.ndarray | None = None) -> dict:
        batch = super().microbatch(rows, length, mask_rows)
        samples = [self.rows[int(i)] for i in rows]
        masks = [s["chosen_loss_mask"] for s in samples] + [s["rejected_loss_mask"] for s in samples]
        labels, mask = next_token_targets(batch["tokens"].cpu(), masks, self.pad_id)
        return dict(batch, labels=labels.to(self.device), mask=mask.to(self.device),
                    rows=torch.as_tensor(np.asarray(rows, dtype=np.int64)))
