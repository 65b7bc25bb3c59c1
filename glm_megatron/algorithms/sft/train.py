"""Supervised fine-tuning: loss on assistant tokens only, on top of the shared engine.

``run_sft(cfg)`` does, in order: every check that can fail without a process group (config,
paths, data, batch arithmetic, layout), then the parallel setup, the model (initial weights from
``model.load_checkpoint`` / ``model.hf_checkpoint``), the engine, and the loop.
"""

from __future__ import annotations

import math
import os
from functools import partial

import numpy as np
import torch

from ...engine.config import BatchPlan
from ...engine.engine import Engine
from ...engine.loop import StepBatch, TrainTask, run_loop
from ...engine.model_setup import build_trained_model
from ...engine.prepare import Prepared, finish_prepare, model_layout_plan
from ...models.config import model_shape
from ...parallel import read_launch_env
from .data import SFTBatcher, StepPlanner, sft_splits
from .lm_eval import evaluate_lm


def masked_lm_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Megatron's loss contract: (sum over supervised tokens, their count, report)."""
    mask = loss_mask.float()
    total = (per_token_loss.float() * mask).sum()
    count = mask.sum()
    return total, count.to(torch.int), {"lm loss": torch.stack([total.detach(), count])}


def lm_forward_step(model, batch: dict):
    output = model(input_ids=batch["tokens"], position_ids=batch["position_ids"],
                   attention_mask=batch["attn_mask"], labels=batch["labels"])
    return output, partial(masked_lm_loss, batch["loss_mask"])


def pad_multiple(layout) -> int:
    # Sequence parallelism splits the sequence over TP ranks; CP splits it in 2*CP chunks.
    multiple = layout.tp if layout.sequence_parallel else 1
    return math.lcm(multiple, 2 * layout.cp) if layout.cp > 1 else multiple


class SFTTask(TrainTask):
    def __init__(self, cfg, train_batcher: SFTBatcher, val_batcher: SFTBatcher | None,
                 plan: BatchPlan, dp_rank: int):
        self.cfg, self.plan, self.dp_rank = cfg, plan, dp_rank
        self.train, self.val = train_batcher, val_batcher
        self.planner = StepPlanner(len(train_batcher), plan, cfg.training.seed, cfg.data.shuffle,
                                   "data.train_data_path")
        self.steps_per_epoch = self.planner.steps_per_epoch
        self.global_batch_size = plan.global_batch_size

    def step_batch(self, epoch: int, step_in_epoch: int) -> StepBatch:
        rows = self.planner.global_batch(epoch, step_in_epoch)  # [GA, DP, MBS]
        length = self.train.step_length(rows.reshape(-1))
        mbs = [self.train.microbatch(rows[i, self.dp_rank], length) for i in range(rows.shape[0])]
        return StepBatch(mbs, self.train.real_tokens(rows.reshape(-1)), rows.size * length)

    def forward_step(self, model, batch):
        return lm_forward_step(model, batch)

    def evaluate(self, engine) -> dict:
        if self.val is None:
            return {}
        ev = self.cfg.evaluation
        return evaluate_lm(engine, self.val, lm_forward_step,
                           ev.eval_batch_size or self.plan.micro_batch_size, ev.max_eval_samples)


def prepare_sft(cfg, world_size: int) -> Prepared:
    """All checks that need no process group; raises TrainConfigError."""
    glm, layout, plan = model_layout_plan(cfg, world_size)
    t = cfg.training
    train, val = sft_splits(cfg.data, t.max_seq_length, glm.vocab_size, t.seed)
    rows = len(train)
    if t.packing:
        from ...data.packing import plan_packs

        rows = len(plan_packs(list(np.asarray(train.lengths()) - 1), t.max_seq_length))
    return finish_prepare(cfg, glm, layout, plan, train, val, rows, "training rows")


def run_sft(cfg, *, log=print):
    """Train; returns the loop result (on every rank)."""
    from ...parallel import initialize_parallel

    env = read_launch_env()
    prep = prepare_sft(cfg, env.world_size)
    ctx = initialize_parallel(prep.layout, model_shape(prep.glm), seed=cfg.training.seed, env=env)
    from megatron.core import parallel_state as ps

    is_main = ctx.is_main
    t = cfg.training
    chunks, tconfig, source = build_trained_model(prep.glm, cfg.model, t, ctx.layout)
    engine = Engine(chunks, tconfig, t, prep.total_steps)
    pad_id = prep.glm.pad_token_id if (prep.glm.pad_token_id or 0) < prep.glm.vocab_size else 0
    mult = pad_multiple(ctx.layout)
    make = partial(SFTBatcher, max_seq_length=t.max_seq_length, pad_id=pad_id or 0,
                   pad_multiple=mult, ignore_index=t.ignore_index, device=ctx.device)
    train_b = make(prep.train, packing=t.packing)
    val_b = make(prep.val, packing=False) if prep.val is not None else None
    task = SFTTask(cfg, train_b, val_b, prep.plan, ps.get_data_parallel_rank())
    if is_main:
        p = prep.plan
        log(f"sft: {ctx.layout.describe()} on {ctx.world_size} ranks (DP={p.data_parallel_size}); "
            f"global batch {p.global_batch_size} = {p.micro_batch_size} x "
            f"{p.gradient_accumulation_steps} accumulation x {p.data_parallel_size} DP; "
            f"{task.steps_per_epoch} steps/epoch, {prep.total_steps} steps; weights: {source}; "
            f"dtype {tconfig.params_dtype}")
    result = run_loop(cfg, engine, task, prep.total_steps, prep.glm.to_hf_dict(), is_main,
                      resume_from=prep.resume_from)
    if is_main:
        out = os.path.abspath(cfg.checkpoint.output_dir)
        log(f"sft {result.reason} at step {result.state.step}; checkpoints in {out}"
            + (f" (best: {result.state.best_checkpoint})" if result.state.best_checkpoint else ""))
        tb = cfg.logging.tensorboard_dir or os.path.join(out, "tensorboard")
        log(f"tensorboard --logdir {os.path.abspath(tb)}")
    return result, engine, ctx
