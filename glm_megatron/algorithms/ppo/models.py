"""The four PPO models in one process on one layout: policy (+ value head), reference, reward, value.

Each model's architecture is the ``model_config.json`` beside its checkpoint, so the reward
(and value) model may differ in size from the policy; every model is checked against the one
parallel layout before any process group exists. Trainable models get DDP + the distributed
optimizer through :class:`~.engine.Engine`; frozen ones are plain chunks run by
:class:`~.engine.ModelRunner`, optionally offloaded to CPU memory between uses
(:class:`Offloaded`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from ...engine.checkpointing import checkpoint_model_config, resolve_model_dir
from ...engine.config import TrainConfigError
from ...engine.model_setup import params_dtype
from ...models.checkpoint import load_model_weights
from ...models.checkpoint_dirs import REWARD_FILE, is_reward_checkpoint
from ...models.config import GLMConfig, model_shape
from ...models.loading import build_glm_model
from ...models.lora_files import is_adapter_checkpoint
from ...models.policy_heads import attach_value_head
from ...models.reward_head import attach_reward_heads


@dataclass(frozen=True)
class ModelSource:
    key: str  # the config key that named it (for messages)
    weights: str  # torch_dist weights directory
    glm: GLMConfig


def resolve_source(path: str, key: str) -> ModelSource:
    weights = resolve_model_dir(path, key)
    glm = checkpoint_model_config(weights, key, "every trainer checkpoint and converted model has one")
    return ModelSource(key, weights, glm)


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


def _build(source: ModelSource, layout, dtype, *, train: bool):
    chunks, tconfig = build_glm_model(
        source.glm, layout, params_dtype=dtype, build_mtp=False,
        hidden_dropout=0.0, attention_dropout=0.0,
        calculate_per_token_loss=train,  # Megatron divides by the global token count
    )
    return chunks, tconfig


def build_policy(source: ModelSource, layout, t, value_head: bool, seed: int, adapters=None):
    """Policy chunks loaded from its checkpoint (a PPO checkpoint loads with its value head);
    ``adapters(chunks)`` adds LoRA adapters (and freezes the base) before the value head."""
    chunks, tconfig = _build(source, layout, params_dtype(t), train=True)
    if is_adapter_checkpoint(source.weights):
        raise TrainConfigError(
            f"{source.key}: {source.weights} holds LoRA adapters only; export it merged "
            "(tools/convert_checkpoint.py megatron-to-hf, then hf-to-megatron) and start PPO "
            "from that")
    load_model_weights(chunks, source.weights)
    if adapters is not None:
        adapters(chunks)
    if value_head:
        attach_value_head(chunks, tconfig, seed)
    return chunks, tconfig


def build_value_model(source: ModelSource, layout, t, seed: int):
    """A separate value model: a reward checkpoint loads with its head (the usual start), an LM
    checkpoint gets a fresh head."""
    chunks, tconfig = _build(source, layout, params_dtype(t), train=True)
    if is_reward_checkpoint(source.weights):
        attach_reward_heads(chunks, tconfig, seed=seed)
        load_model_weights(chunks, source.weights)
    else:
        load_model_weights(chunks, source.weights)
        attach_reward_heads(chunks, tconfig, seed=seed)
    return chunks, tconfig


def build_frozen(source: ModelSource, layout, t, reward: bool):
    if is_adapter_checkpoint(source.weights):
        raise TrainConfigError(f"{source.key}: {source.weights} holds LoRA adapters only; a LoRA "
                               "model as PPO's reference or reward model is not supported yet")
    chunks, tconfig = _build(source, layout, params_dtype(t), train=False)
    if reward:
        attach_reward_heads(chunks, tconfig)
    load_model_weights(chunks, source.weights)
    for chunk in chunks:
        chunk.eval()
        for p in chunk.parameters():
            p.requires_grad_(False)
    return chunks


def shape_of(source: ModelSource):
    return model_shape(source.glm)


class Offloaded:
    """Moves a frozen model's parameters and buffers to host memory between uses.

    ``offload()`` copies every tensor to (pinned, on GPU) host memory and gives its device
    storage back; ``restore()`` copies it back in place of the same Parameter objects, so the
    model's modules never notice. The copy is exact, so offloaded models give identical scores.
    On a CPU-only machine it still frees and restores the storage (what the tests check).
    """

    def __init__(self, chunks: list[torch.nn.Module], enabled: bool):
        self.chunks, self.enabled = chunks, enabled
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def _tensors(self):
        seen = set()
        for chunk in self.chunks:
            for t in list(chunk.parameters()) + list(chunk.buffers()):
                if id(t) not in seen:
                    seen.add(id(t))
                    yield t

    def offload(self) -> None:
        if not self.enabled or self.saved is not None:
            return
        pin = torch.cuda.is_available()
        self.saved = []
        for t in self._tensors():
            host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
            host.copy_(t.data)
            self.saved.append((t, host))
            t.data = torch.empty(0, dtype=t.dtype, device=t.device)

    def restore(self) -> None:
        if self.saved is None:
            return
        for t, host in self.saved:
            t.data = host.to(t.device, non_blocking=True) if t.device.type != "cpu" else host
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.saved = None

    def __enter__(self):
        self.restore()
        return self

    def __exit__(self, *exc):
        self.offload()
        return False

    def resident_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors())
