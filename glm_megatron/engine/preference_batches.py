"""Preference pairs as model-ready micro-batches (the reward model, DPO).

A micro-batch of B pairs is one ``[2B, T]`` forward pass, the B chosen rows first, then the B
rejected rows in the same order: chosen and rejected of a pair always share a micro-batch and a
data-parallel rank. Row scheduling (the deterministic global-batch plan, resume position) is the
engine's ``StepPlanner`` (engine/batching.py), applied to pairs.

Rows are right-padded (the trainer's default: with causal attention no real token sees padding,
so no attention mask is needed); :func:`build_inputs` also left-pads, with positions that start
at each sequence's first real token and a mask that hides the padding.
"""

from __future__ import annotations

import numpy as np
import torch

from ..models.reward_head import last_token_index
from .batching import round_up


def build_inputs(seqs: list, length: int, pad_id: int, padding_side: str = "right") -> dict:
    """``tokens``, ``position_ids``, ``attn_mask`` (None for right padding) and ``last_index``
    of a list of token sequences padded to ``length``."""
    if padding_side not in ("right", "left"):
        raise ValueError("padding_side must be 'right' or 'left'")
    b = len(seqs)
    tokens = torch.full((b, length), pad_id, dtype=torch.long)
    real = torch.zeros((b, length), dtype=torch.bool)
    for i, s in enumerate(seqs):
        n = len(s)
        if n == 0 or n > length:
            raise ValueError(f"sequence {i} has {n} tokens, expected 1..{length}")
        sl = slice(length - n, length) if padding_side == "left" else slice(0, n)
        tokens[i, sl] = torch.as_tensor(np.asarray(s, dtype=np.int64))
        real[i, sl] = True
    positions = (real.long().cumsum(1) - 1).clamp(min=0)
    attn_mask = None
    if padding_side == "left":
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        allowed = causal[None] & real[:, None, :]
        allowed |= torch.eye(length, dtype=torch.bool)[None]  # padding queries: no empty rows
        attn_mask = ~allowed[:, None]  # Megatron: True = not attended
    return {"tokens": tokens, "position_ids": positions, "attn_mask": attn_mask,
            "last_index": last_token_index(real)}


class PreferenceBatcher:
    """Row indices -> ``[2B, T]`` micro-batches with what the ranking loss needs."""

    def __init__(self, dataset, pad_id: int, pad_multiple: int, default_margin: float, device):
        self.rows, self.pad_id, self.pad_multiple = dataset, pad_id, pad_multiple
        self.default_margin, self.device = default_margin, device
        self._lengths = np.asarray(dataset.lengths())

    def __len__(self) -> int:
        return len(self.rows)

    def step_length(self, rows: np.ndarray) -> int:
        # One length for every micro-batch of a step: the pipeline sends fixed shapes and the MoE
        # all-gather dispatcher needs equal token counts on every expert-parallel rank.
        return round_up(int(self._lengths[rows].max()), self.pad_multiple)

    def real_tokens(self, rows: np.ndarray) -> int:
        return int(sum(len(self.rows[int(i)]["chosen_input_ids"])
                       + len(self.rows[int(i)]["rejected_input_ids"]) for i in rows))

    def microbatch(self, rows: np.ndarray, length: int, mask_rows: np.ndarray | None = None) -> dict:
        """``mask_rows`` (bool per pair): pairs that count for nothing (eval filler)."""
        samples = [self.rows[int(i)] for i in rows]
        seqs = [s["chosen_input_ids"] for s in samples] + [s["rejected_input_ids"] for s in samples]
        batch = build_inputs(seqs, length, self.pad_id)
        margin = torch.tensor([_margin(s, self.default_margin) for s in samples],
                              dtype=torch.float32)
        weight = torch.ones(len(samples)) if mask_rows is None else torch.as_tensor(~mask_rows).float()
        out = {**batch, "margin": margin, "weight": weight}
        return {k: (v.to(self.device) if v is not None else None) for k, v in out.items()}


def _margin(sample: dict, default: float) -> float:
    """The pair's margin from the data; NaN (none given) or an older dataset: the config's."""
    if "margin" not in sample:
        return default
    value = float(np.asarray(sample["margin"]).reshape(-1)[0])
    return default if value != value else value
