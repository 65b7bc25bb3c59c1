"""Where weights live on disk: trainer run directories, their markers, and the paths that lead to
a ``torch_dist`` weights directory.

::

    CKPT_DIR/latest                  text: the newest complete iter dir name
    CKPT_DIR/best                    text: the best iter dir name (metric_for_best_model)
    CKPT_DIR/iter_0000200/
        model/                       torch_dist weights (``models.checkpoint.save_model_weights``)
        model_config.json            the GLMConfig as an HF config dict
        reward_model.json            reward models only: head key, reward normalisation statistics
        COMPLETE                     written once every rank finished saving

A weights directory written by the converter (``hf-to-megatron``) carries its
``model_config.json`` inside it. Writing checkpoints (optimizer, RNG, trainer state) is the
engine's business (``engine.checkpointing``); this module only reads the layout, so the trainers,
the evaluators and the converters all accept the same paths and fail with the same messages.
"""

from __future__ import annotations

import json
import os
import re

from .checkpoint import is_dist_checkpoint
from .config import ConfigError, GLMConfig, config_from_hf_dict

ITER_RE = re.compile(r"^iter_(\d{7,})$")
COMPLETE = "COMPLETE"
LATEST = "latest"
BEST = "best"
MODEL_CONFIG_FILE = "model_config.json"
REWARD_FILE = "reward_model.json"  # written beside a reward model's weights by algorithms/rm


class CheckpointError(ConfigError):
    """A path that does not lead to usable weights, or weights without a usable config.

    The message starts with the config key or flag that named the path (``--load: ...``).
    A :class:`~glm_megatron.models.config.ConfigError`, so every command reports it as a user
    error; ``engine.checkpointing`` re-raises it as ``TrainConfigError`` for trainer configs.
    """


def iter_name(step: int) -> str:
    return f"iter_{step:07d}"


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE))


def list_checkpoints(ckpt_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints of ``ckpt_dir``, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = []
    for name in os.listdir(ckpt_dir):
        m = ITER_RE.match(name)
        path = os.path.join(ckpt_dir, name)
        if m and is_complete(path):
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(ckpt_dir: str) -> str | None:
    """The iter dir named by ``latest`` if complete, else the newest complete one."""
    marker = os.path.join(ckpt_dir, LATEST)
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8") as fh:
            path = os.path.join(ckpt_dir, fh.read().strip())
        if is_complete(path):
            return path
    found = list_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


def follow_marker(path: str) -> str:
    """``CKPT_DIR/latest`` or ``CKPT_DIR/best`` (text files) -> the iter dir they name."""
    if os.path.isfile(path) and os.path.basename(path) in (LATEST, BEST):
        with open(path, encoding="utf-8") as fh:
            return os.path.join(os.path.dirname(path), fh.read().strip())
    return path


def resolve_model_dir(path: str, key: str = "model.load_checkpoint") -> str:
    """The torch_dist weights directory behind ``path``: a weights dir itself, an ``iter_x`` dir
    (it must be COMPLETE), ``CKPT_DIR/best`` / ``CKPT_DIR/latest``, or a run's CKPT_DIR (the
    checkpoint its ``latest`` names, else its newest complete one). Every command that loads
    weights goes through here (trainers, evaluate-*, PPO's models, the converters), so all accept
    the same paths and fail with the same errors (:class:`CheckpointError`), each naming ``key``."""
    path = follow_marker(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{key}: {path}: no such directory")
    if os.path.normpath(path).endswith(".partial"):
        raise CheckpointError(f"{key}: {path}: an interrupted conversion's leftovers, not a checkpoint")
    if is_dist_checkpoint(path):
        weights = path
        # iter_x/model (or iter_x/NAME/model, an extra engine's): the iter dir must be complete.
        for parent in _iter_parents(path):
            if not is_complete(parent):
                raise CheckpointError(f"{key}: {path}: inside checkpoint {parent}, which is "
                                      "incomplete (no COMPLETE marker: its save was interrupted)")
    elif is_dist_checkpoint(os.path.join(path, "model")):
        if ITER_RE.match(os.path.basename(os.path.normpath(path))) and not is_complete(path):
            raise CheckpointError(f"{key}: {path}: checkpoint is incomplete (no COMPLETE marker)")
        weights = os.path.join(path, "model")
    else:
        marker = os.path.join(path, LATEST)
        latest = follow_marker(marker) if os.path.isfile(marker) else latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(
                f"{key}: {path}: not a Megatron checkpoint (no metadata.json, no iter_x/model, and "
                "no complete checkpoint of a run in it)")
        return resolve_model_dir(latest, key)
    if not os.path.exists(os.path.join(weights, ".metadata")):
        raise CheckpointError(f"{key}: {weights}: torch_dist checkpoint is incomplete (no .metadata file)")
    return weights


def _iter_parents(path: str) -> list[str]:
    """The ``iter_*`` directories among the two levels above ``path``."""
    parent = os.path.dirname(os.path.abspath(path))
    found = []
    for candidate in (parent, os.path.dirname(parent)):
        if ITER_RE.match(os.path.basename(candidate)):
            found.append(candidate)
    return found


def model_config_file(model_dir: str) -> str | None:
    """``model_config.json`` beside the weights (converter output) or one level up (trainer
    ``iter_x``), or None."""
    for candidate in (os.path.join(model_dir, MODEL_CONFIG_FILE),
                      os.path.join(os.path.dirname(model_dir.rstrip("/")), MODEL_CONFIG_FILE)):
        if os.path.isfile(candidate):
            return candidate
    return None


def checkpoint_model_config(model_dir: str, key: str, missing_hint: str) -> GLMConfig:
    """The GLMConfig saved with the weights (``model_config.json`` beside them or one level up);
    errors (:class:`CheckpointError`) name ``key``, and ``missing_hint`` says what to do when the
    file is absent."""
    file = model_config_file(model_dir)
    if file is None:
        raise CheckpointError(f"{key}: {model_dir} has no model_config.json beside it; {missing_hint}")
    with open(file, encoding="utf-8") as fh:
        try:
            return config_from_hf_dict(json.load(fh), source=file)
        except ConfigError as err:
            raise CheckpointError(f"{key}: {err}") from None


def reward_info_file(model_dir: str) -> str:
    """Where the ``reward_model.json`` of the weights in ``model_dir`` is (or would be): in the
    directory above them (the reward trainer's ``iter_x``)."""
    return os.path.join(os.path.dirname(os.path.normpath(model_dir)), REWARD_FILE)


def is_reward_checkpoint(model_dir: str) -> bool:
    """Whether the weights in ``model_dir`` are a reward model's (a ``reward_model.json`` above
    them): their ``output_layer.weight`` is then the [1, H] reward head, not the LM head."""
    return os.path.isfile(reward_info_file(model_dir))
