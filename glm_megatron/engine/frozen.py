"""Frozen models beside the trained one, on the same layout: a reference (PPO, DPO) or a reward
model built from a checkpoint, run by :class:`~.engine.ModelRunner` and optionally offloaded
to host memory between uses (:class:`Offloaded`).

A model's architecture is the ``model_config.json`` beside its checkpoint (:func:`resolve_source`),
so a frozen model may differ in size from the trained one; the trainer checks it against the
one parallel layout before any process group exists.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.config import GLMConfig
from ..models.loading import build_glm_model
from ..models.reward_head import attach_reward_heads
from .checkpointing import checkpoint_model_config, resolve_model_dir
from .lora_checkpoints import load_checkpoint_weights
from .model_setup import params_dtype


@dataclass(frozen=True)
class ModelSource:
    key: str  # the config key that named it (for messages)
    weights: str  # torch_dist weights directory
    glm: GLMConfig


def resolve_source(path: str, key: str) -> ModelSource:
    weights = resolve_model_dir(path, key)
    glm = checkpoint_model_config(weights, key, "every trainer checkpoint and converted model has one")
    return ModelSource(key, weights, glm)


def build_from_source(source: ModelSource, layout, dtype, *, train: bool):
    chunks, tconfig = build_glm_model(
        source.glm, layout, params_dtype=dtype, build_mtp=False,
        hidden_dropout=0.0, attention_dropout=0.0,
        calculate_per_token_loss=train,  # Megatron divides by the global token count
    )
    return chunks, tconfig


def build_frozen(source: ModelSource, layout, t, reward: bool):
    """A frozen reference (``reward``: reward model); a LoRA run's checkpoint loads as its base
    with the adapters folded in."""
    chunks, tconfig = build_from_source(source, layout, params_dtype(t), train=False)
    heads = (lambda c: attach_reward_heads(c, tconfig)) if reward else None
    load_checkpoint_weights(chunks, source.glm, source.weights, source.key, heads)
    for chunk in chunks:
        chunk.eval()
        for p in chunk.parameters():
            p.requires_grad_(False)
    return chunks



def frozen_copy(chunks, glm: GLMConfig, layout, t) -> list:
    """A frozen model holding exactly the weights ``chunks`` (unwrapped, same layout) hold now:
    DPO's reference when it is the starting policy, copied before the first step."""
    copy, _ = build_from_source(ModelSource("the starting policy", "", glm), layout,
                                params_dtype(t), train=False)
    for mine, theirs in zip(copy, chunks, strict=True):
        own = dict(mine.named_parameters()) | dict(mine.named_buffers())
        for name, tensor in list(theirs.named_parameters()) + list(theirs.named_buffers()):
            own[name].data.copy_(tensor.data)
        mine.eval()
        mine.requires_grad_(False)
    return copy


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
