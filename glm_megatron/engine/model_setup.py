"""The trained model from the ``model:`` section: architecture, precision, initial weights.

Architecture comes from ``model.preset``, ``model.hf_config``, the HF checkpoint of
``model.hf_checkpoint``, or the ``model_config.json`` saved next to ``model.load_checkpoint``'s
weights (every trainer checkpoint is self-describing). Initial weights come from
``model.load_checkpoint`` (torch_dist, any layout) or ``model.hf_checkpoint`` (safetensors); with
neither, the model is randomly initialised (tests, the demo). With ``model.use_peft`` the base
weights are frozen and LoRA adapters are added after they load (from ``model.lora_adapter``, a
PEFT directory, when given).
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from ..models import get_preset, load_hf_config
from ..models.config import ConfigError, GLMConfig
from ..models.loading import build_glm_model, load_hf_into_model
from ..models.lora import LoraSettings, check_expert_layout, resolve_targets
from ..models.lora_saved_modules import SAVED_MODULE_ATTR, resolve_modules_to_save
from .checkpointing import checkpoint_model_config, resolve_model_dir
from .config import LoraKeys, ModelSection, TrainConfigError, TrainingSection
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


def lora_settings(m: LoraKeys, glm: GLMConfig, section: str = "model",
                  layout=None) -> LoraSettings | None:
    """The adapters ``m`` asks for (None without ``use_peft``); raises naming the key.
    ``layout`` (the ``parallel:`` section): also check that it allows the targets.

    With ``lora_adapter`` the adapter's own files decide r, alpha, the targets and the modules
    to save; targets or modules in the YAML that disagree with them are refused, naming both.
    """
    if not m.use_peft:
        return None
    requested = m.lora_target_modules or ["q_proj", "k_proj", "v_proj"]
    key = f"{section}.lora_target_modules"
    try:
        targets = resolve_targets(glm, requested, key)
        saved_modules = resolve_modules_to_save(glm, m.lora_modules_to_save, targets,
                                                f"{section}.lora_modules_to_save")
        settings = LoraSettings(r=m.lora_r, alpha=m.lora_alpha, dropout=m.lora_dropout,
                                targets=targets, rslora=m.use_rslora,
                                modules_to_save=saved_modules)
        if m.lora_adapter:
            from ..models.lora_files import read_peft_adapter

            saved, _, _ = read_peft_adapter(m.lora_adapter, glm)
            saved = replace(saved, dropout=m.lora_dropout)
            if m.lora_target_modules is not None and set(saved.targets) != set(settings.targets):
                raise ConfigError(f"{key} {list(settings.targets)} differs from "
                                  f"{section}.lora_adapter's {list(saved.targets)}")
            if m.lora_modules_to_save is not None and \
                    set(saved.modules_to_save) != set(settings.modules_to_save):
                raise ConfigError(f"{section}.lora_modules_to_save {list(saved_modules)} differs "
                                  f"from {section}.lora_adapter's {list(saved.modules_to_save)}")
            settings = saved
        if layout is not None:
            check_expert_layout(glm, settings.targets, layout.etp, layout.tp)
    except ConfigError as err:
        raise TrainConfigError(str(err)) from None
    return settings


def adapter_base(m: ModelSection, glm: GLMConfig, base: str | None = None,
                 section: str = "model") -> dict | None:
    """What a LoRA run's checkpoints record about their base weights (``base``, default the
    section's load_checkpoint / hf_checkpoint). None: not LoRA, or a random base, whose
    checkpoints then keep every weight."""
    lora = lora_settings(m, glm, section)
    if base is None and lora is not None:
        base = resolve_model_dir(m.load_checkpoint) if m.load_checkpoint else m.hf_checkpoint
    if lora is None or base is None:
        return None
    from ..models.lora_files import adapter_base_record

    return adapter_base_record(base, lora, glm.model_type)


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
    lora = lora_settings(m, glm)
    if lora is not None:
        add_adapters(chunks, glm, m, lora, t.seed)
    _check_every_rank_trains(chunks, m)
    return chunks, tconfig, source


def add_adapters(chunks, glm: GLMConfig, m: LoraKeys, lora: LoraSettings, seed: int,
                 section: str = "model") -> None:
    """LoRA adapters on ``chunks`` (everything else frozen but ``lora.modules_to_save``), from
    ``lora_adapter`` if given."""
    from ..models.lora import attach_lora, load_peft_adapter

    try:
        count = attach_lora(chunks, glm, lora, seed=seed)
    except ConfigError as err:  # the layout or the experts' kind does not allow the targets
        raise TrainConfigError(str(err)) from None
    if m.lora_adapter:
        import torch.distributed as dist

        from ..models.lora_files import read_peft_adapter

        _, tensors, _ = read_peft_adapter(m.lora_adapter, glm)
        try:
            used = load_peft_adapter(chunks, glm, tensors, m.lora_adapter)
        except ConfigError as err:
            raise TrainConfigError(f"{section}.lora_adapter: {err}") from None
        # Nothing may be dropped silently: together the ranks must use every adapter tensor.
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, sorted(used))
        unused = sorted(set(tensors) - set().union(*map(set, gathered)))
        if unused:
            raise TrainConfigError(f"{section}.lora_adapter: {len(unused)} tensor(s) of "
                                   f"{m.lora_adapter} fit no adapter of this model: {unused[:5]}")
    saved = sum(p.numel() for c in chunks for p in c.parameters()
                if p.requires_grad and getattr(p, SAVED_MODULE_ATTR, False))
    log.info("LoRA r=%d alpha=%g on %s: %d adapter parameters on this rank%s", lora.r, lora.alpha,
             ", ".join(lora.targets), count,
             f"; modules trained fully ({', '.join(lora.modules_to_save)}): {saved}"
             if lora.modules_to_save else "")


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
