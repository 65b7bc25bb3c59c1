"""Trainer configuration: YAML with the seed's keys, ``dotted.key=value`` overrides, validation.

A config is a tree of small dataclasses (one per YAML section). :func:`load_config` reads the
YAML, applies command-line overrides, checks every key and type against the dataclasses and then
the cross-field rules, so that a typo or an impossible combination is an error naming the key
before any process group or model exists. Rules that need the world size (the batch arithmetic
with data parallelism) live in ``engine.batching.resolve_batch``, called right after the
launcher's environment is read and still before any work.

The schema of the trainers that read tokenized data is :class:`TrainerConfig` (SFT uses it as
it is, the reward model subclasses it); PPO composes its own top-level dataclass from the same
sections. All reuse the loader unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field

import yaml

from ..parallel.layout import ParallelLayout


class TrainConfigError(ValueError):
    """A configuration problem; the message names the key (``training.learning_rate``)."""


def choice(default, *choices):
    """A string field that accepts only ``choices`` (checked by the loader)."""
    return field(default=default, metadata={"choices": choices})


@dataclass
class LoraKeys:
    """LoRA, under TRL's ModelConfig names (the ChatGLM4 tutorial's keys): models/lora.py.
    Part of ``model:`` (SFT, RM) and of PPO's ``rlhf:`` (the policy)."""

    use_peft: bool = False
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | str | None = None  # HF names or "all-linear"; None: q, k, v
    use_rslora: bool = False  # scale alpha / sqrt(r) instead of alpha / r
    lora_adapter: str | None = None  # a PEFT adapter directory to start from (continue training)
    # HF modules trained fully beside the adapters (peft's modules_to_save): [embed_tokens, lm_head]
    lora_modules_to_save: list[str] | None = None


@dataclass
class ModelSection(LoraKeys):
    # Where the architecture comes from: a named preset, an HF config.json directory, or (when
    # both are empty) the model_config.json saved next to load_checkpoint's weights.
    preset: str | None = None
    hf_config: str | None = None
    # Initial weights: a torch_dist directory (HF-converted or an earlier stage: CKPT_DIR,
    # CKPT_DIR/iter_x or iter_x/model) or HF safetensors loaded directly.
    load_checkpoint: str | None = None
    hf_checkpoint: str | None = None
    freeze_embeddings: bool = False
    freeze_encoder_layers: int = 0  # the bottom N decoder layers get no updates
    build_mtp: bool = False  # keep GLM's MTP layer in the model (not trained by the SFT loss)


@dataclass
class OptimConfig:
    """The optimizer and its learning-rate schedule: everything the engine needs to train one
    model. The SFT and reward-model ``training:`` sections extend it, PPO's ``rlhf:`` section too
    (policy; the value model gets a copy with its own learning rate), so each key is declared once."""

    learning_rate: float = 1.0e-5
    min_learning_rate: float = 0.0
    warmup_ratio: float = 0.0
    warmup_steps: int | None = None  # overrides warmup_ratio when set
    lr_scheduler: str = choice("cosine", "cosine", "linear", "constant")
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1.0e-8
    gradient_clipping: float = 1.0  # 0 disables clipping
    mixed_precision: str = choice("bf16", "bf16", "fp32", "no")  # bf16 falls back to fp32 on CPU
    use_distributed_optimizer: bool = True
    seed: int = 1234


def optim_view(section: OptimConfig, **changes) -> OptimConfig:
    """The plain :class:`OptimConfig` part of a section that extends it, with ``changes``."""
    values = {f.name: getattr(section, f.name) for f in dataclasses.fields(OptimConfig)}
    return OptimConfig(**dict(values, **changes))


@dataclass
class TrainingSection(OptimConfig):
    num_epochs: int = 1
    max_steps: int | None = None  # None: train for num_epochs
    per_device_train_batch_size: int = 1  # micro batch per data-parallel rank
    gradient_accumulation_steps: int | None = None  # None: derived from global_batch_size
    global_batch_size: int | None = None  # None: micro batch x accumulation x data parallel
    max_seq_length: int = 2048
    packing: bool = False
    dropout: float = 0.0  # Megatron's hidden_dropout
    attention_dropout: float = 0.0
    loss_type: str = choice("causal_lm", "causal_lm")
    ignore_index: int = -100
    recompute_granularity: str | None = choice(None, None, "full", "selective")


@dataclass
class DataSection:
    train_data_path: str | None = None  # a tokenized split directory (tools/tokenize_data.py)
    validation_data_path: str | None = None
    validation_split: float = 0.0  # held out of the training data when no validation path
    max_seq_length: int | None = None  # must equal training.max_seq_length when both are set
    shuffle: bool = True


@dataclass
class CheckpointSection:
    output_dir: str = "output/sft"
    save_strategy: str = choice("steps", "steps", "epoch", "no")
    checkpoint_interval: int | None = None  # steps between saves (save_strategy: steps)
    save_steps: int | None = None  # the reward-model seed's name for checkpoint_interval
    save_total_limit: int | None = None  # older checkpoints are deleted, the best one is kept
    save_final: bool = True
    resume: str | None = None  # "auto" (latest complete checkpoint in output_dir) or a path
    # A fresh run into an output_dir holding checkpoints deletes them (--overwrite) instead of
    # being refused (engine/run_dir.py).
    overwrite: bool = False


@dataclass
class EvaluationSection:
    eval_strategy: str = choice("steps", "steps", "epoch", "no")
    eval_steps: int = 100
    metric_for_best_model: str = "eval_loss"
    greater_is_better: bool | None = None  # None: False for *loss / *perplexity metrics
    eval_batch_size: int | None = None  # per data-parallel rank; None: the training micro batch
    max_eval_samples: int | None = None
    eval_at_start: bool = False


@dataclass
class LoggingSection:
    tensorboard_dir: str | None = None  # None: CHECKPOINT.output_dir/tensorboard
    log_interval: int = 10
    progress_bar: bool = True


@dataclass
class TrainerConfig:
    """model / training / data / checkpoint / evaluation / logging / parallel: the seed's SFT
    config, and the base of every trainer that reads tokenized data."""

    model: ModelSection = field(default_factory=ModelSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    data: DataSection = field(default_factory=DataSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    # The parallel: section is the layout itself (glm_megatron.parallel.layout).
    parallel: ParallelLayout = field(default_factory=ParallelLayout)

    def validate(self) -> None:
        validate_common(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Generic loading: YAML + overrides -> dataclasses, with key and type checking.


def _parse_override(item: str) -> tuple[list[str], object]:
    if "=" not in item:
        raise TrainConfigError(f"override {item!r}: expected dotted.key=value")
    key, raw = item.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise TrainConfigError(f"override {item!r}: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = _parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise TrainConfigError(f"override {item!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return data


def _type_name(tp) -> str:
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    args = typing.get_args(tp)
    if args:
        return " or ".join(_type_name(a) for a in args)
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(key: str, value, tp):
    """Check ``value`` against the annotation ``tp``; returns the (possibly converted) value."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except TrainConfigError:
                pass
        raise TrainConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} "
                               f"{value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise TrainConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    ok = False
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        # YAML 1.1 reads "1e-5" (no dot) as a string: accept numeric strings for floats.
        if isinstance(value, str):
            try:
                value, ok = float(value), True
            except ValueError:
                ok = False
        else:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value) if ok else value
        ok = ok and math.isfinite(value)
    elif tp is str:
        ok = isinstance(value, str)
    elif tp is dict:
        ok = isinstance(value, dict)
    if not ok:
        raise TrainConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} "
                               f"{value!r}")
    return value


def build_section(cls, data, prefix: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise TrainConfigError(f"{prefix or 'config'}: expected a mapping of keys, got "
                               f"{type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields_ = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields_))
    if unknown:
        known = ", ".join(sorted(fields_))
        raise TrainConfigError(f"unknown key {prefix}.{unknown[0]} (known keys in {prefix}: {known})")
    values = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            values[name] = build_section(tp, value, key)
            continue
        choices = fields_[name].metadata.get("choices")
        if value is False and choices and "no" in choices:
            value = "no"  # YAML 1.1 reads an unquoted `no` (save_strategy: no) as false
        value = _coerce(key, value, tp)
        if choices and value not in choices:
            raise TrainConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}")
        values[name] = value
    return cls(**values)


def load_config(path: str | None, overrides: list[str] | None = None, schema=TrainerConfig):
    """Read ``path`` (YAML), apply ``overrides`` and validate; raises :class:`TrainConfigError`."""
    data: dict = {}
    if path is not None:
        if not os.path.isfile(path):
            raise TrainConfigError(f"{path}: no such config file")
        with open(path, encoding="utf-8") as fh:
            try:
                data = yaml.safe_load(fh) or {}
            except yaml.YAMLError as err:
                raise TrainConfigError(f"{path}: not valid YAML ({err})") from None
        if not isinstance(data, dict):
            raise TrainConfigError(f"{path}: the top level must be a mapping of sections")
    data = apply_overrides(data, overrides or [])
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(schema)})
    if unknown:
        raise TrainConfigError(
            f"unknown section {unknown[0]!r} (known: "
            f"{', '.join(f.name for f in dataclasses.fields(schema))})")
    cfg = build_section(schema, data, "")
    cfg.validate()
    return cfg


# ---------------------------------------------------------------------------------------------
# Cross-field rules.


def require(cond: bool, message: str) -> None:
    if not cond:
        raise TrainConfigError(message)


def validate_optim(o: OptimConfig, section: str) -> None:
    """The checks every :class:`OptimConfig` gets, naming keys as ``section.key``."""
    require(o.learning_rate > 0, f"{section}.learning_rate must be > 0")
    require(o.min_learning_rate >= 0, f"{section}.min_learning_rate must be >= 0")
    require(0 <= o.warmup_ratio < 1, f"{section}.warmup_ratio must be in [0, 1)")
    require(o.warmup_steps is None or o.warmup_steps >= 0, f"{section}.warmup_steps must be >= 0")
    require(o.weight_decay >= 0, f"{section}.weight_decay must be >= 0")
    for name in ("adam_beta1", "adam_beta2"):
        require(0 <= getattr(o, name) < 1, f"{section}.{name} must be in [0, 1)")
    require(o.adam_eps > 0, f"{section}.adam_eps must be > 0")
    require(o.gradient_clipping >= 0, f"{section}.gradient_clipping must be >= 0 (0 disables it)")


def validate_lora_keys(m: LoraKeys, section: str = "model") -> None:
    """The LoRA keys' own ranges (targets are checked against the model in model_setup)."""
    if not m.use_peft:
        require(m.lora_adapter is None, f"{section}.lora_adapter needs {section}.use_peft: true")
        require(not m.lora_modules_to_save,
                f"{section}.lora_modules_to_save needs {section}.use_peft: true")
        return
    # PPO's reference is the policy with its adapters off: fully trained modules would leak in.
    require(not (section == "rlhf" and m.lora_modules_to_save),
            "rlhf.lora_modules_to_save: the reference of a LoRA PPO run is the policy with its "
            "adapters off, which would keep the trained modules; leave it empty")
    require(m.lora_r >= 1, f"{section}.lora_r must be >= 1")
    require(m.lora_alpha > 0, f"{section}.lora_alpha must be > 0")
    require(0 <= m.lora_dropout < 1, f"{section}.lora_dropout must be in [0, 1)")
    require(not (getattr(m, "freeze_embeddings", False) or getattr(m, "freeze_encoder_layers", 0)),
            f"{section}.freeze_embeddings / {section}.freeze_encoder_layers: with "
            f"{section}.use_peft every base weight is frozen already")


def validate_common(cfg) -> None:
    m, t, d, c, e, lg = cfg.model, cfg.training, cfg.data, cfg.checkpoint, cfg.evaluation, cfg.logging
    require(not (m.preset and m.hf_config), "model.preset and model.hf_config are exclusive")
    require(not (m.load_checkpoint and m.hf_checkpoint),
            "model.load_checkpoint and model.hf_checkpoint are exclusive (one source of weights)")
    require(m.freeze_encoder_layers >= 0, "model.freeze_encoder_layers must be >= 0")
    validate_lora_keys(m)
    validate_optim(t, "training")
    require(t.min_learning_rate <= t.learning_rate,
            "training.min_learning_rate must be in [0, training.learning_rate]")
    require(t.num_epochs >= 1, "training.num_epochs must be >= 1")
    require(t.max_steps is None or t.max_steps >= 1, "training.max_steps must be >= 1 or null")
    require(t.per_device_train_batch_size >= 1, "training.per_device_train_batch_size must be >= 1")
    require(t.gradient_accumulation_steps is None or t.gradient_accumulation_steps >= 1,
            "training.gradient_accumulation_steps must be >= 1")
    require(t.global_batch_size is None or t.global_batch_size >= 1,
            "training.global_batch_size must be >= 1")
    require(t.max_seq_length >= 2, "training.max_seq_length must be >= 2")
    require(0 <= t.dropout < 1 and 0 <= t.attention_dropout < 1,
            "training.dropout and training.attention_dropout must be in [0, 1)")
    require(d.max_seq_length is None or d.max_seq_length == t.max_seq_length,
            f"data.max_seq_length ({d.max_seq_length}) differs from training.max_seq_length "
            f"({t.max_seq_length})")
    require(0 <= d.validation_split < 1, "data.validation_split must be in [0, 1)")
    for key in ("checkpoint_interval", "save_steps"):
        v = getattr(c, key)
        require(v is None or v >= 1, f"checkpoint.{key} must be >= 1")
    require(c.checkpoint_interval is None or c.save_steps is None
            or c.checkpoint_interval == c.save_steps,
            "checkpoint.checkpoint_interval and checkpoint.save_steps disagree (they are aliases)")
    require(c.save_strategy != "steps" or c.checkpoint_interval or c.save_steps,
            "checkpoint.save_strategy is 'steps' but checkpoint.checkpoint_interval is not set")
    require(c.save_total_limit is None or c.save_total_limit >= 1,
            "checkpoint.save_total_limit must be >= 1 or null")
    require(e.eval_steps >= 1, "evaluation.eval_steps must be >= 1")
    require(e.eval_batch_size is None or e.eval_batch_size >= 1,
            "evaluation.eval_batch_size must be >= 1")
    require(e.metric_for_best_model.startswith("eval_"),
            "evaluation.metric_for_best_model must name an eval metric (eval_loss, "
            "eval_perplexity, ...)")
    require(lg.log_interval >= 1, "logging.log_interval must be >= 1")


def save_interval(cfg) -> int | None:
    return cfg.checkpoint.checkpoint_interval or cfg.checkpoint.save_steps


def greater_is_better(cfg) -> bool:
    e = cfg.evaluation
    if e.greater_is_better is not None:
        return e.greater_is_better
    return not (e.metric_for_best_model.endswith("loss") or "perplexity" in e.metric_for_best_model)
