#!/usr/bin/env python
"""Chat with an exported HF model through transformers alone: ``apply_chat_template`` + ``generate``.

    python examples/tiny_ppo/chat.py output/tiny_ppo/ppo-hf "Describe the lamp 7." ...

Greedy decoding, stopping at the GLM stop tokens of the exported ``generation_config.json``.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, prompts = argv[0], argv[1:]
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    for prompt in prompts:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                      add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)
        out = model.generate(**ids, max_new_tokens=16, do_sample=False)
        reply = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        print(f"  user: {prompt}\n  assistant: {reply.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
