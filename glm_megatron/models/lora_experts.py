"""The routed experts' LoRA tensors in PEFT adapter files, and the config keys that describe them.

Inside glm_megatron (adapters, checkpoints, merged export) every routed expert ``E`` of layer
``L`` has adapters of its own, named as if it were a module (``models.lora.peft_tensors``)::

    base_model.model.model.layers.L.mlp.experts.E.gate_up_proj.lora_A.weight   [R, H]
    base_model.model.model.layers.L.mlp.experts.E.gate_up_proj.lora_B.weight   [2I, R]  gate rows, up rows
    base_model.model.model.layers.L.mlp.experts.E.down_proj.lora_A.weight      [r, I]
    base_model.model.model.layers.L.mlp.experts.E.down_proj.lora_B.weight      [H, r]

peft 0.21.2 on transformers 5.24 adapts ``glm4_moe``'s fused expert parameters
(``mlp.experts.gate_up_proj`` [E, 2I, H], ``mlp.experts.down_proj`` [E, H, I]) with its
``ParamWrapper`` (``target_parameters``); what its ``save_pretrained`` writes, and so what our
export writes (*the v5 layout*), is one pair per layer and parameter::

    …mlp.experts.base_layer.lora_A.weight [E·R, H]   gate_up_proj (the inner wrapper when both
    …mlp.experts.base_layer.lora_B.weight [2I, R·E]   parameters are targeted)
    …mlp.experts.lora_A.weight            [E·r, I]   down_proj (or the only targeted one)
    …mlp.experts.lora_B.weight            [H, r·E]

with expert ``e``'s A in rows ``e·R … (e+1)·R`` and its B in columns ``k·E + e``
(``ParamWrapper.get_delta_weight``), ``target_parameters: [gate_up_proj, down_proj]`` and, for
``gate_proj`` + ``up_proj``, ``rank_pattern`` / ``alpha_pattern`` ``{".*\\.gate_up_proj": 2r / 2α}``.
This is the format peft reads back as it is; peft's ``ParamWrapper`` refuses ``lora_dropout``,
so the export writes 0 (dropout is a training-time choice; inference is the same).

Adapters trained with transformers 4 (*the v4 layout*: one module per expert,
``…mlp.experts.E.gate_proj`` / ``up_proj`` / ``down_proj``, each of rank r, ``target_modules``
``[gate_proj, up_proj, down_proj]``) are converted as peft converts them on load: the fused
adapter's A is ``cat(A_gate, A_up)`` (rank 2r), its B ``block_diag(B_gate, B_up)``, alpha 2α.
Such a file may also hold the shared expert's and the dense layers' adapters (transformers 4's
suffix matching took them); peft 0.21 drops those silently, we load them (as the
``shared_experts.*`` / ``mlp.*`` targets). peft's conversion keeps alpha/r for plain LoRA but
changes the rsLoRA scale of gate/up (``2α/√(2r)`` instead of ``α/√r``); we follow peft.
"""

from __future__ import annotations

import re
from dataclasses import replace

import torch

from .config import ConfigError
from .lora import ATTENTION_TARGETS, DENSE_LAYER_TARGETS, SHARED_EXPERT_TARGETS, LoraSettings

GATE_UP_PATTERN = r".*\.gate_up_proj"  # the rank_pattern / alpha_pattern key peft writes
_OURS = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.mlp\.experts\.(\d+)\."
                   r"(gate_up_proj|down_proj)\.lora_([AB])\.weight$")
_V4 = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.mlp\.experts\.(\d+)\."
                 r"(gate_proj|up_proj|down_proj)\.lora_([AB])\.weight$")
_V5 = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.mlp\.experts\.(base_layer\.)?"
                 r"lora_([AB])\.weight$")
_PARAM_TARGETS = {t + ".weight": t for t in SHARED_EXPERT_TARGETS + DENSE_LAYER_TARGETS}


def _v5_name(layer: str, nested: bool, which: str) -> str:
    return (f"base_model.model.model.layers.{layer}.mlp.experts."
            f"{'base_layer.' if nested else ''}lora_{which}.weight")


def to_peft_layout(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our per-expert tensors -> peft's fused v5 layout; every other tensor as it is."""
    out, experts = {}, {}
    for name, t in tensors.items():
        match = _OURS.match(name)
        if match is None:
            out[name] = t
            continue
        layer, e, module, which = match.groups()
        experts.setdefault((layer, module), {}).setdefault(int(e), {})[which] = t
    layers = {}
    for (layer, module) in experts:
        layers.setdefault(layer, set()).add(module)
    for (layer, module), per_expert in experts.items():
        count = len(per_expert)
        if sorted(per_expert) != list(range(count)):
            raise ConfigError(f"layer {layer} {module}: adapters for experts "
                              f"{sorted(per_expert)}, not 0..{count - 1}")
        a = torch.stack([per_expert[e]["A"] for e in range(count)])  # [E, R, in]
        b = torch.stack([per_expert[e]["B"] for e in range(count)])  # [E, out, R]
        nested = module == "gate_up_proj" and len(layers[layer]) == 2
        out[_v5_name(layer, nested, "A")] = a.reshape(-1, a.shape[-1])
        out[_v5_name(layer, nested, "B")] = b.permute(1, 2, 0).reshape(b.shape[1], -1)
    return out


def _from_v5(tensors, config: dict, settings: LoraSettings, where: str) -> dict:
    params = set(config.get("target_parameters") or ())
    both = {"gate_up_proj", "down_proj"} <= params
    outer = "down_proj" if "down_proj" in params else "gate_up_proj"
    out = {}
    for name, t in tensors.items():
        match = _V5.match(name)
        if match is None:
            out[name] = t
            continue
        layer, nested, which = match.groups()
        if nested and not both:
            raise ConfigError(f"{where}: {name} needs target_parameters gate_up_proj and down_proj")
        module = "gate_up_proj" if nested or not both and outer == "gate_up_proj" else "down_proj"
        rank = settings.expert_gate_up().r if module == "gate_up_proj" else settings.r
        if which == "A":
            if t.shape[0] % rank:
                raise ConfigError(f"{where}: {name}: {t.shape[0]} rows are not experts × rank {rank}")
            pieces = t.reshape(t.shape[0] // rank, rank, t.shape[1])
        else:
            if t.shape[1] % rank:
                raise ConfigError(f"{where}: {name}: {t.shape[1]} columns are not rank {rank} × experts")
            pieces = t.reshape(t.shape[0], rank, t.shape[1] // rank).permute(2, 0, 1)
        for e, piece in enumerate(pieces):
            key = f"base_model.model.model.layers.{layer}.mlp.experts.{e}.{module}.lora_{which}.weight"
            out[key] = piece.contiguous()
    return out


def _from_v4(tensors, where: str) -> dict:
    out, glu = {}, {}
    for name, t in tensors.items():
        match = _V4.match(name)
        if match is None or match.group(3) == "down_proj":
            out[name] = t
            continue
        layer, e, module, which = match.groups()
        glu.setdefault((layer, e), {})[(module, which)] = t
    for (layer, e), parts in glu.items():
        missing = [f"{m}.lora_{w}" for m in ("gate_proj", "up_proj") for w in "AB"
                   if (m, w) not in parts]
        if missing:
            raise ConfigError(f"{where}: layer {layer} expert {e} lacks {', '.join(missing)} "
                              "(gate_proj and up_proj are fused in transformers 5)")
        prefix = f"base_model.model.model.layers.{layer}.mlp.experts.{e}.gate_up_proj."
        out[prefix + "lora_A.weight"] = torch.cat([parts[("gate_proj", "A")],
                                                   parts[("up_proj", "A")]])
        out[prefix + "lora_B.weight"] = torch.block_diag(parts[("gate_proj", "B")],
                                                         parts[("up_proj", "B")])
    return out


def from_peft_layout(tensors: dict[str, torch.Tensor], config: dict, settings: LoraSettings,
                     where: str) -> dict[str, torch.Tensor]:
    """A PEFT file's tensors (v5 or v4 expert layout) -> our per-expert names."""
    return _from_v4(_from_v5(tensors, config, settings, where), where)


def expert_rank_settings(config: dict, settings: LoraSettings, where: str) -> LoraSettings:
    """The fused gate_up adapter's rank and alpha a PEFT file stands for."""
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    for pattern in (ranks, alphas):
        if set(pattern) - {GATE_UP_PATTERN}:
            raise ConfigError(f"{where}: rank_pattern / alpha_pattern other than "
                              f"{GATE_UP_PATTERN!r} are not supported, got {sorted(pattern)}")
    if "gate_up_proj" not in set(config.get("target_parameters") or ()):
        return settings  # none, or v4: peft's conversion doubles r and alpha (the default)
    return replace(settings, expert_gate_up_r=int(ranks.get(GATE_UP_PATTERN, settings.r)),
                   expert_gate_up_alpha=float(alphas.get(GATE_UP_PATTERN, settings.alpha)))


def check_target_parameters(config: dict, where: str) -> None:
    unknown = sorted(set(config.get("target_parameters") or ())
                     - {"gate_up_proj", "down_proj", *_PARAM_TARGETS})
    if unknown:
        raise ConfigError(f"{where}: target_parameters {unknown} are not supported (known: "
                          f"gate_up_proj, down_proj, {', '.join(_PARAM_TARGETS)})")


def peft_config_fields(settings: LoraSettings, is_moe: bool) -> dict:
    """``target_modules`` / ``target_parameters`` / patterns for an exported adapter_config.json."""
    targets = settings.targets
    if not is_moe:
        return {"target_modules": list(targets), "target_parameters": None,
                "rank_pattern": {}, "alpha_pattern": {}}
    params = (["gate_up_proj"] if "gate_proj" in targets else []) + \
        (["down_proj"] if "down_proj" in targets else [])
    params += [p for p, t in _PARAM_TARGETS.items() if t in targets]
    fields = {"target_modules": [t for t in targets if t in ATTENTION_TARGETS],
              "target_parameters": params or None, "rank_pattern": {}, "alpha_pattern": {}}
    if "gate_proj" in targets:
        fused = settings.expert_gate_up()
        fields["rank_pattern"] = {GATE_UP_PATTERN: fused.r}
        fields["alpha_pattern"] = {GATE_UP_PATTERN: fused.alpha}
    if params:
        fields["lora_dropout"] = 0.0  # peft's ParamWrapper refuses any other value
    return fields


def target_of_parameter(name: str) -> str | None:
    """Our target name of a ``target_parameters`` entry (``shared_experts.gate_proj.weight``)."""
    return _PARAM_TARGETS.get(name)
