"""Reading GLM config.json files of every family: released layouts, transformers' own, bad ones.

The oracle for the dense families is transformers' ``GlmConfig`` / ``Glm4Config``: our preset
``glm4-9b`` must be exactly the config transformers builds by default (GLM-4-9B-chat), and a
config written by transformers (``rope_parameters``) or by the released checkpoints (flat
``rope_theta`` / ``partial_rotary_factor``, transformers 4.x) must read the same.
"""

import json

import pytest

from glm_megatron.models import ConfigError, GLMConfig, config_from_hf_dict, get_preset
from glm_megatron.models.config import dense_config, load_hf_config

# config.json of THUDM/glm-4-9b-chat-hf as released (transformers 4.46 layout: flat rope keys).
GLM_4_9B_CHAT_HF = {
    "architectures": ["GlmForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
    "eos_token_id": [151329, 151336, 151338], "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 13696,
    "max_position_embeddings": 131072, "model_type": "glm", "num_attention_heads": 32,
    "num_hidden_layers": 40, "num_key_value_heads": 2, "pad_token_id": 151329,
    "partial_rotary_factor": 0.5, "rms_norm_eps": 1.5625e-07, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.46.0",
    "use_cache": True, "vocab_size": 151552,
}


def transformers_dict(model_type: str, **kwargs) -> dict:
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **kwargs).to_dict()


@pytest.mark.parametrize("model_type", ["glm", "glm4"])
def test_transformers_defaults_are_glm_4_9b(model_type):
    ours = config_from_hf_dict(transformers_dict(model_type))
    assert ours == get_preset("glm4-9b").replace(model_type=model_type)
    assert not ours.is_moe and ours.family.rotary_interleaved
    assert ours.family.sandwich_norms == (model_type == "glm4")


def test_released_flat_keys_read_like_rope_parameters():
    flat = config_from_hf_dict(GLM_4_9B_CHAT_HF)
    assert flat == get_preset("glm4-9b")
    assert flat.stop_token_ids == [151329, 151336, 151338] and flat.pad_token_id == 151329
    nested = transformers_dict("glm", **{k: v for k, v in GLM_4_9B_CHAT_HF.items()
                                         if k not in ("model_type", "architectures")})
    assert "rope_parameters" in nested
    assert config_from_hf_dict(nested) == flat


@pytest.mark.parametrize("preset", ["glm4-9b", "glm4-9b-0414", "glm4-32b-0414", "glm4-0414-tiny"])
def test_dense_presets_round_trip_through_transformers(preset):
    cfg = get_preset(preset)
    hf = cfg.to_hf_dict()
    assert hf["architectures"] == [cfg.family.causal_lm_class]
    assert not any(k.startswith(("n_routed", "moe_", "num_nextn")) for k in hf)
    back = transformers_dict(hf.pop("model_type"), **hf)
    assert config_from_hf_dict(back) == cfg


def test_eos_as_int_and_no_pad_id(tmp_path):
    data = {**GLM_4_9B_CHAT_HF, "model_type": "glm4", "eos_token_id": 151329}
    del data["pad_token_id"], data["head_dim"]
    (tmp_path / "config.json").write_text(json.dumps(data))
    cfg = load_hf_config(str(tmp_path))
    assert cfg.stop_token_ids == [151329]
    assert cfg.head_dim == 128  # hidden_size / num_attention_heads
    assert cfg.pad_token_id == 151329  # transformers' default for the family


@pytest.mark.parametrize("data, message", [
    ({"model_type": "chatglm"}, "model_type 'chatglm' is not supported; supported: glm4_moe "
                                "(Glm4MoeForCausalLM), glm (GlmForCausalLM), glm4 (Glm4ForCausalLM)"),
    ({**GLM_4_9B_CHAT_HF, "hidden_size": "4096"}, "key 'hidden_size' must be int, got str"),
    ({**GLM_4_9B_CHAT_HF, "num_key_value_heads": 3}, "num_key_value_heads must divide"),
    ({**GLM_4_9B_CHAT_HF, "rope_scaling": {"type": "linear"}}, "rope_scaling is not supported"),
])
def test_bad_config_files_are_named(tmp_path, data, message):
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError) as err:
        load_hf_config(str(tmp_path))
    assert str(tmp_path / "config.json") in str(err.value) and message in str(err.value)


def test_a_dense_config_cannot_have_experts_or_mtp():
    with pytest.raises(ConfigError) as err:
        GLMConfig(model_type="glm", n_routed_experts=8)
    assert "n_routed_experts must be 0 for the dense model_type 'glm'" in str(err.value)
    with pytest.raises(ConfigError, match="num_nextn_predict_layers must be 0"):
        dense_config("glm4", num_nextn_predict_layers=1)
