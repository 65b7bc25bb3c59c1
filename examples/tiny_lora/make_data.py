#!/usr/bin/env python
"""Synthetic Alpaca-zh data for the tiny LoRA demo (``make demo-lora``), and its tokenizer.

The ChatGLM4 tutorial fine-tunes on ``alpaca_gpt4_data_zh.json``: a JSON array of
``{"instruction", "input", "output"}`` records, ``input`` often empty. This builder writes two
files of that exact format:

- ``pretrain.json``: English instructions over closed tasks (reverse or repeat a digit string,
  translate English words into Chinese). A few full-SFT steps on it give the random
  tiny base skills that LoRA can then re-use.
- ``alpaca_zh.json``: the LoRA data, mostly *Chinese* instructions for the same skills
  ("把这些数字倒过来写。") plus the tutorial's two test questions ("你好，告诉我你的名字。",
  "告诉我1+2等于多少？") with an empty ``input``, and a quarter of English rows. The base never
  saw a Chinese instruction, so its loss on held-out rows is high before LoRA and falls as the
  adapters learn to route the Chinese instructions to the skills it has.

A byte-level BPE tokenizer (HF ``tokenizer.json``, so transformers and peft load it) with the
GLM special tokens and GLM-4-9B-chat's template (``glm4``) is trained on both files.

    python examples/tiny_lora/make_data.py --out data/tiny_lora [--lora-rows 1200 --seed 0]

Tokenize as the GLM-4-9B example does (run_demo.py does this for both files)::

    MAX_SEQ_LENGTH=64 examples/glm4_9b_lora/prepare_data.sh data/tiny_lora/alpaca_zh.json \\
        data/tiny_lora/tokenizer data/tiny_lora/alpaca_zh
"""

from __future__ import annotations

import argparse
import json
import os
import random

# The closed dictionary of the translation tasks (English -> Chinese).
WORDS = {
    "cat": "猫", "dog": "狗", "fish": "鱼", "bird": "鸟", "horse": "马", "cow": "牛",
    "red": "红色", "blue": "蓝色", "green": "绿色", "white": "白色", "black": "黑色",
    "big": "大", "small": "小", "apple": "苹果", "tea": "茶", "water": "水", "book": "书",
    "tree": "树", "sun": "太阳", "moon": "月亮", "mountain": "山", "river": "河",
}
DIGIT_TASKS = {
    "reverse": lambda d: d[::-1],
    "repeat": lambda d: d,
}
DIGIT_LENGTHS = (3, 5)
ADD_RANGE = 5  # "告诉我a+b等于多少？" for a, b < 5: 25 questions, the tutorial's 1+2 among them
# Several phrasings per task and language, so the model learns the task, not one string.
INSTRUCTIONS = {
    "en": {
        "reverse": ["Reverse the digits.", "Write the digits in reverse order."],
        "repeat": ["Repeat the digits.", "Copy the digits exactly."],
        "en2zh": ["Translate the words into Chinese.", "Give the Chinese for these words."],
    },
    "zh": {
        "reverse": ["把这些数字倒过来写。", "请将下面的数字倒序输出。"],
        "repeat": ["把这些数字照抄一遍。", "请原样重复下面的数字。"],
        "en2zh": ["把下面的英文单词翻译成中文。", "请给出这些英文单词的中文。"],
    },
}
NAME_QUESTIONS = ["你好，告诉我你的名字。", "你是谁？", "What is your name?", "Who are you?"]
NAME_ANSWER = "我是 TinyGLM，一个小模型。"
ALPACA_KEYS = ("instruction", "input", "output")


def digit_row(rng: random.Random, lang: str, task: str) -> dict:
    digits = [str(rng.randrange(10)) for _ in range(rng.randint(*DIGIT_LENGTHS))]
    return {"instruction": rng.choice(INSTRUCTIONS[lang][task]), "input": " ".join(digits),
            "output": " ".join(DIGIT_TASKS[task](digits))}


def translation_row(rng: random.Random, lang: str, task: str) -> dict:
    words = rng.sample(sorted(WORDS), rng.randint(1, 3))
    return {"instruction": rng.choice(INSTRUCTIONS[lang][task]), "input": " ".join(words),
            "output": " ".join(WORDS[w] for w in words)}


def arithmetic_row(rng: random.Random) -> dict:
    a, b = rng.randrange(ADD_RANGE), rng.randrange(ADD_RANGE)
    return {"instruction": f"告诉我{a}+{b}等于多少？", "input": "", "output": f"{a}+{b}={a + b}。"}


def name_row(rng: random.Random) -> dict:
    return {"instruction": rng.choice(NAME_QUESTIONS), "input": "", "output": NAME_ANSWER}


def make_row(rng: random.Random, lang: str, tasks: tuple[str, ...]) -> dict:
    task = rng.choice(tasks)
    if task in DIGIT_TASKS:
        return digit_row(rng, lang, task)
    if task == "en2zh":
        return translation_row(rng, lang, task)
    return arithmetic_row(rng) if task == "add" else name_row(rng)


def pretrain_rows(rng: random.Random, n: int) -> list[dict]:
    """English instructions only: the digit tasks and English -> Chinese translation."""
    return [make_row(rng, "en", ("reverse", "repeat", "en2zh")) for _ in range(n)]


def lora_rows(rng: random.Random, n: int, english_share: float = 0.25) -> list[dict]:
    """The Alpaca-zh mix: Chinese instructions (plus the new tasks), a share of English rows."""
    rows = []
    for _ in range(n):
        if rng.random() < english_share:
            rows.append(make_row(rng, "en", ("reverse", "repeat", "en2zh")))
        else:
            rows.append(make_row(rng, "zh", ("reverse", "repeat", "en2zh", "add", "name")))
    return rows


def check_alpaca_rows(rows: list[dict]) -> None:
    """The tutorial's record format: exactly instruction / input / output, all strings, the
    instruction and the output non-empty."""
    for i, row in enumerate(rows):
        if set(row) != set(ALPACA_KEYS) or not all(isinstance(row[k], str) for k in ALPACA_KEYS):
            raise ValueError(f"row {i}: not an Alpaca record: {row!r}")
        if not row["instruction"] or not row["output"]:
            raise ValueError(f"row {i}: empty instruction or output: {row!r}")


def write_json_array(path: str, rows: list[dict]) -> None:
    """One JSON array, as alpaca_gpt4_data_zh.json is stored."""
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(rows, fh, ensure_ascii=False, indent=1)


def build(out: str, pretrain: int = 1600, lora: int = 1200, seed: int = 0,
          vocab_size: int = 640) -> dict:
    """Write ``pretrain.json``, ``alpaca_zh.json`` and ``tokenizer/`` under ``out``."""
    from glm_megatron.data.tokenizer import load_tokenizer
    from glm_megatron.data.tokenizer_training import iter_training_texts, train_bpe

    os.makedirs(out, exist_ok=True)
    rng = random.Random(seed)
    files = {"pretrain": os.path.join(out, "pretrain.json"),
             "lora": os.path.join(out, "alpaca_zh.json")}
    rows = {"pretrain": pretrain_rows(rng, pretrain), "lora": lora_rows(rng, lora)}
    for name, split_rows in rows.items():
        check_alpaca_rows(split_rows)
        write_json_array(files[name], split_rows)
    tok_dir = os.path.join(out, "tokenizer")
    train_bpe(list(iter_training_texts(list(files.values()))), tok_dir, vocab_size,
              template="glm4")
    tok = load_tokenizer(tok_dir)
    return {"tokenizer": tok_dir, "vocab_size": tok.vocab_size, **files}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--pretrain-rows", type=int, default=1600)
    p.add_argument("--lora-rows", type=int, default=1200)
    p.add_argument("--vocab-size", type=int, default=640)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    info = build(args.out, args.pretrain_rows, args.lora_rows, args.seed, args.vocab_size)
    print(json.dumps(info, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
