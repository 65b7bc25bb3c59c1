"""The weights directory: a ``torch_dist`` checkpoint plus the files that make it self-describing.

Layout (what ``hf-to-megatron`` writes and what trainers accept as initial weights)::

    O/metadata.json, O/.metadata, O/*.distcp, O/common.pt   Megatron dist_checkpointing files
    O/model_config.json                                      the GLM config (HF config.json form)
    O/glm_megatron.json                                      format, source, per-tensor HF dtypes

A trainer checkpoint ``CKPT/iter_NNNNNNN/model`` is the same thing (its ``model_config.json`` may
sit one level up, in ``iter_NNNNNNN``); :func:`resolve_weights_dir` accepts what the trainers'
``load_checkpoint`` accepts: ``CKPT`` (its ``latest``), its ``best`` / ``latest`` marker files,
a complete ``iter_*`` directory or the weights directory itself.
"""

from __future__ import annotations

import json
import os

from ..models.checkpoint_dirs import MODEL_CONFIG_FILE, checkpoint_model_config, resolve_model_dir
from ..models.config import GLMConfig, load_hf_config

FORMAT = "glm_megatron.weights"
INFO_FILE = "glm_megatron.json"
CONFIG_FILE = MODEL_CONFIG_FILE


def resolve_weights_dir(path: str) -> str:
    """The torch_dist weights directory behind a weights dir, iter dir, marker or run directory:
    the trainers' resolver (one set of accepted paths and errors), errors naming ``--load``
    (a ``models.checkpoint_dirs.CheckpointError``, i.e. a ConfigError)."""
    return resolve_model_dir(path, key="--load")


def read_model_config(weights_dir: str, hf_config_dir: str | None = None) -> GLMConfig:
    """The GLM config stored with the weights (or, if given, the one in ``hf_config_dir``)."""
    if hf_config_dir:
        return load_hf_config(hf_config_dir)
    return checkpoint_model_config(weights_dir, "--load",
                                   "pass --hf-config-dir with the original model's config.json")


def read_info(weights_dir: str) -> dict:
    file = os.path.join(weights_dir, INFO_FILE)
    if not os.path.exists(file):
        return {}
    with open(file, encoding="utf-8") as fh:
        return json.load(fh)


def write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
        fh.write("\n")
