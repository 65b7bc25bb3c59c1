"""A LoRA run's checkpoint -> a PEFT adapter directory, or the merged model in HF format.

A LoRA checkpoint's ``model/`` holds only the adapters (global tensors: Megatron stores each
TP-sharded B and A whole) and ``adapter_base.json`` naming the base weights. The PEFT tensor of
a Megatron adapter parameter is found by name (``models.lora`` lays B's parts out like the base
weight's rows, so the global parts concatenated in order are PEFT's ``lora_B``).

* ``--adapter-only``: ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT's names,
  ``base_model_name_or_path`` = the base).
* merged (the default): the base exported as usual with ``W + s·B·A`` added to every adapted
  weight (HF ``*_proj.weight`` names; a fused ``gate_up_proj`` gets its one ``B·A``).
"""

from __future__ import annotations

import os
import re

import torch

from ..models.config import ConfigError
from ..models.lora import LoraSettings
from ..models.lora_files import read_adapter_base, write_peft_adapter
from .dist_reader import TorchDistReader

_KEY = re.compile(
    r"^decoder\.layers\.(\d+)\.(self_attention|mlp)\.linear_\w+_lora\.adapters\.(\w+)\."
    r"(lora_A|lora_B\.(\w+))$")
_OWNER = {"self_attention": "self_attn", "mlp": "mlp"}
_PART_ORDER = ("q", "k", "v", "gate", "up", "all")  # B parts in the rows order of the HF module


def peft_tensors_from_checkpoint(reader: TorchDistReader) -> dict[str, torch.Tensor]:
    """PEFT name -> full tensor, from the adapter keys of a torch_dist checkpoint."""
    a_tensors, b_parts = {}, {}
    keys = [k for k in reader.tensors if _KEY.match(k)]
    loaded = reader.load(keys)
    for key in keys:
        layer, owner, module, which, part = _KEY.match(key).groups()
        name = f"base_model.model.model.layers.{layer}.{_OWNER[owner]}.{module}."
        if which == "lora_A":
            a_tensors[name + "lora_A.weight"] = loaded[key]
        else:
            b_parts.setdefault(name + "lora_B.weight", {})[part] = loaded[key]
    out = dict(a_tensors)
    for name, parts in b_parts.items():
        out[name] = torch.cat([parts[p] for p in _PART_ORDER if p in parts], dim=0)
    return out


def settings_of(base: dict) -> LoraSettings:
    lora = base["lora"]
    return LoraSettings(r=lora["r"], alpha=lora["alpha"], dropout=lora["dropout"],
                        targets=tuple(lora["targets"]), rslora=lora["rslora"])


def export_adapter(weights_dir: str, out_dir: str, base_class: str) -> dict:
    """Write the PEFT directory of a LoRA checkpoint's weights dir; returns a summary."""
    base = read_adapter_base(weights_dir)
    tensors = peft_tensors_from_checkpoint(TorchDistReader(weights_dir))
    if not tensors:
        raise ConfigError(f"{weights_dir}: no LoRA adapter tensors in this checkpoint")
    write_peft_adapter(out_dir, settings_of(base), tensors, base["base"], base_class)
    return {"tensors": len(tensors), "base": base["base"],
            "bytes": sum(t.numel() * t.element_size() for t in tensors.values())}


def merge_function(weights_dir: str, base_names):
    """(base weights dir, ``adjust(hf_name, tensor) -> tensor``) that adds each adapter's
    ``s·B·A`` to its HF weight; ``adjust`` leaves every other tensor as it is.
    ``base_names(base) -> names`` lists the base's HF tensors: an adapted weight the base does
    not have is refused before anything is written."""
    base = read_adapter_base(weights_dir)
    settings = settings_of(base)
    tensors = peft_tensors_from_checkpoint(TorchDistReader(weights_dir))
    pairs = {}
    for name, a in tensors.items():
        if name.endswith(".lora_A.weight"):
            module = name[len("base_model.model."):-len(".lora_A.weight")]
            pairs[module + ".weight"] = (a, tensors[name.replace("lora_A", "lora_B")])
    if not os.path.isdir(base["base"]):
        raise ConfigError(f"{weights_dir}: its base weights {base['base']} are gone "
                          f"(adapter_base.json); export with --adapter-only")
    missing = sorted(set(pairs) - set(base_names(base["base"])))
    if missing:
        raise ConfigError(f"{weights_dir}: {len(missing)} adapted weight(s) are not in the base "
                          f"{base['base']}: {missing[:5]}")

    def adjust(hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        if hf_name not in pairs:
            return tensor
        a, b = pairs[hf_name]
        delta = (b.double() @ a.double()) * settings.scale
        return (tensor.double() + delta).to(tensor.dtype)

    return base["base"], adjust


def write_merged_hf_copy(base_hf_dir: str, tmp: str, adjust) -> dict:
    """The merged model when the base is an HF directory: its safetensors files rewritten with
    ``adjust`` applied, every other file (config, tokenizer, index) copied."""
    import shutil

    from safetensors.torch import load_file, save_file

    total, count = 0, 0
    for name in sorted(os.listdir(base_hf_dir)):
        src = os.path.join(base_hf_dir, name)
        if not os.path.isfile(src):
            continue
        if not name.endswith(".safetensors"):
            shutil.copyfile(src, os.path.join(tmp, name))
            continue
        tensors = {k: adjust(k, t) for k, t in load_file(src).items()}
        save_file(tensors, os.path.join(tmp, name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        count += len(tensors)
    return {"tensors": count, "bytes": total}
