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
from .torch_dist_files import checked_read, read_metadata


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
    sharded = model_sharded_state_dict(chunks, adapters_only)
    with checked_read(path):
        check_shapes(sharded, read_metadata(path), path)
        state = dist_checkpointing.load(sharded, path)
    for chunk in chunks:
        missing, _ = chunk.load_state_dict(state, strict=False)
        wanted = state.keys() if adapters_only else None
        missing = [k for k in missing if not k.endswith("_extra_state")
                   and (wanted is None or k in wanted)]
        if missing:
            raise ConfigError(f"{path}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:5]}")


def _sharded_tensors(tree):
    """The ShardedTensors of a (nested) sharded state dict."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    if isinstance(tree, ShardedTensor):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from _sharded_tensors(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _sharded_tensors(value)


def check_shapes(sharded: dict, metadata, path: str) -> None:
    """Before a load: every tensor the model asks for exists in the checkpoint with the model's
    global shape (a checkpoint of another architecture otherwise fails deep inside
    dist_checkpointing, once per rank). Raises ConfigError naming the tensors and both shapes."""
    saved = metadata.state_dict_metadata
    missing, differ = [], []
    for sh in _sharded_tensors(sharded):
        meta = saved.get(sh.key)
        if meta is None:
            missing.append(sh.key)
        elif not sh.allow_shape_mismatch and hasattr(meta, "size") \
                and tuple(meta.size) != tuple(sh.global_shape):
            differ.append(f"{sh.key}: checkpoint {tuple(meta.size)} vs model {tuple(sh.global_shape)}")
    if differ:
        raise ConfigError(f"{path}: the checkpoint does not fit the model being built "
                          f"({len(differ)} tensor shape(s) differ: {'; '.join(differ[:4])}); is the "
                          "model config (preset) the checkpoint's architecture?")
    if missing:
        raise ConfigError(f"{path}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:5]}")
