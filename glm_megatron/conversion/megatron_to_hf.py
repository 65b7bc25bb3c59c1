"""Megatron ``torch_dist`` weights -> an HF model directory that transformers loads directly.

No Megatron model is built: global tensors are read from the checkpoint
(:mod:`.dist_reader`), split back into HF tensors by the shared mapping
(``glm_megatron.models.hf_mapping.split``) and written as sharded safetensors with an index,
``config.json``, ``generation_config.json`` and, when a tokenizer is known, the tokenizer files
with the GLM chat template. Under torchrun the output shards are divided between the ranks.

Reward models (a ``reward_model.json`` beside the weights) are refused here: their
``output_layer.weight`` is the [1, H] score head; :mod:`.reward_export` writes them, from the
shard planning and tensor mapping of this module.
"""

from __future__ import annotations

import json
import os
import re
import time

import torch
from safetensors.torch import save_file

from ..models.checkpoint import is_dist_checkpoint
from ..models.checkpoint_dirs import REWARD_FILE, is_reward_checkpoint
from ..models.config import ConfigError, GLMConfig
from ..models.hf_layout import checkpoint_key_entries, expected_hf_tensors
from ..models.hf_mapping import MappingError, hf_sources, split
from ..models.lora_files import BASE_FILE, is_adapter_checkpoint
from . import hf_export_files, lora_export, output_dir, weights_dir
from .dist_reader import TorchDistReader

DEFAULT_SHARD_BYTES = 5 * 2**30
# Trainer-only tensors of a causal-LM checkpoint: PPO's value head on the policy trunk.
NOT_EXPORTED = {"value_head.weight"}  # models.policy_heads.VALUE_HEAD_KEY
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _unit(key: str) -> str:
    """Keys of one decoder / MTP layer are read together; everything else one by one."""
    match = re.match(r"^((decoder|mtp)\.layers\.\d+)\.", key)
    return match.group(1) if match else key


def plan_shards(reader: TorchDistReader, max_bytes: int) -> list[list[str]]:
    """The checkpoint keys to export (all but :data:`NOT_EXPORTED`), grouped into output shards
    of about ``max_bytes`` (a decoder / MTP layer is never split), in a fixed order."""
    units: dict[str, list[str]] = {}
    for key in sorted(reader.tensors):
        if key in NOT_EXPORTED:
            continue
        units.setdefault(_unit(key), []).append(key)
    shards, current, size = [], [], 0
    for keys in units.values():
        unit_bytes = sum(reader.nbytes(k) for k in keys)
        if current and size + unit_bytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current += keys
        size += unit_bytes
    if current:
        shards.append(current)
    return shards


def shard_names(count: int) -> list[str]:
    """HF's safetensors shard file names: ``model-00001-of-0000N.safetensors``, ..."""
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def checkpoint_tensor_to_hf(key: str, tensor: torch.Tensor, cfg: GLMConfig) -> dict[str, torch.Tensor]:
    """One global checkpoint tensor -> its HF tensors by name (a fused QKV or gate/up weight
    splits into several, a stacked expert tensor into one per expert), by the shared mapping."""
    out = {}
    for name, expert in checkpoint_key_entries(key, tuple(tensor.shape)):
        try:
            source = hf_sources(name, cfg)
        except MappingError as err:
            raise ConfigError(f"checkpoint tensor {key!r}: {err}") from None
        full = tensor if expert is None else tensor[expert]
        for hf_name, part in zip(source.hf_names, split(source, full, cfg)):
            out[hf_name] = part.contiguous()
    return out


def convert_megatron_to_hf(
    load: str,
    out_dir: str,
    *,
    hf_config_dir: str | None = None,
    tokenizer_dir: str | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
    barrier=lambda: None,
    adapter_only: bool = False,
    adjust=None,
) -> dict:
    """Write the HF directory. With ``world_size`` > 1 each rank writes every world_size-th shard.

    A LoRA run's checkpoint exports merged into its base, or with ``adapter_only`` as a PEFT
    adapter (:mod:`.lora_export`); ``adjust(hf_name, tensor)`` is how the merge reaches here.
    """
    start = time.time()
    output_dir.check_output_dir(out_dir, overwrite, inputs=(load, hf_config_dir, tokenizer_dir))
    weights = weights_dir.resolve_weights_dir(load)
    if is_adapter_checkpoint(weights):
        return _export_lora_run(weights, out_dir, adapter_only, start, locals())
    if adapter_only:
        raise ConfigError(f"--adapter-only: {weights} holds no LoRA adapters "
                          f"({BASE_FILE} missing)")
    if is_reward_checkpoint(weights):
        raise ConfigError(f"--load: {weights} is a reward model ({REWARD_FILE} beside it), not a "
                          "causal LM: export it with tools/convert_checkpoint.py reward-to-hf")
    cfg = weights_dir.read_model_config(weights, hf_config_dir)
    info = weights_dir.read_info(weights)
    reader = TorchDistReader(weights)
    with_mtp = any(k.startswith("mtp.") for k in reader.tensors)
    expected = expected_hf_tensors(cfg, with_mtp=with_mtp)
    hf_dtypes = {n: _DTYPES[d] for n, d in info.get("hf_dtypes", {}).items()}

    shards = plan_shards(reader, max_shard_bytes)
    names = shard_names(len(shards))
    tmp = output_dir.partial_path(out_dir)
    if rank == 0:
        output_dir.start(out_dir)
    barrier()

    weight_map, produced, total_bytes = {}, {}, 0
    bar = _bar(progress and rank == 0, sum(len(s) for s in shards[rank::world_size]))
    for index in range(rank, len(shards), world_size):
        tensors = {}
        for unit_keys in group_by_layer(shards[index]):
            loaded = reader.load(unit_keys)
            for key in unit_keys:
                for hf_name, t in checkpoint_tensor_to_hf(key, loaded.pop(key), cfg).items():
                    target = dtype or hf_dtypes.get(hf_name) or t.dtype
                    t = adjust(hf_name, t) if adjust is not None else t
                    tensors[hf_name] = t.to(target)
                if bar is not None:
                    bar.update(1)
        check_hf_shapes(tensors, expected, weights)
        save_file(tensors, os.path.join(tmp, names[index]), metadata={"format": "pt"})
        for hf_name, t in tensors.items():
            weight_map[hf_name] = names[index]
            produced[hf_name] = str(t.dtype).replace("torch.", "")
            total_bytes += t.numel() * t.element_size()
    if bar is not None:
        bar.close()
    # Each rank reports what it wrote; rank 0 checks completeness and writes the index.
    _write_part(tmp, rank, {"weight_map": weight_map, "bytes": total_bytes, "dtypes": produced})
    barrier()
    summary = {"tensors": 0, "bytes": 0, "seconds": 0.0, "shards": len(shards), "mtp": with_mtp}
    if rank == 0:
        weight_map, total_bytes, produced = _merge_parts(tmp, world_size)
        missing = sorted(set(expected) - set(weight_map))
        if missing:
            raise ConfigError(f"{weights}: checkpoint lacks {len(missing)} tensor(s) of the config: "
                              f"{', '.join(missing[:20])}")
        write_index(tmp, weight_map, total_bytes)
        main_dtype = produced.get("model.embed_tokens.weight", "bfloat16")
        hf_export_files.write_config(tmp, cfg, main_dtype, hf_config_dir)
        tok = hf_export_files.find_tokenizer_dir(tokenizer_dir, hf_config_dir, info.get("source"))
        if tokenizer_dir and tok is None:
            raise ConfigError(f"{tokenizer_dir}: no tokenizer.json or tokenizer.model found")
        copied = hf_export_files.copy_tokenizer(tok, tmp, cfg.model_type) if tok else []
        hf_export_files.write_generation_config(tmp, cfg, tok)
        output_dir.finish(out_dir)
        summary.update(tensors=len(weight_map), bytes=total_bytes, tokenizer=copied,
                       seconds=time.time() - start)
    barrier()
    return summary


def group_by_layer(keys: list[str]) -> list[list[str]]:
    """``keys`` in read groups: the keys of one decoder / MTP layer together, any other key
    alone (reading a group at a time keeps memory at about one layer)."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(_unit(key), []).append(key)
    return list(groups.values())


def check_hf_shapes(tensors: dict, expected: dict, where: str) -> None:
    """ConfigError (naming ``where``) unless every HF tensor in ``tensors`` is one of
    ``expected`` (name -> shape, ``models.hf_layout.expected_hf_tensors``) with its shape."""
    for name, t in tensors.items():
        if name not in expected:
            raise ConfigError(f"{where}: tensor {name} is not part of the model config")
        if tuple(t.shape) != expected[name]:
            raise ConfigError(f"{where}: shape mismatch: {name}: expected {expected[name]}, "
                              f"found {tuple(t.shape)}")


def write_index(out_dir: str, weight_map: dict[str, str], total_bytes: int) -> None:
    """``model.safetensors.index.json``: which shard holds each HF tensor, and the total size."""
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w", encoding="utf-8") as fh:
        json.dump({"metadata": {"total_size": total_bytes},
                   "weight_map": dict(sorted(weight_map.items()))}, fh, indent=2)


def _write_part(tmp: str, rank: int, data: dict) -> None:
    with open(os.path.join(tmp, f".part-{rank}.json"), "w", encoding="utf-8") as fh:
        json.dump(data, fh)


def _merge_parts(tmp: str, world_size: int):
    weight_map, total, dtypes = {}, 0, {}
    for r in range(world_size):
        file = os.path.join(tmp, f".part-{r}.json")
        with open(file, encoding="utf-8") as fh:
            part = json.load(fh)
        os.remove(file)
        weight_map.update(part["weight_map"])
        total += part["bytes"]
        dtypes.update(part["dtypes"])
    return weight_map, total, dtypes


def _bar(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="megatron-to-hf", unit="tensor", mininterval=2.0)


def _export_lora_run(weights: str, out_dir: str, adapter_only: bool, start: float,
                     call: dict) -> dict:
    """A LoRA checkpoint: its PEFT adapter, or its base exported with the adapters merged."""
    cfg = weights_dir.read_model_config(weights, call["hf_config_dir"])
    summary = {"tensors": 0, "bytes": 0, "shards": 1, "mtp": False, "tokenizer": []}
    if adapter_only:
        tmp = output_dir.partial_path(out_dir)
        if call["rank"] == 0:
            output_dir.start(out_dir)
            summary.update(lora_export.export_adapter(weights, tmp, cfg))
            output_dir.finish(out_dir)
        call["barrier"]()
        return dict(summary, seconds=time.time() - start)
    base, adjust = lora_export.merge_function(weights, hf_names_of, cfg)
    if is_dist_checkpoint(base):
        summary = convert_megatron_to_hf(
            base, out_dir, **{k: call[k] for k in (
                "hf_config_dir", "tokenizer_dir", "dtype", "max_shard_bytes", "overwrite",
                "progress", "rank", "world_size", "barrier")}, adjust=adjust)
    elif call["rank"] == 0:
        tmp = output_dir.partial_path(out_dir)
        output_dir.start(out_dir)
        summary.update(lora_export.write_merged_hf_copy(base, tmp, adjust))
        output_dir.finish(out_dir)
    return dict(summary, seconds=time.time() - start)


def hf_names_of(base: str) -> list[str]:
    """The HF tensor names of a base weights directory (torch_dist or HF safetensors)."""
    if is_dist_checkpoint(base):
        reader = TorchDistReader(base)
        cfg = weights_dir.read_model_config(base)
        return [name for key in reader.tensors
                for name in checkpoint_tensor_to_hf_names(key, reader.shape(key), cfg)]
    from ..models.hf_checkpoint import HFCheckpointReader

    return HFCheckpointReader(base).names()


def checkpoint_tensor_to_hf_names(key: str, shape: tuple, cfg: GLMConfig) -> list[str]:
    """The HF names :func:`checkpoint_tensor_to_hf` gives a checkpoint key (no data read)."""
    if key in NOT_EXPORTED:
        return []
    return [n for name, _ in checkpoint_key_entries(key, shape)
            for n in hf_sources(name, cfg).hf_names]
