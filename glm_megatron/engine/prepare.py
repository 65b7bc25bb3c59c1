"""What the SFT and reward-model trainers (and their evaluate-* commands) decide before any
process group exists: the model config, the parallel layout (checked against the world size and
the model), the batch plan, the number of steps and the checkpoint to resume from. Each check
raises TrainConfigError naming the key or flag, so a bad config fails in seconds instead of after
the model is built."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.config import model_shape
from ..parallel import LayoutError, ParallelLayout, read_launch_env, validate_layout
from ..parallel.state import have_transformer_engine
from . import checkpointing as ckpt
from .batching import BatchPlan, resolve_batch
from .config import TrainConfigError
from .model_setup import lora_settings, resolve_glm_config


@dataclass
class Prepared:
    """Everything decided before any process group exists."""

    glm: object
    layout: object
    plan: BatchPlan
    train: object
    val: object
    total_steps: int
    resume_from: str | None


def _checked_layout(layout, world_size: int, glm, training: bool, what: str):
    try:
        return validate_layout(layout, world_size, model_shape(glm), training=training,
                               cuda=torch.cuda.is_available(),
                               have_transformer_engine=have_transformer_engine())
    except LayoutError as err:
        raise TrainConfigError(f"{what}: {err}") from None


def model_layout_plan(cfg, world_size: int):
    """(GLM config, validated training layout, batch plan) of a trainer config."""
    glm = resolve_glm_config(cfg.model)
    layout = _checked_layout(cfg.parallel, world_size, glm, True, "parallel")
    lora_settings(cfg.model, glm, layout=layout)  # bad LoRA targets, files, layout: before any work
    return glm, layout, resolve_batch(cfg.training, layout.data_parallel_size(world_size))


def evaluation_target(args):
    """(weights dir, GLM config, launch env, validated layout) of an evaluate-* command's
    ``--load`` and ``--tp/--pp/--ep``."""
    model_dir = ckpt.resolve_model_dir(args.load, key="--load")
    glm = ckpt.checkpoint_model_config(model_dir, "--load", "every trainer checkpoint has one")
    env = read_launch_env()
    layout = ParallelLayout(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
                            expert_model_parallel_size=args.ep, sequence_parallel=args.tp > 1)
    return model_dir, glm, env, _checked_layout(layout, env.world_size, glm, False, "--tp/--pp/--ep")


def finish_prepare(cfg, glm, layout, plan: BatchPlan, train, val, rows: int, what: str) -> Prepared:
    """Step count and resume point once the data is known; `rows` training rows, called `what`
    in the error when there are fewer than one global batch."""
    t = cfg.training
    steps_per_epoch = rows // plan.global_batch_size
    if steps_per_epoch == 0:
        raise TrainConfigError(
            f"data.train_data_path: {rows} {what} is less than one global batch "
            f"({plan.global_batch_size}); lower training.global_batch_size")
    total = t.max_steps if t.max_steps is not None else t.num_epochs * steps_per_epoch
    if cfg.evaluation.eval_strategy != "no" and val is None and cfg.evaluation.eval_at_start:
        raise TrainConfigError("evaluation.eval_at_start needs validation data "
                               "(data.validation_data_path or data.validation_split)")
    resume_from = ckpt.resolve_resume(cfg.checkpoint.resume, cfg.checkpoint.output_dir)
    return Prepared(glm, layout, plan, train, val, total, resume_from)
