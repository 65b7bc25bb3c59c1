"""``lora_modules_to_save``: whole HF modules trained beside the LoRA adapters (peft's
``modules_to_save``, TRL's ``lora_modules_to_save``).

peft wraps every module of the HF model whose name *ends with* a listed string — a plain string
suffix, so ``norm`` also takes every ``input_layernorm``, ``post_attention_layernorm``, ``q_norm``
(checked on peft 0.21.2) — and trains a copy of it. The same rule picks the HF modules here; their
tensors map to Megatron parameters through :mod:`.hf_mapping`, which train fully, sit in the
adapter-only checkpoints (they require grad), go into the PEFT directory under peft's names
(``base_model.model.<HF tensor name>``, what peft's ``save_pretrained`` writes and its
``from_pretrained`` reads) and replace the base's tensors in the merged export.

Refused, naming the key: a name that matches no module (the valid ones are listed); the routed
experts (fused 3D parameters in transformers 5); a module whose tensors Megatron fuses with
tensors outside it (``q_proj`` lives in ``linear_qkv`` with ``k_proj`` and ``v_proj``;
``gate_proj`` in ``linear_fc1`` with ``up_proj``); the router (its expert bias is a frozen
buffer); a module that LoRA also adapts.
"""

from __future__ import annotations

import re

import torch

from .config import ConfigError, GLMConfig
from .hf_layout import expected_hf_tensors
from .hf_mapping import MappingError, combine, global_name, hf_sources, partition_dim, shard

PEFT_PREFIX = "base_model.model."
SAVED_MODULE_ATTR = "lora_module_to_save"  # marks the Megatron parameters that train fully
_EXPERTS = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.")
# Megatron tensors made of several HF tensors (hf_mapping's "qkv" and "glu" kinds).
_QKV = re.compile(r"^(.*\.self_attn\.)[qkv]_proj\.(weight|bias)$")
_GLU = re.compile(r"^(.*\.)(gate|up)_proj\.weight$")


def _hf_tensors(cfg: GLMConfig) -> list[str]:
    return list(expected_hf_tensors(cfg, with_mtp=False))  # transformers drops the MTP layer


def hf_modules(cfg: GLMConfig) -> dict[str, list[str]]:
    """HF module name -> its tensors, as transformers 5 builds the model: the routed experts of
    a layer are one module (``…mlp.experts``) holding fused parameters."""
    modules: dict[str, list[str]] = {}
    for name in _hf_tensors(cfg):
        experts = _EXPERTS.match(name)
        parts = (experts.group(1) + ".x").split(".") if experts else name.split(".")
        for k in range(1, len(parts)):
            modules.setdefault(".".join(parts[:k]), []).append(name)
    return modules


def _fused_with(name: str) -> set[str]:
    """The HF tensors that share ``name``'s Megatron tensor (``name`` included)."""
    qkv = _QKV.match(name)
    if qkv:
        return {f"{qkv.group(1)}{p}_proj.{qkv.group(2)}" for p in "qkv"}
    glu = _GLU.match(name)
    if glu and ".mlp.experts." not in name:
        return {f"{glu.group(1)}gate_proj.weight", f"{glu.group(1)}up_proj.weight"}
    return {name}


def adapted_hf_tensors(cfg: GLMConfig, targets) -> set[str]:
    """HF weights that LoRA targets adapt (see models/lora.py for the MoE names)."""
    out = set()
    for name in _hf_tensors(cfg):
        module = name.rsplit(".", 2)
        if len(module) < 3 or ".mlp.experts." in name:
            continue
        owner, leaf = module[0], module[1]
        if owner.endswith(".self_attn") or not cfg.is_moe:
            wanted = leaf
        elif owner.endswith(".mlp.shared_experts"):
            wanted = "shared_experts." + leaf
        else:
            wanted = "mlp." + leaf
        if wanted in targets:
            out.add(name)
    return out


def _problem(name: str, matched: list[str], tensors: set[str], adapted: set[str]) -> str:
    """Why ``name`` cannot be trained fully ('' if it can)."""
    if not matched:
        return "matches no module"
    if any(".mlp.experts." in t for t in tensors):
        return "takes the routed experts (fused parameters in transformers 5), which cannot train fully"
    if any(t.endswith("e_score_correction_bias") for t in tensors):
        return "takes the router, whose expert bias is a frozen buffer"
    for t in sorted(tensors):
        missing = sorted(_fused_with(t) - tensors)
        if missing:
            return (f"takes {t}, which Megatron fuses with {', '.join(missing)} into one tensor: "
                    "name a module holding all of them")
    overlap = sorted(tensors & adapted)
    if overlap:
        return f"takes {overlap[0]}, which a LoRA target adapts"
    return ""


def _matched(modules: dict[str, list[str]], name: str) -> list[str]:
    return [m for m in modules if m.endswith(name)]


def _selected(modules: dict[str, list[str]], names) -> set[str]:
    return {t for n in names for m in _matched(modules, n) for t in modules[m]}


def saved_hf_tensors(cfg: GLMConfig, names) -> set[str]:
    """The HF tensors of the modules ``names`` selects (peft's suffix rule)."""
    return _selected(hf_modules(cfg), names)


def _valid(cfg: GLMConfig, modules, adapted) -> list[str]:
    leaves = sorted({m.rsplit(".", 1)[-1] for m in modules if not m.rsplit(".", 1)[-1].isdigit()})
    return [leaf for leaf in leaves
            if not _problem(leaf, _matched(modules, leaf), _selected(modules, [leaf]), adapted)]


def valid_modules_to_save(cfg: GLMConfig, targets=()) -> list[str]:
    """Leaf module names that can train fully (for error messages)."""
    return _valid(cfg, hf_modules(cfg), adapted_hf_tensors(cfg, targets))


def resolve_modules_to_save(cfg: GLMConfig, requested, targets=(),
                            key: str = "model.lora_modules_to_save") -> tuple[str, ...]:
    """Validate ``requested`` HF module names against the model; raises naming ``key``."""
    names = [requested] if isinstance(requested, str) else list(requested or ())
    if not names:
        return ()
    modules, adapted = hf_modules(cfg), adapted_hf_tensors(cfg, targets)
    for name in names:
        problem = _problem(name, _matched(modules, name), _selected(modules, [name]), adapted)
        if problem:
            raise ConfigError(f"{key}: {name} {problem} (modules a {cfg.model_type} model can "
                              f"train fully: {', '.join(_valid(cfg, modules, adapted))})")
    return tuple(dict.fromkeys(names))


def mapped_parameters(chunk, cfg: GLMConfig):
    """(parameter, its HF source) for this chunk's non-expert parameters with an HF counterpart."""
    layers = getattr(getattr(chunk, "decoder", None), "layers", None)
    offset = layers[0].layer_number - 1 if layers is not None and len(layers) else 0
    for local_name, param in chunk.named_parameters():
        if ".mlp.experts." in local_name:
            continue
        name = global_name(local_name, layer_offset=offset, expert_offset=0)
        try:
            source = hf_sources(name, cfg)
        except MappingError:
            continue  # an adapter, a reward / value head: not an HF model tensor
        yield name, param, source


def unfreeze_modules_to_save(chunk, cfg: GLMConfig, names) -> int:
    """Make the Megatron parameters of the HF modules ``names`` trainable; returns how many."""
    saved = saved_hf_tensors(cfg, names)
    count = 0
    for _, param, source in mapped_parameters(chunk, cfg):
        if set(source.hf_names) <= saved:
            param.requires_grad_(True)
            setattr(param, SAVED_MODULE_ATTR, True)
            count += 1
    return count


def load_saved_modules(chunks, cfg: GLMConfig, tensors: dict[str, torch.Tensor],
                       source_file: str) -> set[str]:
    """Copy the PEFT file's modules_to_save tensors (``base_model.model.<HF name>``) into this
    rank's (trainable) parameters; returns the names used."""
    from megatron.core import parallel_state as ps

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    used = set()
    for chunk in chunks:
        for name, param, source in mapped_parameters(chunk, cfg):
            if not getattr(param, SAVED_MODULE_ATTR, False):
                continue
            keys = [PEFT_PREFIX + n for n in source.hf_names]
            missing = [k for k in keys if k not in tensors]
            if missing:
                raise ConfigError(f"{source_file}: adapter has no tensor {missing[0]} "
                                  "(a module to save)")
            full = combine(source, [tensors[k] for k in keys], cfg)
            piece = shard(full, source, partition_dim(name), rank, tp)
            if tuple(piece.shape) != tuple(param.shape):
                raise ConfigError(f"{source_file}: {keys[0]}: shape {tuple(full.shape)} does not "
                                  f"fit this model (this rank expects {tuple(param.shape)})")
            with torch.no_grad():
                param.copy_(piece.to(param.dtype))
            used.update(keys)
    return used
