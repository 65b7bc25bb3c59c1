"""Fold LoRA adapters into their base weights in memory: ``W ← W + s·B·A`` on this rank's shards.

What a LoRA run's checkpoint *means* as a full model (PPO's policy, reference or reward model
started from a LoRA SFT / RM run) without writing a merged copy of a base that may be 700 GB.
Each adapter's delta is computed on the shard its base linear holds, in the same row / column
layout its forward uses (models/lora.py): a column-parallel base's local rows are, per KV group
(or for ``fc1`` once), the segments' rows in order; a row-parallel base's local columns are
this rank's columns of A. The folded model then computes exactly what the adapters did (to
float rounding) and has no adapter left: new adapters (a LoRA PPO run) can be attached to it.
"""

from __future__ import annotations

import torch

from .lora import ColumnLora, RowLora
from .lora_names import ADAPTER_SUFFIX


def column_delta(adapter: ColumnLora, in_features: int) -> torch.Tensor:
    """``s·B·A`` of a column-parallel base's local rows: [local out, in]."""
    pieces = []
    for s in adapter.segments:
        pair = adapter.adapters[s.name] if s.name in adapter.adapters else None
        if pair is None:
            d = torch.zeros(adapter.groups * s.width, in_features, dtype=torch.float64)
        else:
            d = pair.lora_B[s.part].double() @ pair.lora_A.double()
        pieces.append(d.view(adapter.groups, s.width, in_features))
    return torch.cat(pieces, dim=1).reshape(-1, in_features) * adapter.settings.scale


def row_delta(adapter: RowLora) -> torch.Tensor:
    """``s·B·A`` of a row-parallel base's local columns: [out, local in]."""
    (pair,) = adapter.adapters.values()
    return (pair.lora_B["all"].double() @ pair.lora_A.double()) * adapter.settings.scale


def fold_adapters(chunks) -> int:
    """Add every adapter's delta to its base weight and remove the adapter; returns how many.

    The forward hook attach_lora registered stays behind as a no-op (``enabled`` is off and the
    module is gone from the tree, so its parameters leave the model and its checkpoints).
    """
    folded = 0
    for chunk in chunks:
        for owner in list(chunk.modules()):
            for name, adapter in list(owner.named_children()):
                if not name.endswith(ADAPTER_SUFFIX):
                    continue
                base = getattr(owner, name[: -len(ADAPTER_SUFFIX)])
                weight = base.weight
                if isinstance(adapter, ColumnLora):
                    delta = column_delta(adapter, weight.shape[1])
                elif isinstance(adapter, RowLora):
                    delta = row_delta(adapter)
                else:
                    raise TypeError(f"cannot fold a {type(adapter).__name__} adapter ({name})")
                if tuple(delta.shape) != tuple(weight.shape):
                    raise ValueError(f"{name}: adapter delta {tuple(delta.shape)} does not fit "
                                     f"its base weight {tuple(weight.shape)}")
                with torch.no_grad():
                    weight.copy_((weight.double() + delta.to(weight.device)).to(weight.dtype))
                adapter.enabled = False
                delattr(owner, name)
                folded += 1
    return folded
