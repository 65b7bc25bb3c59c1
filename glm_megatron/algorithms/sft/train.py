"""Supervised fine-tuning: loss on assistant tokens only, on top of the shared engine.

``run_sft(cfg)`` does, in order: every check that can fail without a process group (config,
paths, data, batch arithmetic, layout), then the parallel setup, the model (initial weights from
``model.load_checkpoint`` / ``model.hf_checkpoint``), the engine, and the loop.
"""

from __future__ import annotations

import os
from functools import partial

import numpy as np

from ...engine.batching import BatchPlan, model_pad_id, pad_multiple, tokenized_splits
from ...engine.engine import Engine
from ...engine.loop import BatchedTask, run_loop, schedule_from_config
from ...engine.model_setup import adapter_base, build_trained_model
from ...engine.prepare import Prepared, finish_prepare, model_layout_plan
from ...models.config import model_shape
from ...parallel import read_launch_env
from .data import SFTBatcher
from .lm_eval import evaluate_lm
from .loss import lm_forward_step


class SFTTask(BatchedTask):
    def __init__(self, cfg, train_batcher: SFTBatcher, val_batcher: SFTBatcher | None,
                 plan: BatchPlan, dp_rank: int):
        super().__init__(train_batcher, plan, dp_rank, cfg.training.seed, cfg.data.shuffle)
        self.cfg, self.val = cfg, val_batcher

    def forward_step(self, model, batch):
        return lm_forward_step(model, batch)

    def evaluate(self, engine, step: int) -> dict:
        if self.val is None:
            return {}
        ev = self.cfg.evaluation
        return evaluate_lm(engine, self.val, lm_forward_step,
                           ev.eval_batch_size or self.plan.micro_batch_size, ev.max_eval_samples)


def prepare_sft(cfg, world_size: int) -> Prepared:
    """All checks that need no process group; raises TrainConfigError."""
    glm, layout, plan = model_layout_plan(cfg, world_size)
    t = cfg.training
    # max_seq_length positions after the shift: rows keep one token more.
    train, val = tokenized_splits(cfg.data, "sft", t.max_seq_length + 1, glm.vocab_size, t.seed)
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
    engine = Engine(chunks, tconfig, t, prep.total_steps,
                    adapter_base=adapter_base(cfg.model, prep.glm))
    mult = pad_multiple(ctx.layout)
    make = partial(SFTBatcher, max_seq_length=t.max_seq_length, pad_id=model_pad_id(prep.glm),
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
    result = run_loop(cfg, engine, task, schedule_from_config(cfg, prep.total_steps),
                      prep.glm.to_hf_dict(), is_main,
                      resume_from=prep.resume_from)
    if is_main:
        out = os.path.abspath(cfg.checkpoint.output_dir)
        log(f"sft {result.reason} at step {result.state.step}; checkpoints in {out}"
            + (f" (best: {result.state.best_checkpoint})" if result.state.best_checkpoint else ""))
        tb = cfg.logging.tensorboard_dir or os.path.join(out, "tensorboard")
        log(f"tensorboard --logdir {os.path.abspath(tb)}")
    return result, engine, ctx
