"""Tiny random GLM checkpoints made with HF transformers: the oracle for our model.

``make_tiny_hf_checkpoint``: GLM-4.5/4.6-shaped MoE (``Glm4MoeForCausalLM``);
``make_tiny_dense_hf_checkpoint``: dense GLM-4-9B (``glm``, ``GlmForCausalLM``) or GLM-4-0414
(``glm4``, ``Glm4ForCausalLM``, sandwich norms).

HF initialises the router weight and expert bias to zeros (every token would tie), so every
tensor is re-drawn here: routing, QK norms and biases must all matter for a parity test to mean
anything. MTP tensors are added to the safetensors file the way the released checkpoints store
them (layer index ``num_hidden_layers``); transformers ignores them on load.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

TINY_HF_CONFIG = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, moe_intermediate_size=32,
    n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
    use_qk_norm=True, attention_bias=True, routed_scaling_factor=2.5, rms_norm_eps=1e-5,
    max_position_embeddings=512, num_nextn_predict_layers=1, tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
)


def _randomize(model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if "inv_freq" in name:
                continue
            noise = torch.randn(tensor.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):
                tensor.copy_(1.0 + 0.1 * noise)
            elif "e_score_correction_bias" in name:
                tensor.copy_(0.05 * noise)
            elif name.endswith("gate.weight"):
                tensor.copy_(0.3 * noise)
            else:
                tensor.copy_(0.08 * noise)


def _mtp_tensors(cfg, seed: int) -> dict:
    """The MTP layer as stored on disk: enorm, hnorm, eh_proj, shared_head.norm + a MoE layer."""
    gen = torch.Generator().manual_seed(seed + 1)
    h, layer = cfg["hidden_size"], cfg["num_hidden_layers"]
    p = f"model.layers.{layer}."
    hd, heads, kv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    moe, experts = cfg["moe_intermediate_size"], cfg["n_routed_experts"]

    def rnd(*shape, scale=0.08, offset=0.0):
        return offset + scale * torch.randn(*shape, generator=gen)

    t = {
        p + "enorm.weight": rnd(h, scale=0.1, offset=1.0),
        p + "hnorm.weight": rnd(h, scale=0.1, offset=1.0),
        p + "eh_proj.weight": rnd(h, 2 * h),
        p + "shared_head.norm.weight": rnd(h, scale=0.1, offset=1.0),
        p + "input_layernorm.weight": rnd(h, scale=0.1, offset=1.0),
        p + "post_attention_layernorm.weight": rnd(h, scale=0.1, offset=1.0),
        p + "self_attn.q_proj.weight": rnd(heads * hd, h),
        p + "self_attn.q_proj.bias": rnd(heads * hd),
        p + "self_attn.k_proj.weight": rnd(kv * hd, h),
        p + "self_attn.k_proj.bias": rnd(kv * hd),
        p + "self_attn.v_proj.weight": rnd(kv * hd, h),
        p + "self_attn.v_proj.bias": rnd(kv * hd),
        p + "self_attn.o_proj.weight": rnd(h, heads * hd),
        p + "mlp.gate.weight": rnd(experts, h, scale=0.3),
        p + "mlp.gate.e_score_correction_bias": rnd(experts, scale=0.05),
        p + "mlp.shared_experts.gate_proj.weight": rnd(moe, h),
        p + "mlp.shared_experts.up_proj.weight": rnd(moe, h),
        p + "mlp.shared_experts.down_proj.weight": rnd(h, moe),
    }
    if cfg.get("use_qk_norm"):
        t[p + "self_attn.q_norm.weight"] = rnd(hd, scale=0.1, offset=1.0)
        t[p + "self_attn.k_norm.weight"] = rnd(hd, scale=0.1, offset=1.0)
    for e in range(experts):
        t[f"{p}mlp.experts.{e}.gate_proj.weight"] = rnd(moe, h)
        t[f"{p}mlp.experts.{e}.up_proj.weight"] = rnd(moe, h)
        t[f"{p}mlp.experts.{e}.down_proj.weight"] = rnd(h, moe)
    return t


def make_tiny_hf_checkpoint(out_dir: str, *, seed: int = 0, with_mtp: bool = True, **overrides) -> str:
    """Save a random tiny ``Glm4MoeForCausalLM`` (fp32) to ``out_dir``; returns the directory."""
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

    cfg = {**TINY_HF_CONFIG, **overrides}
    torch.manual_seed(seed)
    model = Glm4MoeForCausalLM(Glm4MoeConfig(**cfg)).float()
    _randomize(model, seed)
    model.save_pretrained(out_dir)
    if with_mtp:
        file = os.path.join(out_dir, "model.safetensors")
        tensors = load_file(file)
        tensors.update(_mtp_tensors(cfg, seed))
        save_file(tensors, file, metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), encoding="utf-8") as fh:
        assert json.load(fh)["model_type"] == "glm4_moe"
    return out_dir


TINY_DENSE_HF_CONFIG = dict(
    vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_bias=True,
    rms_norm_eps=1e-5, max_position_embeddings=512, tie_word_embeddings=False,
    # No pad id: HF's embedding would zero the pad row's gradient (padding_idx), Megatron's not.
    pad_token_id=None, eos_token_id=[2],
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
)
DENSE_CLASSES = {"glm": ("GlmConfig", "GlmForCausalLM"), "glm4": ("Glm4Config", "Glm4ForCausalLM")}


def make_tiny_dense_hf_checkpoint(out_dir: str, model_type: str = "glm", *, seed: int = 0,
                                  **overrides) -> str:
    """Save a random tiny dense GLM (fp32) of ``model_type`` (``glm`` or ``glm4``)."""
    import transformers

    config_cls, model_cls = (getattr(transformers, n) for n in DENSE_CLASSES[model_type])
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**TINY_DENSE_HF_CONFIG, **overrides})).float()
    _randomize(model, seed)
    model.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "config.json"), encoding="utf-8") as fh:
        assert json.load(fh)["model_type"] == model_type
    return out_dir


def hf_grads_by_disk_name(model) -> dict:
    """HF parameter gradients under the on-disk (one tensor per expert) names.

    transformers >= 5 keeps experts fused in memory (``gate_up_proj`` [E, 2I, H], ``down_proj``
    [E, H, I]); checkpoints and our mapping use per-expert names.
    """
    out = {}
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        grad = param.grad.detach().float()
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            for e, g in enumerate(grad):
                gate, up = g.chunk(2, dim=0)
                out[f"{prefix}{e}.gate_proj.weight"] = gate
                out[f"{prefix}{e}.up_proj.weight"] = up
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e, g in enumerate(grad):
                out[f"{prefix}{e}.down_proj.weight"] = g
        else:
            out[name] = grad
    return out


def make_bf16_sharded_copy(src: str, dst: str, shards: int = 3) -> str:
    """The released checkpoints' form: bf16 weights, fp32 expert bias, several safetensors files
    with a ``model.safetensors.index.json``."""
    import shutil

    os.makedirs(dst, exist_ok=True)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {}
        for name in names[i::shards]:
            t = tensors[name]
            part[name] = t if name.endswith("e_score_correction_bias") else t.to(torch.bfloat16)
            weight_map[name] = file
        save_file(part, os.path.join(dst, file), metadata={"format": "pt"})
    with open(os.path.join(dst, "model.safetensors.index.json"), "w", encoding="utf-8") as fh:
        json.dump({"metadata": {}, "weight_map": weight_map}, fh)
    with open(os.path.join(src, "config.json"), encoding="utf-8") as fh:
        config = json.load(fh)
    config["dtype"] = "bfloat16"
    with open(os.path.join(dst, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh)
    if os.path.exists(os.path.join(src, "generation_config.json")):
        shutil.copy(os.path.join(src, "generation_config.json"), dst)
    return dst


def read_all_tensors(hf_dir: str) -> dict:
    """Every tensor of an HF directory (single file or sharded with an index)."""
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if not os.path.exists(index):
        return load_file(os.path.join(hf_dir, "model.safetensors"))
    with open(index, encoding="utf-8") as fh:
        files = sorted(set(json.load(fh)["weight_map"].values()))
    out = {}
    for file in files:
        out.update(load_file(os.path.join(hf_dir, file)))
    return out


def make_random_peft_adapter(hf_dir: str, out_dir: str, targets, *, r: int = 4,
                             alpha: float = 8.0, seed: int = 0, use_rslora: bool = False,
                             target_parameters=None, modules_to_save=None) -> str:
    """A PEFT LoRA adapter for the model in ``hf_dir`` with A and B both random (PEFT starts B at
    zero, which would hide every B-path error), saved by peft itself. ``modules_to_save`` get
    random changes too, so a loader that skipped them would be caught."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32),
        LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0,
                   target_modules=targets if isinstance(targets, str) else list(targets),
                   target_parameters=target_parameters, modules_to_save=modules_to_save,
                   init_lora_weights=False, use_rslora=use_rslora),
    )
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif "modules_to_save" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(out_dir)
    return out_dir


def make_random_v4_expert_adapter(hf_dir: str, out_dir: str, *, r: int = 4, alpha: float = 8.0,
                                  seed: int = 0, use_rslora: bool = False) -> str:
    """A transformers-4-era PEFT adapter of a glm4_moe model: attention and one module per
    routed expert (``…mlp.experts.E.gate_proj``, ``up_proj``, ``down_proj``), random A and B.
    peft cannot create this layout on transformers 5; it converts it on load."""
    from safetensors.torch import save_file

    with open(os.path.join(hf_dir, "config.json"), encoding="utf-8") as fh:
        cfg = json.load(fh)
    h, i = cfg["hidden_size"], cfg["moe_intermediate_size"]
    hd, heads, kv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    gen = torch.Generator().manual_seed(seed)
    tensors = {}

    def add(module, fan_in, fan_out):
        tensors[f"base_model.model.{module}.lora_A.weight"] = 0.2 * torch.randn(r, fan_in, generator=gen)
        tensors[f"base_model.model.{module}.lora_B.weight"] = 0.1 * torch.randn(fan_out, r, generator=gen)

    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        for proj, fan_in, fan_out in (("q", h, heads * hd), ("k", h, kv * hd), ("v", h, kv * hd),
                                      ("o", heads * hd, h)):
            add(f"{p}self_attn.{proj}_proj", fan_in, fan_out)
        if layer < cfg["first_k_dense_replace"]:
            continue
        for e in range(cfg["n_routed_experts"]):
            add(f"{p}mlp.experts.{e}.gate_proj", h, i)
            add(f"{p}mlp.experts.{e}.up_proj", h, i)
            add(f"{p}mlp.experts.{e}.down_proj", i, h)
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "adapter_config.json"), "w", encoding="utf-8") as fh:
        json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
                   "lora_dropout": 0.0, "bias": "none", "use_rslora": use_rslora,
                   "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                      "up_proj", "down_proj"],
                   "base_model_name_or_path": hf_dir}, fh)
    return out_dir
