"""SFT micro-batches: padded (or packed) model-ready tensors of the rows the engine's
``StepPlanner`` (engine/batching.py) chose for a step.

Every rank knows the whole global batch (lengths come from the index, no data read), so all
micro-batches of a step are padded to one length: Megatron's pipeline sends fixed shapes, and
the MoE all-gather dispatcher needs equal token counts on every expert-parallel rank.
"""

from __future__ import annotations

import numpy as np
import torch

from ...data.collate import IGNORE_INDEX, collate_sft
from ...data.packing import PackedSFTDataset, packed_attention_mask
from ...engine.batching import round_up


def pad_batch(batch: dict, length: int, pad_id: int) -> dict:
    """Right-pad a collate_sft batch to ``length`` positions."""
    b, t = batch["tokens"].shape
    if t == length:
        return batch
    extra = length - t

    def pad(x, value):
        return torch.cat([x, torch.full((b, extra), value, dtype=x.dtype)], dim=1)

    return {
        "tokens": pad(batch["tokens"], pad_id),
        "labels": pad(batch["labels"], IGNORE_INDEX),
        "loss_mask": pad(batch["loss_mask"], 0),
        "attention_mask": pad(batch["attention_mask"], False),
        "position_ids": torch.arange(length).expand(b, length).clone(),
    }


def finalize_for_model(batch: dict, ignore_index: int, device) -> dict:
    """Loss mask = stored mask AND a real label; labels made valid ids for Megatron's CE."""
    labels = batch["labels"]
    valid = (labels != IGNORE_INDEX) & (labels != ignore_index)
    out = {
        "tokens": batch["tokens"].to(device),
        "labels": torch.where(valid, labels, torch.zeros_like(labels)).to(device),
        "loss_mask": (batch["loss_mask"] * valid).float().to(device),
        "position_ids": batch["position_ids"].to(device),
        "attn_mask": batch.get("attn_mask"),
    }
    if out["attn_mask"] is not None:
        out["attn_mask"] = out["attn_mask"].to(device)
    return out


class SFTBatcher:
    """Turns row indices into model-ready micro-batches (padded or packed)."""

    def __init__(self, dataset, max_seq_length: int, pad_id: int, pad_multiple: int,
                 ignore_index: int, packing: bool, device):
        self.packing = packing
        self.pad_id, self.pad_multiple, self.ignore_index = pad_id, pad_multiple, ignore_index
        self.device = device
        self.max_seq_length = round_up(max_seq_length, pad_multiple)
        if packing:
            self.rows = PackedSFTDataset(dataset, self.max_seq_length, pad_id)
            self._lengths = np.full(len(self.rows), self.max_seq_length)
            doc = np.asarray(dataset.lengths()) - 1
            self._real = np.array([int(doc[pack].sum()) for pack in self.rows.packs])
        else:
            self.rows = dataset
            self._lengths = np.asarray(dataset.lengths()) - 1  # positions after shifting
            self._real = self._lengths

    def __len__(self) -> int:
        return len(self.rows)

    def step_length(self, rows: np.ndarray) -> int:
        return round_up(int(self._lengths[rows].max()), self.pad_multiple)

    def real_tokens(self, rows: np.ndarray) -> int:
        return int(self._real[rows].sum())

    def microbatch(self, rows: np.ndarray, length: int, mask_rows: np.ndarray | None = None) -> dict:
        """``mask_rows`` (bool per row): rows whose loss is zeroed (eval filler rows)."""
        samples = [self.rows[int(i)] for i in rows]
        if self.packing:
            batch = {k: torch.as_tensor(np.stack([s[k] for s in samples]))
                     for k in ("tokens", "labels", "loss_mask", "position_ids")}
            # Megatron's masks are True where attention is *not* allowed.
            allowed = torch.stack([packed_attention_mask(torch.as_tensor(s["cu_seqlens"]), length)
                                   for s in samples])
            batch["attn_mask"] = ~allowed[:, None]
        else:
            batch = pad_batch(collate_sft(samples, self.pad_id), length, self.pad_id)
        if mask_rows is not None:
            batch["loss_mask"] = batch["loss_mask"] * torch.as_tensor(~mask_rows)[:, None]
        return finalize_for_model(batch, self.ignore_index, self.device)
