"""Model weights in Megatron's ``torch_dist`` format (``megatron.core.dist_checkpointing``).

A directory written by :func:`save_model_weights` loads at any other TP/PP/EP layout: Megatron
stores global tensors with their shard offsets and reshards on load. The training engine's
checkpoints (optimizer, scheduler, RNG, data position) build on the same calls.
"""

from __future__ import annotations

import os

import torch

from .config import ConfigError


def is_dist_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "metadata.json"))


def model_sharded_state_dict(chunks: list[torch.nn.Module]) -> dict:
    """The Megatron sharded state dict of this rank's model chunks (what ``dist_checkpointing``
    saves and loads; the distributed optimizer's sharded state is built on top of it)."""
    if len(chunks) == 1:
        return chunks[0].sharded_state_dict()
    # Virtual pipeline chunks share one checkpoint: each chunk's keys are global already.
    merged = {}
    for chunk in chunks:
        merged.update(chunk.sharded_state_dict())
    return merged


def save_model_weights(chunks: list[torch.nn.Module], path: str) -> None:
    """Collective: every rank writes its shards of the model weights to ``path``."""
    from megatron.core import dist_checkpointing

    if torch.distributed.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(model_sharded_state_dict(chunks), path)


def load_model_weights(chunks: list[torch.nn.Module], path: str) -> None:
    """Collective: fill ``chunks`` from a ``torch_dist`` checkpoint written at any layout."""
    from megatron.core import dist_checkpointing

    if not is_dist_checkpoint(path):
        raise ConfigError(f"{path}: not a torch_dist checkpoint (no metadata.json)")
    state = dist_checkpointing.load(model_sharded_state_dict(chunks), path)
    for chunk in chunks:
        missing, _ = chunk.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing:
            raise ConfigError(f"{path}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:5]}")
