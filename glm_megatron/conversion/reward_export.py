"""A reward-model checkpoint -> an HF sequence-classification directory (``score`` head).

    python tools/convert_checkpoint.py reward-to-hf --load CKPT --output-dir D [--tokenizer-dir T]

(``python -m glm_megatron.conversion.reward_export`` with the same flags, ``--dtype`` spelled
``float32`` / ``bfloat16`` / ``float16``, still works.)

The layout is transformers' ``*ForSequenceClassification`` one: the trunk under ``model.*``
(exactly what ``megatron-to-hf`` writes for the LM, by the same shared mapping), no ``lm_head``,
and ``score.weight`` [1, H]; ``config.json`` names the family's class
(``Glm4MoeForSequenceClassification``, ``GlmForSequenceClassification`` or
``Glm4ForSequenceClassification``), ``num_labels: 1`` and carries the reward normalisation
statistics. The reward of a sequence is ``score(final_norm(h))`` at its last non-padding token
(HF reads the last token that is not ``pad_token_id``, so right-pad with it).
Single process: a reward model is read one decoder layer at a time, like the LM converter.
A LoRA reward model (adapters + head) exports merged into its base (:mod:`.lora_reward_export`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from safetensors.torch import save_file

from ..models.checkpoint_dirs import REWARD_FILE, is_reward_checkpoint, reward_info_file
from ..models.config import ConfigError
from ..models.hf_layout import expected_hf_tensors
from ..models.lora_files import is_adapter_checkpoint
from ..models.reward_head import HEAD_KEY
from . import hf_export_files, output_dir, weights_dir
from .dist_reader import TorchDistReader
from .lora_reward_export import merged_reward_tensors, write_streamed_shards
from .megatron_to_hf import (
    DEFAULT_SHARD_BYTES,
    check_hf_shapes,
    checkpoint_tensor_to_hf,
    group_by_layer,
    plan_shards,
    shard_names,
    write_index,
)

SCORE_KEY = "score.weight"  # the HF name of the reward head (models.reward_head.HEAD_KEY)


def read_reward_info(weights: str) -> dict:
    """The ``reward_model.json`` of a reward checkpoint's weights directory; ConfigError when
    there is none (an LM checkpoint)."""
    if not is_reward_checkpoint(weights):
        raise ConfigError(f"{weights}: not a reward-model checkpoint (no {REWARD_FILE} next to it); "
                          "export LM checkpoints with tools/convert_checkpoint.py megatron-to-hf")
    with open(reward_info_file(weights), encoding="utf-8") as fh:
        return json.load(fh)


def reward_hf_tensors(cfg, with_mtp: bool) -> dict:
    """HF name -> shape of a reward export: the LM's tensors without lm_head, plus the score."""
    expected = expected_hf_tensors(cfg, with_mtp=with_mtp)
    expected.pop("lm_head.weight", None)
    expected[SCORE_KEY] = (1, cfg.hidden_size)
    return expected


def export_reward_to_hf(load: str, out_dir: str, *, tokenizer_dir: str | None = None,
                        dtype: torch.dtype | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                        overwrite: bool = False) -> dict:
    """Write the HF sequence-classification directory of the reward model at ``load`` (a reward
    run dir, its ``best`` / ``latest`` marker, an ``iter_*`` dir or its ``model/`` dir) to
    ``out_dir``, atomically. ``dtype`` casts every tensor (default: as trained). Returns
    ``{tensors, bytes, shards, mtp, tokenizer, seconds}``; bad input raises ConfigError."""
    start = time.time()
    output_dir.check_output_dir(out_dir, overwrite, inputs=(load,))
    weights = weights_dir.resolve_weights_dir(load)
    info = read_reward_info(weights)
    cfg = weights_dir.read_model_config(weights)
    reader = TorchDistReader(weights)
    if HEAD_KEY not in reader.tensors or reader.shape(HEAD_KEY) != (1, cfg.hidden_size):
        raise ConfigError(f"{weights}: no reward head {HEAD_KEY} of shape (1, {cfg.hidden_size})")
    if is_adapter_checkpoint(weights):
        # Adapters + head only (adapter_base.json names the base): merged into the base's trunk.
        head = reader.load([HEAD_KEY])[HEAD_KEY]
        tensors = merged_reward_tensors(weights, cfg, head, SCORE_KEY)
        tmp = output_dir.start(out_dir)
        weight_map, total_bytes, dtypes = write_streamed_shards(tensors, tmp, max_shard_bytes, dtype)
        mtp = any(n.startswith(f"model.layers.{cfg.num_hidden_layers}.") for n in weight_map)
        return _finish(out_dir, tmp, weights, cfg, info, reward_hf_tensors(cfg, mtp),
                       weight_map, total_bytes, len(set(weight_map.values())),
                       dtypes.get("model.embed_tokens.weight"), tokenizer_dir, start)
    with_mtp = any(k.startswith("mtp.") for k in reader.tensors)
    expected = reward_hf_tensors(cfg, with_mtp)

    shards = plan_shards(reader, max_shard_bytes)
    names = shard_names(len(shards))
    tmp = output_dir.start(out_dir)
    weight_map, total_bytes, main_dtype = {}, 0, None
    for index, shard in enumerate(shards):
        tensors = {}
        for unit_keys in group_by_layer(shard):
            loaded = reader.load(unit_keys)
            for key in unit_keys:
                t = loaded.pop(key)
                out = {SCORE_KEY: t} if key == HEAD_KEY else checkpoint_tensor_to_hf(key, t, cfg)
                for hf_name, part in out.items():
                    tensors[hf_name] = part.contiguous().to(dtype or part.dtype)
        check_hf_shapes(tensors, expected, weights)
        save_file(tensors, os.path.join(tmp, names[index]), metadata={"format": "pt"})
        for hf_name, t in tensors.items():
            weight_map[hf_name] = names[index]
            total_bytes += t.numel() * t.element_size()
            if hf_name == "model.embed_tokens.weight":
                main_dtype = str(t.dtype).replace("torch.", "")
    return _finish(out_dir, tmp, weights, cfg, info, expected, weight_map, total_bytes,
                   len(shards), main_dtype, tokenizer_dir, start)


def _finish(out_dir, tmp, weights, cfg, info, expected, weight_map, total_bytes, shard_count,
            main_dtype, tokenizer_dir, start) -> dict:
    """Check the written tensors, write the index, config and tokenizer, publish ``out_dir``."""
    missing = sorted(set(expected) - set(weight_map))
    if missing:
        raise ConfigError(f"{weights}: checkpoint lacks {len(missing)} tensor(s): {missing[:20]}")
    write_index(tmp, weight_map, total_bytes)
    config = cfg.to_hf_dict()
    config.update(architectures=[cfg.family.sequence_classification_class], num_labels=1,
                  id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0},
                  torch_dtype=main_dtype or "float32",
                  reward_normalization=info.get("normalization"))
    weights_dir.write_json(os.path.join(tmp, "config.json"), config)
    tok = hf_export_files.find_tokenizer_dir(tokenizer_dir)
    if tokenizer_dir and tok is None:
        raise ConfigError(f"{tokenizer_dir}: no tokenizer.json or tokenizer.model found")
    copied = hf_export_files.copy_tokenizer(tok, tmp, cfg.model_type) if tok else []
    output_dir.finish(out_dir)
    mtp = any(n.startswith(f"model.layers.{cfg.num_hidden_layers}.") for n in weight_map)
    return {"tensors": len(weight_map), "bytes": total_bytes, "shards": shard_count,
            "mtp": mtp, "tokenizer": copied, "seconds": time.time() - start}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m glm_megatron.conversion.reward_export",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="reward run dir, iter_x or its model/ dir")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--tokenizer-dir", default=None)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    try:
        summary = export_reward_to_hf(args.load, args.output_dir, tokenizer_dir=args.tokenizer_dir,
                                      dtype=getattr(torch, args.dtype) if args.dtype else None,
                                      overwrite=args.overwrite)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"reward model -> {args.output_dir}: {summary['tensors']} tensors in "
          f"{summary['shards']} shard(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
