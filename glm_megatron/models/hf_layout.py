"""What an HF GLM checkpoint must contain, and how Megatron ``torch_dist`` keys map back to it.

``expected_hf_tensors`` lists every tensor name and shape a checkpoint of a config holds (the
one-tensor-per-expert layout on disk, the MTP layer at index ``num_hidden_layers``), so a
conversion can refuse a missing, unexpected or misshapen tensor before any work.

A ``torch_dist`` checkpoint stores *global* tensors under Megatron's sharded keys: TE-style norm
names (``linear_qkv.layer_norm_weight`` for the input norm, ``linear_fc1.layer_norm_weight`` for
the pre-MLP norm) and routed experts stacked along a leading axis
(``mlp.experts.experts.linear_fc1.weight`` [E, 2I, H]). :func:`checkpoint_key_entries` turns one
such key into the canonical per-expert Megatron names of :mod:`.hf_mapping`.
"""

from __future__ import annotations

import re

from .config import GLMConfig
from .hf_mapping import global_name

_STACKED_EXPERTS = re.compile(r"^(.*\.mlp\.experts)\.experts\.(linear_fc[12]\.weight)$")


def _layer_tensors(prefix: str, cfg: GLMConfig, moe: bool) -> dict[str, tuple[int, ...]]:
    h, hd = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    t = {
        prefix + "input_layernorm.weight": (h,),
        prefix + "post_attention_layernorm.weight": (h,),
        prefix + "self_attn.q_proj.weight": (q, h),
        prefix + "self_attn.k_proj.weight": (kv, h),
        prefix + "self_attn.v_proj.weight": (kv, h),
        prefix + "self_attn.o_proj.weight": (h, q),
    }
    if cfg.attention_bias:
        t.update({prefix + f"self_attn.{p}_proj.bias": (n,) for p, n in (("q", q), ("k", kv), ("v", kv))})
    if cfg.use_qk_norm:
        t[prefix + "self_attn.q_norm.weight"] = (hd,)
        t[prefix + "self_attn.k_norm.weight"] = (hd,)
    if cfg.family.sandwich_norms:
        t[prefix + "post_self_attn_layernorm.weight"] = (h,)
        t[prefix + "post_mlp_layernorm.weight"] = (h,)
    if not moe:
        f = cfg.intermediate_size
        if cfg.family.fused_gate_up:
            t[prefix + "mlp.gate_up_proj.weight"] = (2 * f, h)
        else:
            t[prefix + "mlp.gate_proj.weight"] = (f, h)
            t[prefix + "mlp.up_proj.weight"] = (f, h)
        t[prefix + "mlp.down_proj.weight"] = (h, f)
        return t
    e, i = cfg.n_routed_experts, cfg.moe_intermediate_size
    s = i * cfg.n_shared_experts
    t[prefix + "mlp.gate.weight"] = (e, h)
    t[prefix + "mlp.gate.e_score_correction_bias"] = (e,)
    for proj, shape in (("gate_proj", (s, h)), ("up_proj", (s, h)), ("down_proj", (h, s))):
        t[f"{prefix}mlp.shared_experts.{proj}.weight"] = shape
    for x in range(e):
        for proj, shape in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))):
            t[f"{prefix}mlp.experts.{x}.{proj}.weight"] = shape
    return t


def expected_hf_tensors(cfg: GLMConfig, *, with_mtp: bool) -> dict[str, tuple[int, ...]]:
    """Every tensor (name -> shape) an HF checkpoint of ``cfg`` holds."""
    h, v = cfg.hidden_size, cfg.vocab_size
    t = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        t["lm_head.weight"] = (v, h)
    pattern = cfg.moe_layer_pattern
    for layer in range(cfg.num_hidden_layers):
        t.update(_layer_tensors(f"model.layers.{layer}.", cfg, bool(pattern[layer])))
    if with_mtp:
        for k in range(cfg.num_nextn_predict_layers):
            p = f"model.layers.{cfg.num_hidden_layers + k}."
            t.update({p + "enorm.weight": (h,), p + "hnorm.weight": (h,),
                      p + "eh_proj.weight": (h, 2 * h), p + "shared_head.norm.weight": (h,)})
            t.update(_layer_tensors(p, cfg, cfg.is_moe))
    return t


def is_mtp_tensor(name: str, cfg: GLMConfig) -> bool:
    match = re.match(r"model\.layers\.(\d+)\.", name)
    return bool(match) and int(match.group(1)) >= cfg.num_hidden_layers


def checkpoint_key_entries(key: str, shape: tuple[int, ...]) -> list[tuple[str, int | None]]:
    """(canonical Megatron name, index into the key's leading expert axis or None) per tensor."""
    match = _STACKED_EXPERTS.match(key)
    if match:
        owner, leaf = match.groups()
        return [(global_name(f"{owner}.local_experts.{e}.{leaf}", layer_offset=0, expert_offset=0), e)
                for e in range(shape[0])]
    return [(global_name(key, layer_offset=0, expert_offset=0), None)]


def is_model_tensor_key(key: str) -> bool:
    """Checkpoint keys that hold weights (not TE/Megatron extra state or rotary buffers)."""
    return "_extra_state" not in key and not key.endswith("inv_freq")
