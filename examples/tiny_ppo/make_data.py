#!/usr/bin/env python
"""Synthetic data for the whole tiny pipeline SFT -> reward model -> PPO, with ONE tokenizer.

The tiny SFT data (digit transforms, examples/tiny_sft) and the tiny preference data (valence
of words, examples/tiny_rm) each train their own tokenizer, so their models cannot be chained.
This builder reuses both generators and trains a single byte-level BPE tokenizer on all of it
(an HF ``tokenizer.json``, so the exported policy chats through ``transformers.AutoTokenizer``):

- SFT: "Describe the {thing} {n}." answered with 4-8 words from the tiny_rm POSITIVE + NEGATIVE
  lists at a *uniformly random* positive share, so the SFT model answers with a mix of both
  valences and PPO has something to learn (move toward the positive words the reward model
  prefers); about 1/3 of the rows are tiny_sft's digit-transform conversations, so the model
  also has a checkable chat skill (exact answers) that PPO should not destroy.
- preferences: tiny_rm's records (chosen mostly positive, rejected mostly negative).
- PPO prompts: "Describe the {thing} {n}.", validation prompts disjoint from training ones.

Writes, under OUT::

    sft_train.jsonl, sft_val.jsonl      conversations (the seed's format)
    sft_test.jsonl                      held-out digit conversations (evaluate-sft exact match)
    pref_train.jsonl, pref_val.jsonl, pref_test.jsonl   preference records
    prompts_train.jsonl, prompts_val.jsonl              {"prompt": ...} records for PPO
    tokenizer/                          one BPE tokenizer (tokenizer.json) with the GLM special tokens
    tokenized_{sft,pref,prompts}_{train,val}/train      what training reads (tools/tokenize_data.py)

    python examples/tiny_ppo/make_data.py --out data/tiny_ppo [--sft-train 1500 --seed 0]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_make_data",
                                                  EXAMPLES / name / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tiny_sft = _load("tiny_sft")
tiny_rm = _load("tiny_rm")
write_jsonl = tiny_sft.write_jsonl

DIGIT_SHARE = 1 / 3          # share of SFT rows that are digit-transform conversations
DIGIT_LENGTHS = (3, 6)       # digit-string lengths, as examples/tiny_sft


def describe_prompt(rng: random.Random) -> str:
    """The tiny_rm prompt style (10 things x 100 numbers = 1000 distinct prompts)."""
    return f"Describe the {rng.choice(tiny_rm.THINGS)} {rng.randrange(100)}."


def make_describe_example(rng: random.Random) -> dict:
    """4-8 valence words with a positive share drawn uniformly from [0, 1]."""
    return {"conversations": [
        {"role": "user", "content": describe_prompt(rng)},
        {"role": "assistant", "content": tiny_rm._response(rng, (0.0, 1.0))},
    ]}


def make_digit_rows(rng: random.Random, n: int, seen_digits: set,
                    digit_lengths: tuple[int, int] = DIGIT_LENGTHS) -> list[dict]:
    """``n`` tiny_sft digit conversations whose prompts are not in ``seen_digits`` (updated)."""
    rows = []
    while len(rows) < n:
        ex = tiny_sft.make_example(rng, *digit_lengths)
        key = ex["conversations"][1]["content"]
        if key not in seen_digits:
            seen_digits.add(key)
            rows.append(ex)
    return rows


def make_sft_rows(rng: random.Random, n: int, seen_digits: set,
                  digit_lengths: tuple[int, int] = DIGIT_LENGTHS,
                  digit_share: float = DIGIT_SHARE) -> list[dict]:
    """``n`` shuffled rows: ``digit_share`` digit tasks, the rest descriptions."""
    n_digits = round(n * digit_share)
    rows = ([make_describe_example(rng) for _ in range(n - n_digits)]
            + make_digit_rows(rng, n_digits, seen_digits, digit_lengths))
    rng.shuffle(rows)
    return rows


def make_prompt_splits(rng: random.Random, n_train: int, n_val: int) -> tuple[list, list]:
    """Distinct prompts; validation is disjoint from training."""
    total = len(tiny_rm.THINGS) * 100
    if n_train + n_val > total:
        raise SystemExit(f"error: --prompts-train + --prompts-val must be <= {total} "
                         "(distinct 'Describe the {thing} {n}.' prompts)")
    seen, val, train = set(), [], []
    for rows, n in ((val, n_val), (train, n_train)):
        while len(rows) < n:
            prompt = describe_prompt(rng)
            if prompt not in seen:
                seen.add(prompt)
                rows.append({"prompt": prompt})
    return train, val


def build(out: str, sft_train: int = 1500, sft_val: int = 96, sft_test: int = 16,
          pref_train: int = 1000, pref_val: int = 96, pref_test: int = 64,
          prompts_train: int = 512, prompts_val: int = 64, seed: int = 0,
          vocab_size: int = 450, digit_lengths: tuple[int, int] = DIGIT_LENGTHS,
          digit_share: float = DIGIT_SHARE) -> dict:
    from glm_megatron.data.encoding import EncodeOptions
    from glm_megatron.data.tokenizer import load_tokenizer
    from glm_megatron.data.tokenizer_training import iter_training_texts, train_bpe
    from glm_megatron.data.tokenizing import tokenize_files

    os.makedirs(out, exist_ok=True)
    rng = random.Random(seed)
    seen_digits: set = set()
    rows = {}
    # Held-out digit prompts are drawn first and never appear in training.
    rows["sft_test"] = make_digit_rows(rng, sft_test, seen_digits, digit_lengths)
    rows["sft_val"] = make_sft_rows(rng, sft_val, seen_digits, digit_lengths, digit_share)
    rows["sft_train"] = make_sft_rows(rng, sft_train, seen_digits, digit_lengths, digit_share)
    for split, n in (("train", pref_train), ("val", pref_val), ("test", pref_test)):
        rows[f"pref_{split}"] = [tiny_rm.make_record(rng) for _ in range(n)]
    rows["prompts_train"], rows["prompts_val"] = make_prompt_splits(rng, prompts_train,
                                                                    prompts_val)
    files = {name: os.path.join(out, f"{name}.jsonl") for name in rows}
    for name, split_rows in rows.items():
        write_jsonl(files[name], split_rows)

    # One tokenizer for all three stages, trained on the training texts of every kind (the
    # held-out splits use the same closed word lists and digits).
    tok_dir = os.path.join(out, "tokenizer")
    texts = list(iter_training_texts([files["sft_train"], files["pref_train"],
                                      files["prompts_train"]]))
    train_bpe(texts, tok_dir, vocab_size)
    tok = load_tokenizer(tok_dir)

    info = {"tokenizer": tok_dir, "vocab_size": tok.vocab_size}
    kinds = {"sft": "sft", "pref": "preference", "prompts": "prompts"}
    for prefix, kind in kinds.items():
        for split in ("train", "val"):
            name = f"{prefix}_{split}"
            tok_out = os.path.join(out, "tokenized_" + name)
            summary = tokenize_files([files[name]], tok_out, tok, kind, EncodeOptions())
            if summary["skipped"] or not summary["rows"]["train"]:
                raise SystemExit(f"error: {files[name]}: {summary['skipped']} records skipped, "
                                 f"{summary['rows']['train']} rows written")
            # tokenize_files writes DIR/train (no validation split asked for).
            info[name] = os.path.join(tok_out, "train")
    info.update(sft_test=files["sft_test"], pref_test=files["pref_test"], jsonl=files)
    return info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--sft-train", type=int, default=1500)
    p.add_argument("--sft-val", type=int, default=96)
    p.add_argument("--sft-test", type=int, default=16, help="held-out digit conversations")
    p.add_argument("--pref-train", type=int, default=1000)
    p.add_argument("--pref-val", type=int, default=96)
    p.add_argument("--pref-test", type=int, default=64)
    p.add_argument("--prompts-train", type=int, default=512)
    p.add_argument("--prompts-val", type=int, default=64)
    p.add_argument("--vocab-size", type=int, default=450)
    p.add_argument("--digit-share", type=float, default=DIGIT_SHARE,
                   help="share of SFT rows that are digit tasks")
    p.add_argument("--digit-lengths", type=int, nargs=2, default=DIGIT_LENGTHS,
                   metavar=("MIN", "MAX"), help="digit-string lengths of the digit tasks")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    info = build(args.out, args.sft_train, args.sft_val, args.sft_test, args.pref_train,
                 args.pref_val, args.pref_test, args.prompts_train, args.prompts_val, args.seed,
                 args.vocab_size, tuple(args.digit_lengths), args.digit_share)
    print(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
