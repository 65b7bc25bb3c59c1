"""A LoRA run's checkpoint -> a PEFT adapter directory, or the merged model in HF format.

A LoRA checkpoint's ``model/`` holds only the trainable tensors (global tensors: Megatron stores
each TP-sharded B and A whole, routed experts' adapters stacked along a leading expert axis) and
``adapter_base.json`` naming the base and the LoRA settings. The PEFT tensor of a Megatron adapter
parameter is found by name (``models.lora`` lays B's parts out like the base weight's rows, so the
global parts concatenated in order are PEFT's ``lora_B``); a module trained fully
(``lora_modules_to_save``) maps to its HF tensors like any model weight.

* ``--adapter-only``: ``adapter_config.json`` + ``adapter_model.safetensors`` (peft's names and,
  for the routed experts, peft's fused layout: models/lora_experts.py; ``base_model_name_or_path``
  = the base; the modules to save as ``base_model.model.<HF name>``).
* merged (the default): the base exported as usual with ``W + s·B·A`` added to every adapted
  weight (HF ``*_proj.weight`` names; a fused ``gate_up_proj`` gets its one ``B·A``, a routed
  expert's fused adapter its gate rows and up rows on ``gate_proj`` / ``up_proj``) and the fully
  trained modules' tensors in place of the base's.
"""

from __future__ import annotations

import os
import re

import torch

from ..models.config import ConfigError, GLMConfig
from ..models.lora import LoraSettings
from ..models.lora_experts import to_peft_layout
from ..models.lora_files import read_adapter_base, write_peft_adapter
from ..models.lora_names import is_adapter_param
from ..models.lora_saved_modules import PEFT_PREFIX
from .dist_reader import TorchDistReader

_KEY = re.compile(
    r"^decoder\.layers\.(\d+)\.(self_attention|mlp|mlp\.shared_experts|mlp\.experts\.experts)\."
    r"linear_\w+_lora\.adapters\.(\w+)\.(lora_A|lora_B\.(\w+))$")
_OWNER = {"self_attention": "self_attn", "mlp": "mlp", "mlp.shared_experts": "mlp.shared_experts",
          "mlp.experts.experts": "mlp.experts"}
_PART_ORDER = ("q", "k", "v", "gate", "up", "all")  # B parts in the rows order of the HF module
_FUSED_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts\.\d+\.)gate_up_proj$")


def peft_tensors_from_checkpoint(reader: TorchDistReader) -> dict[str, torch.Tensor]:
    """PEFT name -> full tensor, from the adapter keys of a torch_dist checkpoint (routed experts
    one module per expert, as ``models.lora.peft_tensors`` names them)."""
    a_tensors, b_parts = {}, {}
    keys = [k for k in reader.tensors if _KEY.match(k)]
    loaded = reader.load(keys)
    for key in keys:
        layer, owner, module, which, part = _KEY.match(key).groups()
        prefix = f"base_model.model.model.layers.{layer}.{_OWNER[owner]}."
        tensor = loaded[key]
        per_expert = list(enumerate(tensor)) if owner == "mlp.experts.experts" else [(None, tensor)]
        for e, t in per_expert:
            name = f"{prefix}{'' if e is None else f'{e}.'}{module}."
            if which == "lora_A":
                a_tensors[name + "lora_A.weight"] = t
            else:
                b_parts.setdefault(name + "lora_B.weight", {})[part] = t
    out = dict(a_tensors)
    for name, parts in b_parts.items():
        out[name] = torch.cat([parts[p] for p in _PART_ORDER if p in parts], dim=0)
    return out


def saved_module_tensors(reader: TorchDistReader, cfg: GLMConfig, base: dict) -> dict:
    """``base_model.model.<HF name>`` -> tensor of the modules the run trained fully."""
    if not base["lora"].get("modules_to_save"):
        return {}
    from .megatron_to_hf import checkpoint_tensor_to_hf

    keys = [k for k in reader.tensors if not is_adapter_param(k)]
    out = {}
    for key, tensor in reader.load(keys).items():
        try:
            hf = checkpoint_tensor_to_hf(key, tensor, cfg)
        except ConfigError:
            continue  # a head trained beside the adapters (a reward model's): not an HF tensor
        out.update({PEFT_PREFIX + name: t for name, t in hf.items()})
    return out


def settings_of(base: dict) -> LoraSettings:
    lora = base["lora"]
    return LoraSettings(r=lora["r"], alpha=lora["alpha"], dropout=lora["dropout"],
                        targets=tuple(lora["targets"]), rslora=lora["rslora"],
                        modules_to_save=tuple(lora.get("modules_to_save") or ()),
                        expert_gate_up_r=lora.get("expert_gate_up_r"),
                        expert_gate_up_alpha=lora.get("expert_gate_up_alpha"))


def export_adapter(weights_dir: str, out_dir: str, cfg: GLMConfig) -> dict:
    """Write the PEFT directory of a LoRA checkpoint's weights dir; returns a summary."""
    base = read_adapter_base(weights_dir)
    reader = TorchDistReader(weights_dir)
    tensors = peft_tensors_from_checkpoint(reader)
    if not tensors:
        raise ConfigError(f"{weights_dir}: no LoRA adapter tensors in this checkpoint")
    tensors = to_peft_layout(tensors)
    tensors.update(saved_module_tensors(reader, cfg, base))
    write_peft_adapter(out_dir, settings_of(base), tensors, base["base"],
                       cfg.family.causal_lm_class, is_moe=cfg.is_moe)
    return {"tensors": len(tensors), "base": base["base"],
            "bytes": sum(t.numel() * t.element_size() for t in tensors.values())}


def merge_function(weights_dir: str, base_names, cfg: GLMConfig):
    """(base weights dir, ``adjust(hf_name, tensor) -> tensor``) that adds each adapter's
    ``s·B·A`` to its HF weight and puts the fully trained modules' tensors in place; ``adjust``
    leaves every other tensor as it is. ``base_names(base) -> names`` lists the base's HF
    tensors: an adapted weight the base does not have is refused before anything is written."""
    base = read_adapter_base(weights_dir)
    settings = settings_of(base)
    reader = TorchDistReader(weights_dir)
    tensors = peft_tensors_from_checkpoint(reader)
    deltas = {}  # HF weight -> (A, B, scale)
    for name, a in tensors.items():
        if not name.endswith(".lora_A.weight"):
            continue
        module = name[len("base_model.model."):-len(".lora_A.weight")]
        b = tensors[name.replace("lora_A", "lora_B")]
        fused = _FUSED_EXPERT.match(module)
        if fused:  # a routed expert's gate_up_proj: its gate rows, then its up rows
            scale = settings.expert_gate_up().scale
            gate, up = b.chunk(2, dim=0)
            deltas[fused.group(1) + "gate_proj.weight"] = (a, gate, scale)
            deltas[fused.group(1) + "up_proj.weight"] = (a, up, scale)
        else:
            deltas[module + ".weight"] = (a, b, settings.scale)
    replaced = {k[len(PEFT_PREFIX):]: t for k, t in saved_module_tensors(reader, cfg, base).items()}
    if not os.path.isdir(base["base"]):
        raise ConfigError(f"{weights_dir}: its base weights {base['base']} are gone "
                          f"(adapter_base.json); export with --adapter-only")
    missing = sorted((set(deltas) | set(replaced)) - set(base_names(base["base"])))
    if missing:
        raise ConfigError(f"{weights_dir}: {len(missing)} adapted weight(s) are not in the base "
                          f"{base['base']}: {missing[:5]}")

    def adjust(hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        if hf_name in replaced:
            return replaced[hf_name].to(tensor.dtype)
        if hf_name not in deltas:
            return tensor
        a, b, scale = deltas[hf_name]
        delta = (b.double() @ a.double()) * scale
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
