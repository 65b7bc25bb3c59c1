"""Named GLM configurations: the released models and tiny ones for tests and the demo.

Dense presets follow the released ``config.json`` files: ``glm4-9b`` = THUDM/glm-4-9b-hf and
glm-4-9b-chat-hf (``glm``), ``glm4-9b-0414`` = THUDM/GLM-4-9B-0414 and ``glm4-32b-0414`` =
THUDM/GLM-4-32B-0414 (``glm4``, sandwich norms; GLM-Z1 models share these shapes).
"""

from __future__ import annotations

from .config import ConfigError, GLMConfig, dense_config

_GLM45_355B = GLMConfig(
    vocab_size=151552, hidden_size=5120, intermediate_size=12288, num_hidden_layers=92,
    num_attention_heads=96, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
    rope_theta=1_000_000.0, partial_rotary_factor=0.5, attention_bias=True, use_qk_norm=True,
    moe_intermediate_size=1536, n_routed_experts=160, n_shared_experts=1, num_experts_per_tok=8,
    first_k_dense_replace=3, routed_scaling_factor=2.5, num_nextn_predict_layers=1,
)

_TINY_DENSE = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
    rope_theta=10_000.0, rms_norm_eps=1e-5, eos_token_id=[2], pad_token_id=0,
    initializer_range=0.05,
)

PRESETS: dict[str, GLMConfig] = {
    "glm4.5-355b-a32b": _GLM45_355B,
    "glm4.6-355b-a32b": _GLM45_355B.replace(max_position_embeddings=202752),
    "glm4.5-air-106b-a12b": GLMConfig(
        vocab_size=151552, hidden_size=4096, intermediate_size=10944, num_hidden_layers=46,
        num_attention_heads=96, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=131072, rope_theta=1_000_000.0, partial_rotary_factor=0.5,
        attention_bias=True, use_qk_norm=False, moe_intermediate_size=1408, n_routed_experts=128,
        n_shared_experts=1, num_experts_per_tok=8, first_k_dense_replace=1,
        routed_scaling_factor=1.0, num_nextn_predict_layers=1,
    ),
    # Tiny GLM-4.6-shaped model for tests: every architectural feature, seconds on a CPU.
    "glm4-moe-tiny": GLMConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
        rope_theta=10_000.0, partial_rotary_factor=0.5, attention_bias=True, use_qk_norm=True,
        moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        first_k_dense_replace=1, routed_scaling_factor=2.5, num_nextn_predict_layers=1,
        eos_token_id=[2], pad_token_id=0, initializer_range=0.05,
    ),
    # The docs/ARCHITECTURE.md §8 benchmark shape (H=256, 4 layers, 8 experts top-2): the demo's model.
    "glm4-moe-small": GLMConfig(
        vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
        rope_theta=10_000.0, partial_rotary_factor=0.5, attention_bias=True, use_qk_norm=True,
        moe_intermediate_size=128, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        first_k_dense_replace=1, routed_scaling_factor=2.5, num_nextn_predict_layers=1,
        eos_token_id=[2], pad_token_id=0,
    ),
    # Dense GLM-4-9B(-chat): transformers' GlmConfig defaults are this model.
    "glm4-9b": dense_config("glm"),
    "glm4-9b-0414": dense_config("glm4", rms_norm_eps=1e-5, max_position_embeddings=32768),
    "glm4-32b-0414": dense_config(
        "glm4", hidden_size=6144, intermediate_size=23040, num_hidden_layers=61,
        num_attention_heads=48, num_key_value_heads=2, rms_norm_eps=1e-5,
        max_position_embeddings=32768,
    ),
    # Tiny dense models for tests, one per family: 4 layers, GQA, partial interleaved rotary.
    "glm4-9b-tiny": dense_config("glm", **_TINY_DENSE),
    "glm4-0414-tiny": dense_config("glm4", **_TINY_DENSE),
}


def get_preset(name: str) -> GLMConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}"
        ) from None
