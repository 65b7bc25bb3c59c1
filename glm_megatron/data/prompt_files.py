"""Raw prompt files for the RL trainers, tokenized when the run starts.

The GLM-4.6 guide points PPO's ``prompt_data_path`` at a raw ``train.jsonl``; the tokenized
``prompts`` split of ``tools/tokenize_data.py --format prompts`` stays the fast path for large
sets. A raw file holds one prompt per record in any format the prompts reader accepts
(``{"prompt": ...}``, ``{"messages": [...]}`` ending in a user turn, ShareGPT), checked the same
way (a bad record is an error naming ``file:line``), and is rendered with the model family's chat
template up to the assistant generation prompt — the same ids ``tokenize_data.py`` would write.
"""

from __future__ import annotations

import os

from .encoding import EncodeOptions, encode_prompt
from .errors import DataValidationError
from .readers import read_examples
from .tokenizer import load_tokenizer

RAW_SUFFIXES = (".jsonl", ".json")


def is_raw_prompt_file(path: str) -> bool:
    return os.path.isfile(path) and path.endswith(RAW_SUFFIXES)


def tokenize_prompt_file(path: str, tokenizer_path: str, template: str) -> tuple[list, dict]:
    """(prompt id lists in file order, the tokenizer's description as a manifest records it).
    Raises DataValidationError naming the file and line of a bad record."""
    tok = load_tokenizer(tokenizer_path)
    prompts = []
    for line, example, _ in read_examples(path, "prompts"):
        try:
            row, _ = encode_prompt(tok, example, EncodeOptions(template))
        except DataValidationError as err:
            raise err.at(path, line) from None
        prompts.append([int(i) for i in row["prompt_ids"]])
    if not prompts:
        raise DataValidationError("no prompt records", path=path, reason="empty file")
    return prompts, tok.describe()
