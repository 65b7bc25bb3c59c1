#!/usr/bin/env python
"""The ChatGLM4 tutorial's test step on an exported LoRA adapter, through transformers + peft.

Loads the base with ``AutoModelForCausalLM``, the adapter (``convert_checkpoint.py megatron-to-hf
--adapter-only``) with ``peft.PeftModel.from_pretrained``, renders the prompts with the
tokenizer's chat template (``add_generation_prompt=True``, left padding, one batch, as the
tutorial's ``SavePredictCallback``) and decodes greedily, stopping at the GLM stop tokens of the
base's ``generation_config.json``. ``--merged DIR`` also runs the merged export (``megatron-to-hf``
without ``--adapter-only``) with plain transformers and reports whether it answers the same.

    python examples/tiny_lora/chat_peft.py --base output/tiny_lora/base-hf \\
        --adapter output/tiny_lora/adapter-hf [--merged output/tiny_lora/merged-hf] \\
        "你好，告诉我你的名字。" "告诉我1+2等于多少？"
"""

from __future__ import annotations

import argparse
import json
import sys

TUTORIAL_PROMPTS = ["你好，告诉我你的名字。", "告诉我1+2等于多少？"]


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    import torch

    batch = tokenizer.apply_chat_template(
        [[{"role": "user", "content": p}] for p in prompts], add_generation_prompt=True,
        return_tensors="pt", return_dict=True, padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    start = batch["input_ids"].shape[1]
    return [tokenizer.decode(row[start:], skip_special_tokens=True).strip() for row in out]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="the HF base model directory")
    p.add_argument("--adapter", required=True, help="the PEFT adapter directory")
    p.add_argument("--merged", help="the merged HF export, to check it answers the same")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the base's)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("prompts", nargs="*", help=f"user messages (default: {TUTORIAL_PROMPTS})")
    args = p.parse_args(argv)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = args.prompts or TUTORIAL_PROMPTS
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # decoder-only batch generation
    base = AutoModelForCausalLM.from_pretrained(args.base).eval()
    before = generate(base, tokenizer, prompts, args.max_new_tokens)
    model = PeftModel.from_pretrained(base, args.adapter).eval()
    after = generate(model, tokenizer, prompts, args.max_new_tokens)
    for prompt, b, a in zip(prompts, before, after):
        print(f"  user:            {json.dumps(prompt, ensure_ascii=False)}\n"
              f"  base:            {b}\n  base + adapter:  {a}")
    if args.merged:
        merged = AutoModelForCausalLM.from_pretrained(args.merged).eval()
        same = generate(merged, tokenizer, prompts, args.max_new_tokens) == after
        print(f"  merged export answers {'the same' if same else 'DIFFERENTLY'} "
              f"({args.merged})")
        if not same:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
