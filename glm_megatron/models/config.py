"""The GLM model configuration: read from an HF ``config.json`` or a named preset.

:class:`GLMConfig` mirrors the HF field names so a user can read it next to the checkpoint's
``config.json``; :mod:`.megatron_config` turns it into Megatron's ``TransformerConfig``. One
dataclass serves the MoE family (``glm4_moe``) and the dense ones (``glm``, ``glm4``): a dense
config has no experts and no MTP layer; :mod:`.families` says what else differs.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields

from ..parallel.layout import ModelShape
from .families import DENSE_HF_KEYS, SUPPORTED_MODEL_TYPES, ModelFamily, get_family


class ConfigError(ValueError):
    """A model configuration that is malformed or unsupported (names the file and key)."""


@dataclass(frozen=True)
class GLMConfig:
    vocab_size: int = 151552
    hidden_size: int = 4096
    intermediate_size: int = 10944  # dense layers' FFN
    num_hidden_layers: int = 46
    num_attention_heads: int = 96
    num_key_value_heads: int = 8
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1_000_000.0
    partial_rotary_factor: float = 0.5
    attention_bias: bool = True  # q/k/v biases; o_proj never has one
    use_qk_norm: bool = False
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    # Mixture of experts. n_routed_experts == 0 would mean a dense model.
    moe_intermediate_size: int = 1408
    n_routed_experts: int = 128
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    first_k_dense_replace: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    n_group: int = 1
    topk_group: int = 1
    num_nextn_predict_layers: int = 1  # MTP layers stored after the decoder layers
    # Token ids (GLM-4.5/4.6 tokenizer): <|endoftext|>, <|user|>, <|observation|> stop generation.
    eos_token_id: int | list[int] | None = field(default_factory=lambda: [151329, 151336, 151338])
    pad_token_id: int | None = 151329
    bos_token_id: int | None = None
    model_type: str = "glm4_moe"

    def __post_init__(self):
        problems = []
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            problems.append(
                f"model_type {self.model_type!r} is not supported (supported: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        elif not self.family.moe:
            fixed = {k: v for k, v in self.family.defaults if k in _DENSE_FIXED}
            problems += [
                f"{k} must be {v!r} for the dense model_type {self.model_type!r}, got "
                f"{getattr(self, k)!r}" for k, v in fixed.items() if getattr(self, k) != v
            ]
        if self.hidden_act != "silu":
            problems.append(f"hidden_act must be 'silu', got {self.hidden_act!r}")
        if self.n_group != 1 or self.topk_group != 1:
            problems.append("group-limited routing (n_group/topk_group != 1) is not supported")
        if not self.norm_topk_prob:
            problems.append("norm_topk_prob=False is not supported (Megatron normalises top-k)")
        if self.n_routed_experts and self.num_experts_per_tok > self.n_routed_experts:
            problems.append("num_experts_per_tok exceeds n_routed_experts")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            problems.append("first_k_dense_replace must be within [0, num_hidden_layers]")
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append("num_key_value_heads must divide num_attention_heads")
        if not 0 < self.partial_rotary_factor <= 1:
            problems.append("partial_rotary_factor must be in (0, 1]")
        if problems:
            raise ConfigError("invalid GLM config: " + "; ".join(problems))

    @property
    def family(self) -> ModelFamily:
        return get_family(self.model_type)

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0

    @property
    def moe_layer_pattern(self) -> list[int]:
        """Megatron's ``moe_layer_freq``: 0 for the first-k dense layers, 1 for MoE layers."""
        k = self.first_k_dense_replace if self.is_moe else self.num_hidden_layers
        return [0] * k + [1] * (self.num_hidden_layers - k)

    @property
    def stop_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    def replace(self, **changes) -> GLMConfig:
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ConfigError(f"unknown GLM config field(s): {', '.join(sorted(unknown))}")
        return GLMConfig(**{**asdict(self), **changes})

    def to_hf_dict(self) -> dict:
        """The HF ``config.json`` content (the transformers 4.x layout that real checkpoints use):
        every field for ``glm4_moe``, transformers' own keys for the dense families."""
        d = asdict(self)
        if not self.family.moe:
            d = {k: d[k] for k in ("model_type", *DENSE_HF_KEYS)}
        d["architectures"] = [self.family.causal_lm_class]
        d["torch_dtype"] = "bfloat16"
        return d


# Fields a dense config cannot change (no experts, no MTP, no QK norm).
_DENSE_FIXED = ("n_routed_experts", "n_shared_experts", "first_k_dense_replace",
                "num_nextn_predict_layers", "use_qk_norm")


def dense_config(model_type: str, **fields_) -> GLMConfig:
    """A dense-family config: transformers' defaults for ``model_type``, then ``fields_``."""
    return GLMConfig(model_type=model_type, **{**dict(get_family(model_type).defaults), **fields_})


FAMILY_CLASS = {t: get_family(t).causal_lm_class for t in SUPPORTED_MODEL_TYPES}

# Fields whose JSON type must be checked; bool is checked before int because bool ⊂ int.
_FIELD_TYPES = {f.name: f.type for f in fields(GLMConfig)}


def _check_type(key: str, value, source: str):
    expected = _FIELD_TYPES[key]
    if value is None and ("Optional" in expected or "None" in expected):
        return value
    if expected == "bool":
        ok = isinstance(value, bool)
    elif expected == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif expected == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif expected == "str":
        ok = isinstance(value, str)
    elif key == "eos_token_id":
        ok = isinstance(value, int) or (
            isinstance(value, list) and all(isinstance(v, int) for v in value)
        )
    else:
        ok = isinstance(value, int)
    if not ok:
        raise ConfigError(
            f"{source}: key {key!r} must be {expected}, got {type(value).__name__} {value!r}"
        )
    return value


def config_from_hf_dict(data: dict, source: str = "config.json") -> GLMConfig:
    """Build a :class:`GLMConfig` from an HF config dict; unknown HF keys are ignored."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a JSON object")
    model_type = data.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{source}: model_type {model_type!r} is not supported; supported: "
            + ", ".join(f"{t} ({FAMILY_CLASS[t]})" for t in SUPPORTED_MODEL_TYPES)
        )
    family = get_family(model_type)
    # A dense config.json holds transformers' GlmConfig/Glm4Config keys; anything else in it
    # (MoE keys from a hand-edited file, say) is ignored exactly as transformers ignores it.
    readable = _FIELD_TYPES if family.moe else DENSE_HF_KEYS
    values = dict(family.defaults)
    # transformers >= 5 nests rope settings under rope_parameters; real checkpoints use the
    # flat 4.x keys. Accept both.
    rope = data.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise ConfigError(f"{source}: key 'rope_parameters' must be an object")
    if rope.get("rope_type", "default") not in ("default", None):
        raise ConfigError(f"{source}: rope_type {rope['rope_type']!r} is not supported")
    flat = {**{k: rope[k] for k in ("rope_theta", "partial_rotary_factor") if k in rope}, **data}
    if data.get("rope_scaling"):
        raise ConfigError(f"{source}: rope_scaling is not supported")
    for key in readable:
        if key in flat:
            values[key] = _check_type(key, flat[key], source)
    if "head_dim" not in flat and "hidden_size" in flat and "num_attention_heads" in flat:
        values["head_dim"] = values["hidden_size"] // values["num_attention_heads"]
    try:
        return GLMConfig(model_type=model_type, **{k: v for k, v in values.items()
                                                   if k != "model_type"})
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def load_hf_config(path: str) -> GLMConfig:
    """Read ``config.json`` from an HF checkpoint directory (or the file itself)."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise ConfigError(f"{file}: no such file (expected an HF checkpoint directory)")
    try:
        with open(file, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{file}: not valid JSON ({err})") from None
    return config_from_hf_dict(data, source=file)


def model_shape(cfg: GLMConfig) -> ModelShape:
    """The facts the parallel layer validates a layout against."""
    return ModelShape(
        num_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_key_value_heads,
        num_moe_experts=cfg.n_routed_experts or None,
        vocab_size=cfg.vocab_size,
        mtp_num_layers=cfg.num_nextn_predict_layers,
    )
