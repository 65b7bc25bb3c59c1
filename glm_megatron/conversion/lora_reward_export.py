"""A LoRA reward model -> the HF sequence-classification directory of its merged weights.

A LoRA reward run saves the adapters and the score head only, naming its base (an HF directory
or a torch_dist checkpoint, usually the SFT model) in ``adapter_base.json``. The export is what
``reward-to-hf`` writes for a full reward model: the base's trunk under ``model.*`` with
``W + s·B·A`` on every adapted weight (and the fully trained modules, :mod:`.lora_export`), no
``lm_head``, and ``score.weight`` from the run. Tensors stream one base file (HF) or decoder
layer (torch_dist) at a time into shards of at most ``max_shard_bytes``.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import save_file

from ..models.checkpoint import is_dist_checkpoint
from ..models.config import ConfigError, GLMConfig
from ..models.hf_checkpoint import HFCheckpointReader
from . import lora_export, weights_dir
from .dist_reader import TorchDistReader
from .megatron_to_hf import checkpoint_tensor_to_hf, group_by_layer, hf_names_of, shard_names


def base_hf_tensors(base: str, cfg: GLMConfig):
    """(HF name, tensor) of every tensor of a base weights directory, streamed."""
    if is_dist_checkpoint(base):
        reader = TorchDistReader(base)
        for unit in group_by_layer(list(reader.tensors)):
            for key, tensor in reader.load(unit).items():
                yield from checkpoint_tensor_to_hf(key, tensor, cfg).items()
        return
    reader = HFCheckpointReader(base)
    for name in reader.names():
        yield name, reader.read(name)


def merged_reward_tensors(weights: str, cfg: GLMConfig, head: torch.Tensor, score_key: str):
    """(HF name, tensor) of the merged reward model: base trunk + adapters, then the head."""
    base, adjust = lora_export.merge_function(weights, hf_names_of, cfg)
    if not os.path.isdir(base):
        raise ConfigError(f"{weights}: its base weights {base} are gone (adapter_base.json)")
    base_cfg = weights_dir.read_model_config(base) if is_dist_checkpoint(base) else cfg
    for name, tensor in base_hf_tensors(base, base_cfg):
        if name == "lm_head.weight":
            continue  # a reward model scores with its head, not the LM head
        yield name, adjust(name, tensor)
    yield score_key, head


def write_streamed_shards(tensors, tmp: str, max_shard_bytes: int, dtype):
    """Save (name, tensor) pairs into HF-named shards in ``tmp``; returns (weight map, total
    bytes, {name: dtype name})."""
    parts, current, size, total, dtypes = [], {}, 0, 0, {}

    def flush():
        nonlocal current, size
        if current:
            name = f"part-{len(parts):05d}.safetensors"
            save_file(current, os.path.join(tmp, name), metadata={"format": "pt"})
            parts.append((name, list(current)))
            current, size = {}, 0

    for name, tensor in tensors:
        t = tensor.contiguous().to(dtype or tensor.dtype)
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            flush()
        current[name], size, total = t, size + nbytes, total + nbytes
        dtypes[name] = str(t.dtype).replace("torch.", "")
    flush()
    weight_map = {}
    for (part, names), final in zip(parts, shard_names(len(parts))):
        os.replace(os.path.join(tmp, part), os.path.join(tmp, final))
        weight_map.update({n: final for n in names})
    return weight_map, total, dtypes
