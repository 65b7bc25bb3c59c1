"""Load any trained checkpoint as a whole model; a LoRA run's: its base with the adapters folded in.

A LoRA SFT or reward-model checkpoint holds the adapters (and a trained head) only and names its
base in ``adapter_base.json``. PPO (and every later trainer) may start from one or use it as a
frozen reference or reward model: :func:`load_lora_checkpoint_folded` loads the named base
(after checking it is still the one the adapters were trained on), attaches the run's adapters,
loads them, and folds them into the base weights (models/lora_fold.py), in memory and on each
rank's own shards. The chunks then hold an ordinary model: trainable as a whole, or ready for
fresh adapters. :func:`load_checkpoint_weights` is what every consumer of a trained checkpoint
calls (PPO's models, evaluate-sft, evaluate-rm): a full checkpoint loads as it always did.
"""

from __future__ import annotations

import os

from ..conversion.lora_export import settings_of
from ..models.checkpoint import is_dist_checkpoint, load_model_weights
from ..models.config import ConfigError, GLMConfig
from ..models.loading import load_hf_into_model
from ..models.lora import attach_lora
from ..models.lora_files import base_fingerprint, is_adapter_checkpoint, read_adapter_base
from ..models.lora_fold import fold_adapters
from .config import TrainConfigError


def load_lora_checkpoint_folded(chunks, glm: GLMConfig, weights_dir: str, key: str,
                                heads=None) -> str:
    """Fill ``chunks`` with the model a LoRA checkpoint stands for; returns its base's path.

    ``heads(chunks)`` attaches the heads trained beside the adapters (a reward model's score
    head): called after the base is loaded and before the adapters' checkpoint, which holds them.
    Which parameters train afterwards is as before the call (heads: trainable, as attached).
    Raises TrainConfigError naming ``key`` when the base is gone, changed or does not fit.
    """
    record = read_adapter_base(weights_dir)
    base = record["base"]
    if not os.path.isdir(base):
        raise TrainConfigError(f"{key}: {weights_dir} holds LoRA adapters whose base weights "
                               f"{base} are gone (named in its adapter_base.json)")
    if base_fingerprint(base) != record["fingerprint"]:
        raise TrainConfigError(f"{key}: the base weights {base} changed since the adapters of "
                               f"{weights_dir} were trained on them (fingerprint "
                               f"{record['fingerprint']}, now {base_fingerprint(base)})")
    if record.get("model_type", glm.model_type) != glm.model_type:
        raise TrainConfigError(f"{key}: adapters trained on a {record['model_type']} model, "
                               f"this model is {glm.model_type}")
    trains = {id(p): p.requires_grad for c in chunks for p in c.parameters()}
    try:
        if is_dist_checkpoint(base):
            load_model_weights(chunks, base)
        else:
            load_hf_into_model(chunks, glm, base)
        attach_lora(chunks, glm, settings_of(record))  # freezes every weight it finds
        if heads is not None:
            heads(chunks)
        load_model_weights(chunks, weights_dir, adapters_only=True)
    except ConfigError as err:
        raise TrainConfigError(f"{key}: {err}") from None
    fold_adapters(chunks)
    for chunk in chunks:
        for p in chunk.parameters():
            if id(p) in trains:
                p.requires_grad_(trains[id(p)])
    return base


def load_checkpoint_weights(chunks, glm: GLMConfig, weights_dir: str, key: str, heads=None) -> None:
    """Fill ``chunks`` from a trained checkpoint's weights directory, full or LoRA.

    ``heads(chunks)`` attaches the heads the checkpoint holds (a reward model's score head)
    at the point where they must exist: before a full checkpoint is read, after a LoRA run's base.
    """
    if is_adapter_checkpoint(weights_dir):
        load_lora_checkpoint_folded(chunks, glm, weights_dir, key, heads)
        return
    if heads is not None:
        heads(chunks)
    try:
        load_model_weights(chunks, weights_dir)
    except ConfigError as err:
        raise TrainConfigError(f"{key}: {err}") from None
