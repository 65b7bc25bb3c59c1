"""The trained model from the ``model:`` section: architecture, precision, initial weights.

Architecture comes from ``model.preset``, ``model.hf_config``, the HF checkpoint of
``model.hf_checkpoint``, or the ``model_config.json`` saved next to ``model.load_checkpoint``'s
weights (every trainer checkpoint is self-describing). Initial weights come from
``model.load_checkpoint`` (torch_dist, any layout) or ``model.hf_checkpoint`` (safetensors); with
neither, the model is randomly initialised (tests, the demo).
"""

from __future__ import annotations

import logging

import torch

from ..models import get_preset, load_hf_config
from ..models.config import ConfigError, GLMConfig
from ..models.loading import build_glm_model, load_hf_into_model
from .checkpointing import checkpoint_model_config, resolve_model_dir
from .config import ModelSection, TrainConfigError, TrainingSection
from .optimizer import freeze_parameters

log = logging.getLogger(__name__)


def resolve_glm_config(m: ModelSection) -> GLMConfig:
    """Raises TrainConfigError naming the key; cheap (no torch.distributed needed)."""
    try:
        if m.preset:
            return get_preset(m.preset)
        if m.hf_config:
            return load_hf_config(m.hf_config)
        if m.hf_checkpoint:
            return load_hf_config(m.hf_checkpoint)
    except ConfigError as err:
        key = "model.preset" if m.preset else ("model.hf_config" if m.hf_config else "model.hf_checkpoint")
        raise TrainConfigError(f"{key}: {err}") from None
    if m.load_checkpoint:
        return checkpoint_model_config(resolve_model_dir(m.load_checkpoint), "model.load_checkpoint",
                                       "set model.preset or model.hf_config to describe the architecture")
    raise TrainConfigError("model: set one of model.preset, model.hf_config, model.hf_checkpoint "
                           "or model.load_checkpoint")


def params_dtype(t: TrainingSection) -> torch.dtype:
    # bf16 needs a GPU; on CPU the seed's "bf16" runs in fp32 (docs/ARCHITECTURE.md §5).
    if t.mixed_precision == "bf16" and torch.cuda.is_available():
        return torch.bfloat16
    return torch.float32


def build_trained_model(glm: GLMConfig, m: ModelSection, t: TrainingSection, layout):
    """This rank's model chunks (unwrapped), their TransformerConfig, and the weights' source."""
    chunks, tconfig = build_glm_model(
        glm, layout,
        params_dtype=params_dtype(t),
        build_mtp=m.build_mtp,
        hidden_dropout=t.dropout,
        attention_dropout=t.attention_dropout,
        recompute_granularity=t.recompute_granularity,
        # Megatron sums token losses and divides by the global token count (see optimizer.py).
        calculate_per_token_loss=True,
    )
    source = "random init"
    if m.load_checkpoint:
        from ..models.checkpoint import load_model_weights

        model_dir = resolve_model_dir(m.load_checkpoint)
        load_model_weights(chunks, model_dir)
        source = model_dir
    elif m.hf_checkpoint:
        load_hf_into_model(chunks, glm, m.hf_checkpoint)
        source = m.hf_checkpoint
    freeze_parameters(chunks, m.freeze_embeddings, m.freeze_encoder_layers)
    _check_every_rank_trains(chunks, m)
    return chunks, tconfig, source


def _check_every_rank_trains(chunks, m: ModelSection) -> None:
    """Refuse, on every rank alike, a freeze that leaves some rank with nothing to train.

    Megatron's distributed optimizer cannot save a checkpoint when one rank holds no trainable
    parameter (its collective waits for ever), e.g. a pipeline stage whose layers are all frozen.
    """
    import torch.distributed as dist

    trainable = sum(p.numel() for c in chunks for p in c.parameters() if p.requires_grad)
    least = torch.tensor([trainable], dtype=torch.int64)
    dist.all_reduce(least, op=dist.ReduceOp.MIN)
    if int(least) == 0:
        raise TrainConfigError(
            f"model.freeze_encoder_layers={m.freeze_encoder_layers} / model.freeze_embeddings="
            f"{m.freeze_embeddings} leave a rank (a whole pipeline stage) with nothing to train; "
            "freeze fewer layers or use fewer pipeline stages"
        )
