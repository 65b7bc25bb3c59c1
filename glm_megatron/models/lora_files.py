"""PEFT's adapter directory: ``adapter_config.json`` + ``adapter_model.safetensors``.

Written by our exports and read when a run starts from an adapter trained elsewhere. The
format is peft's (``peft.PeftModel.from_pretrained`` loads what we write; the tests check it),
but peft itself is not imported: the library only needs the two files.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace

import torch
from safetensors.torch import load_file, save_file

from .config import ConfigError, GLMConfig
from .lora import LoraSettings

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def read_peft_adapter(path: str, cfg: GLMConfig) -> tuple[LoraSettings, dict[str, torch.Tensor], dict]:
    """(settings, tensors, the raw adapter_config) of a PEFT LoRA directory for ``cfg``'s model;
    errors name the file.

    The tensors come back in our per-module names (routed experts one module per expert:
    models/lora_experts.py converts peft's fused and transformers-4 layouts), the settings'
    targets are those the tensors stand for, ``modules_to_save`` are checked against the model.
    """
    from .lora import adapter_targets, resolve_targets
    from .lora_experts import (
        check_target_parameters,
        expert_rank_settings,
        from_peft_layout,
    )
    from .lora_saved_modules import resolve_modules_to_save

    config_file, weights_file = os.path.join(path, CONFIG_FILE), os.path.join(path, WEIGHTS_FILE)
    for f in (config_file, weights_file):
        if not os.path.isfile(f):
            raise ConfigError(f"{f}: no such file (expected a PEFT adapter directory)")
    try:
        with open(config_file, encoding="utf-8") as fh:
            config = json.load(fh)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{config_file}: not valid JSON ({err})") from None
    if config.get("peft_type") != "LORA":
        raise ConfigError(f"{config_file}: peft_type {config.get('peft_type')!r} is not LORA")
    unsupported = [k for k in ("use_dora", "layers_to_transform", "trainable_token_indices")
                   if config.get(k)]
    if unsupported or config.get("bias", "none") != "none":
        raise ConfigError(f"{config_file}: {', '.join(unsupported) or 'bias'} is not supported")
    check_target_parameters(config, config_file)
    targets = config.get("target_modules")
    if isinstance(targets, str) or not (targets or config.get("target_parameters")):
        raise ConfigError(f"{config_file}: target_modules must be a list of module names, got "
                          f"{targets!r}")
    try:
        settings = LoraSettings(r=int(config["r"]), alpha=float(config["lora_alpha"]),
                                dropout=float(config.get("lora_dropout", 0.0)),
                                rslora=bool(config.get("use_rslora", False)))
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"{config_file}: bad or missing key ({err})") from None
    settings = expert_rank_settings(config, settings, config_file)
    try:
        tensors = load_file(weights_file)
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise ConfigError(f"{weights_file}: not a readable safetensors file ({err})") from None
    tensors = from_peft_layout(tensors, config, settings, weights_file)
    found = adapter_targets(cfg, tensors)
    settings = replace(settings, targets=resolve_targets(cfg, found or ["nothing"],
                                                         key=f"{weights_file} adapters"))
    saved = resolve_modules_to_save(cfg, config.get("modules_to_save") or (), settings.targets,
                                    key=f"{config_file} modules_to_save")
    return replace(settings, modules_to_save=saved), tensors, config


def write_peft_adapter(path: str, settings: LoraSettings, tensors: dict[str, torch.Tensor],
                       base_model: str | None, base_class: str, is_moe: bool = False) -> None:
    """Write ``tensors`` (PEFT names, full tensors, in peft's layout: see models/lora_experts.py)
    and the config peft reads."""
    from .lora_experts import peft_config_fields

    os.makedirs(path, exist_ok=True)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": settings.r,
        "lora_alpha": settings.alpha, "lora_dropout": settings.dropout,
        "use_rslora": settings.rslora,
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
        "inference_mode": True, "modules_to_save": list(settings.modules_to_save) or None,
        "base_model_name_or_path": base_model,
        "auto_mapping": {"base_model_class": base_class, "parent_library": "transformers"},
    }
    config.update(peft_config_fields(settings, is_moe))
    with open(os.path.join(path, CONFIG_FILE), "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(path, WEIGHTS_FILE),
              metadata={"format": "pt"})


BASE_FILE = "adapter_base.json"  # beside a LoRA run's adapter-only weights
_METADATA_FILES = ("metadata.json", ".metadata", "model.safetensors.index.json", "config.json",
                   "model_config.json")


def base_fingerprint(path: str) -> str:
    """A cheap identity of a weights directory (torch_dist or HF): a hash of its metadata files
    and of every file's name and size — not of the weight bytes, which may be hundreds of GB."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            continue
        digest.update(f"{name}:{os.path.getsize(full)}\n".encode())
        if name in _METADATA_FILES:
            with open(full, "rb") as fh:
                digest.update(fh.read())
    return digest.hexdigest()[:16]


def adapter_base_record(base: str, settings: LoraSettings, model_type: str) -> dict:
    """What a LoRA checkpoint says about the base its adapters belong to."""
    return {"base": os.path.abspath(base), "fingerprint": base_fingerprint(base),
            "model_type": model_type,
            "lora": {"r": settings.r, "alpha": settings.alpha, "dropout": settings.dropout,
                     "targets": list(settings.targets), "rslora": settings.rslora,
                     "modules_to_save": list(settings.modules_to_save),
                     "expert_gate_up_r": settings.expert_gate_up_r,
                     "expert_gate_up_alpha": settings.expert_gate_up_alpha}}


def is_adapter_checkpoint(weights_dir: str) -> bool:
    return os.path.isfile(os.path.join(weights_dir, BASE_FILE))


def read_adapter_base(weights_dir: str) -> dict | None:
    file = os.path.join(weights_dir, BASE_FILE)
    if not os.path.isfile(file):
        return None
    with open(file, encoding="utf-8") as fh:
        return json.load(fh)


def check_same_base(saved: dict, current: dict, where: str) -> None:
    """Refuse adapters trained on another base, naming both."""
    if saved["fingerprint"] != current["fingerprint"]:
        raise ConfigError(
            f"{where}: its adapters were trained on {saved['base']} (fingerprint "
            f"{saved['fingerprint']}), but this run's base is {current['base']} (fingerprint "
            f"{current['fingerprint']})")
