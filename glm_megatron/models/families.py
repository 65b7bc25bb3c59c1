"""The three GLM model families we run, and what differs between them (docs/ARCHITECTURE.md §6).

==============  ==========================  =================================================
model_type      transformers class          models
==============  ==========================  =================================================
``glm4_moe``    ``Glm4MoeForCausalLM``      GLM-4.5, GLM-4.6 (355B-A32B), GLM-4.5-Air (106B)
``glm``         ``GlmForCausalLM``          GLM-4-9B(-chat)-hf, the ChatGLM4 tutorial's model
``glm4``        ``Glm4ForCausalLM``         GLM-4-9B-0414, GLM-4-32B-0414, GLM-Z1
==============  ==========================  =================================================

The dense families apply the partial rotary embedding *interleaved* (pairs of adjacent
channels; transformers' ``glm`` ``rotate_half``), the MoE family to the two halves of the
rotary part. ``glm4`` adds the sandwich norms: ``post_self_attn_layernorm`` after attention and
``post_mlp_layernorm`` after the MLP, each before its residual add. Dense checkpoints store the
MLP's gate and up projections fused as one ``gate_up_proj`` (gate rows first).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelFamily:
    model_type: str
    causal_lm_class: str  # transformers class name (config.json "architectures")
    sequence_classification_class: str  # what a reward-model export declares
    moe: bool
    rotary_interleaved: bool
    sandwich_norms: bool
    fused_gate_up: bool  # dense MLP stored as one gate_up_proj
    # transformers' config defaults for keys a config.json may omit (dense families only;
    # the MoE family's are GLMConfig's own defaults).
    defaults: tuple[tuple[str, object], ...] = ()


# Keys of a dense family's config.json (transformers' GlmConfig / Glm4Config), in its order.
DENSE_HF_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
    "rms_norm_eps", "tie_word_embeddings", "rope_theta", "partial_rotary_factor",
    "attention_bias", "pad_token_id", "eos_token_id", "bos_token_id",
)

# A dense model has no experts and no MTP layer: these GLMConfig fields are fixed.
_NO_MOE = (("n_routed_experts", 0), ("n_shared_experts", 0), ("first_k_dense_replace", 0),
           ("num_nextn_predict_layers", 0), ("use_qk_norm", False))

# transformers' GlmConfig defaults (GLM-4-9B-chat); Glm4Config's are the same.
_GLM4_9B_DEFAULTS = (
    ("vocab_size", 151552), ("hidden_size", 4096), ("intermediate_size", 13696),
    ("num_hidden_layers", 40), ("num_attention_heads", 32), ("num_key_value_heads", 2),
    ("head_dim", 128), ("max_position_embeddings", 131072), ("rms_norm_eps", 1.5625e-07),
    ("rope_theta", 10000.0), ("partial_rotary_factor", 0.5), ("attention_bias", True),
    ("tie_word_embeddings", False), ("pad_token_id", 151329),
    ("eos_token_id", [151329, 151336, 151338]), ("bos_token_id", None),
)

FAMILIES: dict[str, ModelFamily] = {
    "glm4_moe": ModelFamily(
        "glm4_moe", "Glm4MoeForCausalLM", "Glm4MoeForSequenceClassification", moe=True,
        rotary_interleaved=False, sandwich_norms=False, fused_gate_up=False),
    "glm": ModelFamily(
        "glm", "GlmForCausalLM", "GlmForSequenceClassification", moe=False,
        rotary_interleaved=True, sandwich_norms=False, fused_gate_up=True,
        defaults=_NO_MOE + _GLM4_9B_DEFAULTS,
    ),
    "glm4": ModelFamily(
        "glm4", "Glm4ForCausalLM", "Glm4ForSequenceClassification", moe=False,
        rotary_interleaved=True, sandwich_norms=True, fused_gate_up=True,
        defaults=_NO_MOE + _GLM4_9B_DEFAULTS,
    ),
}

SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


def get_family(model_type: str) -> ModelFamily:
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ValueError(
            f"model_type {model_type!r} is not supported (supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)})"
        ) from None
