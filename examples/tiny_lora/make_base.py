#!/usr/bin/env python
"""A random tiny GLM-4-9B-shaped model (``GlmForCausalLM``, model_type ``glm``) saved in HF format.

GLM-4-9B's architecture (dense SwiGLU with a fused ``gate_up_proj``, QKV bias, 2 KV groups,
partial interleaved rotary, untied output layer), scaled down; the vocabulary is the tokenizer's
(rounded up to a multiple of 16 so every TP size divides it). The tokenizer files are copied in,
so the directory is a complete HF model like glm-4-9b-chat-hf.

    python examples/tiny_lora/make_base.py --tokenizer data/tiny_lora/tokenizer \\
        --out output/tiny_lora/init-hf [--hidden-size 128 --layers 4 --seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def make_base(out: str, tokenizer_dir: str, *, hidden_size: int = 128, layers: int = 4,
              heads: int = 4, kv_heads: int = 2, intermediate_size: int = 384,
              seed: int = 0) -> dict:
    import torch
    from transformers import GlmConfig, GlmForCausalLM

    from glm_megatron.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    vocab = -(-tok.vocab_size // 16) * 16
    config = GlmConfig(
        vocab_size=vocab, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=hidden_size // heads, attention_bias=True, rms_norm_eps=1e-5,
        max_position_embeddings=1024, tie_word_embeddings=False, initializer_range=0.05,
        pad_token_id=tok.pad_id, eos_token_id=list(tok.stop_ids),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "partial_rotary_factor": 0.5},
    )
    torch.manual_seed(seed)
    model = GlmForCausalLM(config).float()
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        src = os.path.join(tokenizer_dir, name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(out, name))
    params = sum(p.numel() for p in model.parameters())
    return {"dir": out, "vocab_size": vocab, "parameters": params}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(json.dumps(make_base(args.out, args.tokenizer, hidden_size=args.hidden_size,
                               layers=args.layers, seed=args.seed), indent=1))


if __name__ == "__main__":
    main()
