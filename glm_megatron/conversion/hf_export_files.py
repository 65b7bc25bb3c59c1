"""The non-weight files of an HF model directory: config, generation config, tokenizer."""

from __future__ import annotations

import json
import os
import shutil

from ..models.config import GLMConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "added_tokens.json", "chat_template.jinja")


def write_config(out_dir: str, cfg: GLMConfig, dtype: str, hf_config_dir: str | None) -> None:
    """config.json: the original one when known (keeps fields we do not model), else ours."""
    if hf_config_dir and os.path.exists(os.path.join(hf_config_dir, "config.json")):
        with open(os.path.join(hf_config_dir, "config.json"), encoding="utf-8") as fh:
            data = json.load(fh)
    else:
        data = cfg.to_hf_dict()
    data["torch_dtype"] = dtype
    data.pop("dtype", None)
    _write(os.path.join(out_dir, "config.json"), data)


def write_generation_config(out_dir: str, cfg: GLMConfig, tokenizer_dir: str | None) -> None:
    """GLM stops at <|endoftext|>, <|user|> and <|observation|> (all in eos_token_id).

    With a tokenizer at hand its ids of those tokens are the truth; otherwise the config's.
    """
    eos, pad = cfg.eos_token_id, cfg.pad_token_id
    if tokenizer_dir:
        from ..data.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer_dir)
        eos, pad = list(tok.stop_ids), tok.pad_id
    data = {"_from_model_config": False, "eos_token_id": eos, "pad_token_id": pad}
    if cfg.bos_token_id is not None:
        data["bos_token_id"] = cfg.bos_token_id
    _write(os.path.join(out_dir, "generation_config.json"), data)


def find_tokenizer_dir(*candidates: str | None) -> str | None:
    for folder in candidates:
        if folder and any(os.path.exists(os.path.join(folder, f))
                          for f in ("tokenizer.json", "tokenizer.model")):
            return folder
    return None


def copy_tokenizer(src: str, out_dir: str, model_type: str = "glm4_moe") -> list[str]:
    """Copy the tokenizer files; make sure tokenizer_config.json carries a GLM chat template.

    A tokenizer without one gets the template of ``model_type`` (the model's config.json).
    """
    from ..data.chat_template import JINJA_TEMPLATES, template_for_model_type

    copied = []
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(out_dir, name))
            copied.append(name)
    config_file = os.path.join(out_dir, "tokenizer_config.json")
    config = {}
    if os.path.exists(config_file):
        with open(config_file, encoding="utf-8") as fh:
            config = json.load(fh)
    has_template = config.get("chat_template") or "chat_template.jinja" in copied
    if not has_template:
        # The released GLM tokenizers ship their own template; ours is for tokenizers without.
        config["chat_template"] = JINJA_TEMPLATES[template_for_model_type(model_type)]
        _write(config_file, config)
        if "tokenizer_config.json" not in copied:
            copied.append("tokenizer_config.json")
    return copied


def _write(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, ensure_ascii=False)
        fh.write("\n")
