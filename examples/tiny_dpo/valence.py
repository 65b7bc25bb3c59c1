#!/usr/bin/env python
"""What DPO did to the tiny policy's answers: the share of positive words in its sampled replies
to held-out "Describe the ..." prompts, before (SFT model) and after (DPO model), through
transformers alone on the HF exports (``apply_chat_template`` + ``generate``).

    python examples/tiny_dpo/valence.py output/tiny_dpo/sft-hf output/tiny_dpo/dpo-hf \
        data/tiny_dpo/prompts_val.jsonl [--limit 32]

The tiny preference data (examples/tiny_rm/make_data.py) prefers answers made of positive words;
the SFT data answers with a random mix, so the SFT model's share is near one half.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "tiny_rm_make_data", Path(__file__).resolve().parents[1] / "tiny_rm" / "make_data.py")
tiny_rm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny_rm)


def replies(model_dir: str, prompts: list[str], max_new_tokens: int = 12) -> list[str]:
    """Sampled replies (temperature 1, no top-k / top-p): greedy decoding would hide the SFT
    model's mix of valences behind its single most likely word."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    torch.manual_seed(0)
    out = []
    for prompt in prompts:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                      add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)
        new = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=True,
                             temperature=1.0, top_k=0, top_p=1.0)
        out.append(tok.decode(new[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return out


def valence(texts: list[str]) -> dict:
    """Positive / negative word counts over the replies and the positive share of the two."""
    words = [w.strip(".,") for t in texts for w in t.split()]
    pos = sum(w in tiny_rm.POSITIVE for w in words)
    neg = sum(w in tiny_rm.NEGATIVE for w in words)
    return {"positive": pos, "negative": neg, "share": pos / max(pos + neg, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("before")
    p.add_argument("after")
    p.add_argument("prompts", help="JSONL of {\"prompt\": ...} records")
    p.add_argument("--limit", type=int, default=24)
    args = p.parse_args()
    with open(args.prompts, encoding="utf-8") as fh:
        prompts = [json.loads(line)["prompt"] for line in fh if line.strip()][: args.limit]
    found = {name: replies(path, prompts) for name, path in (("SFT", args.before),
                                                              ("DPO", args.after))}
    for name, texts in found.items():
        v = valence(texts)
        print(f"  {name}: positive words {v['share']:.0%} of the valence words in "
              f"{len(texts)} sampled replies ({v['positive']} positive, {v['negative']} negative)")
    for i in range(min(3, len(prompts))):
        print(f"  {prompts[i]!r}\n      SFT: {found['SFT'][i]!r}\n      DPO: {found['DPO'][i]!r}")


if __name__ == "__main__":
    main()
