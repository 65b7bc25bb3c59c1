"""Model weights in Megatron's ``torch_dist`` format (``megatron.core.dist_checkpointing``).

A directory written by :func:`save_model_weights` loads at any other TP/PP/EP layout: Megatron
stores global tensors with their shard offsets and reshards on load. The training engine's
checkpoints (optimizer, scheduler, RNG, data position) build on the same calls.
"""

from __future__ import annotations

import os

import torch

from .config import ConfigError
from .lora_names import is_adapter_param


def is_dist_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "metadata.json"))


# Every decoder layer under its own global index (``decoder.layers.7.…``), dense models too:
# Megatron would otherwise stack the layers of a homogeneous (dense) model into one tensor per
# name with a leading layer axis; one key layout for all families keeps the HF mapping and the
# converters simple (Megatron is deprecating the stacked layout as well).
_SHARDED_METADATA = {"non_homogeneous_layers": True}


def model_sharded_state_dict(chunks: list[torch.nn.Module], adapters_only: bool = False) -> dict:
    """The Megatron sharded state dict of this rank's model chunks (what ``dist_checkpointing``
    saves and loads; the distributed optimizer's sharded state is built on top of it).
    ``adapters_only``: just the LoRA adapters and the other trainable top-level parameters (a
    LoRA run's checkpoints name their base instead of copying it)."""
    merged = {}
    # Virtual pipeline chunks share one checkpoint: each chunk's keys are global already.
    for chunk in chunks:
        merged.update(chunk.sharded_state_dict(metadata=dict(_SHARDED_METADATA)))
    if adapters_only:
        # The adapters and whatever else trains beside them (a reward or value head): top-level
        # parameters, whose sharded keys are their names.
        trainable = {n for c in chunks for n, p in c.named_parameters() if p.requires_grad}
        merged = {k: v for k, v in merged.items() if is_adapter_param(k) or k in trainable}
    return merged


def has_adapters(chunks: list[torch.nn.Module]) -> bool:
    return any(is_adapter_param(n) for c in chunks for n, _ in c.named_parameters())


def save_model_weights(chunks: list[torch.nn.Module], path: str, adapters_only: bool = False) -> None:
    """Collective: every rank writes its shards of the model weights to ``path``."""
    from megatron.core import dist_checkpointing

    if torch.distributed.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(model_sharded_state_dict(chunks, adapters_only), path)


def load_model_weights(chunks: list[torch.nn.Module], path: str, adapters_only: bool = False) -> None:
    """Collective: fill ``chunks`` (or only their adapters) from a ``torch_dist`` checkpoint
    written at any layout."""
    from megatron.core import dist_checkpointing

    if not is_dist_checkpoint(path):
        raise ConfigError(f"{path}: not a torch_dist checkpoint (no metadata.json)")
    state = dist_checkpointing.load(model_sharded_state_dict(chunks, adapters_only), path)
    for chunk in chunks:
        missing, _ = chunk.load_state_dict(state, strict=False)
        wanted = state.keys() if adapters_only else None
        missing = [k for k in missing if not k.endswith("_extra_state")
                   and (wanted is None or k in wanted)]
        if missing:
            raise ConfigError(f"{path}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:5]}")
