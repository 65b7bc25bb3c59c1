"""The four PPO models in one process on one layout: policy (+ value head), reference, reward, value.

Each model's architecture is the ``model_config.json`` beside its checkpoint, so the reward
(and value) model may differ in size from the policy; every model is checked against the one
parallel layout before any process group exists. Trainable models get DDP + the distributed
optimizer through :class:`~.engine.Engine`; frozen ones (reference, reward) are built by
:mod:`glm_megatron.engine.frozen` as plain chunks run by :class:`~.engine.ModelRunner`,
optionally offloaded to CPU memory between uses (``engine.frozen.Offloaded``).
"""

from __future__ import annotations

import json
import os

from ...engine.config import TrainConfigError
from ...engine.frozen import ModelSource, build_from_source
from ...engine.lora_checkpoints import load_checkpoint_weights
from ...engine.model_setup import params_dtype
from ...models.checkpoint_dirs import REWARD_FILE, is_reward_checkpoint
from ...models.config import GLMConfig, model_shape
from ...models.policy_heads import attach_value_head
from ...models.reward_head import attach_reward_heads


def reward_normalization(source: ModelSource) -> dict:
    """The reward model's saved score statistics ({mean, std, ...}) from ``reward_model.json``."""
    if not is_reward_checkpoint(source.weights):
        raise TrainConfigError(f"{source.key}: {source.weights} is not a reward-model checkpoint "
                               f"(no {REWARD_FILE} beside it; train one with `glm_megatron rm`)")
    path = os.path.join(os.path.dirname(source.weights.rstrip("/")), REWARD_FILE)
    with open(path, encoding="utf-8") as fh:
        info = json.load(fh)
    stats = info.get("normalization") or {}
    if not isinstance(stats.get("mean"), (int, float)) or not isinstance(stats.get("std"), (int, float)):
        raise TrainConfigError(f"{source.key}: {path} has no normalization mean/std")
    if stats["std"] <= 0:
        raise TrainConfigError(f"{source.key}: {path}: normalization std must be > 0")
    return stats


def check_same_vocabulary(policy: GLMConfig, other: GLMConfig, key: str) -> None:
    if other.vocab_size != policy.vocab_size:
        raise TrainConfigError(f"{key}: vocab_size {other.vocab_size} differs from the policy's "
                               f"{policy.vocab_size}; PPO scores the policy's tokens with it")


def build_policy(source: ModelSource, layout, t, value_head: bool, seed: int, adapters=None):
    """Policy chunks loaded from its checkpoint (a LoRA SFT run's: its base with the adapters
    folded in, so the reference built from the same checkpoint is the SFT model);
    ``adapters(chunks)`` adds LoRA adapters (and freezes the base) before the value head."""
    chunks, tconfig = build_from_source(source, layout, params_dtype(t), train=True)
    load_checkpoint_weights(chunks, source.glm, source.weights, source.key)
    if adapters is not None:
        adapters(chunks)
    if value_head:
        attach_value_head(chunks, tconfig, seed)
    return chunks, tconfig


def build_value_model(source: ModelSource, layout, t, seed: int):
    """A separate value model: a reward checkpoint loads with its head (the usual start), an LM
    checkpoint gets a fresh head."""
    chunks, tconfig = build_from_source(source, layout, params_dtype(t), train=True)
    heads = lambda c: attach_reward_heads(c, tconfig, seed=seed)  # noqa: E731
    if is_reward_checkpoint(source.weights):
        load_checkpoint_weights(chunks, source.glm, source.weights, source.key, heads)
    else:
        load_checkpoint_weights(chunks, source.glm, source.weights, source.key)
        heads(chunks)
    return chunks, tconfig


def shape_of(source: ModelSource):
    return model_shape(source.glm)
