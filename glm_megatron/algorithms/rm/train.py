"""Reward-model training: the GLM trunk with a scalar head, pairwise ranking loss, on the shared
engine and loop.

``run_rm(cfg)`` follows ``run_sft``: every check that needs no process group first (config, data,
batch arithmetic, layout), then the parallel setup, the model (LM weights from
``model.load_checkpoint`` / ``model.hf_checkpoint``, bottom layers / embeddings frozen as
configured, then the LM head replaced by the reward head), the engine and the loop. Each
checkpoint also gets ``reward_model.json``: the head's key and the reward normalisation
statistics (mean/std over a reference set) that PPO uses.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace

from ...engine import checkpointing as ckpt
from ...engine.batching import BatchPlan, model_pad_id, pad_multiple, tokenized_splits
from ...engine.config import TrainConfigError
from ...engine.engine import Engine
from ...engine.loop import BatchedTask, run_loop, schedule_from_config
from ...engine.model_setup import adapter_base, build_trained_model
from ...engine.preference_batches import PreferenceBatcher
from ...engine.prepare import Prepared, finish_prepare, model_layout_plan
from ...models.checkpoint_dirs import REWARD_FILE, is_reward_checkpoint
from ...models.config import model_shape
from ...models.reward_head import HEAD_KEY, attach_reward_heads
from ...parallel import read_launch_env
from .loss import rm_forward_step
from .metrics import normalization_stats, pair_metrics, score_pairs


def write_reward_file(path: str, hidden_size: int, stats: dict, source: str, margin: float) -> None:
    with open(os.path.join(path, REWARD_FILE), "w", encoding="utf-8") as fh:
        json.dump({"kind": "reward_model", "head": HEAD_KEY, "hidden_size": hidden_size,
                   "margin": margin, "normalization": dict(stats, reference=source)}, fh, indent=1)


class RMTask(BatchedTask):
    loss_key = "rm loss"
    sequences_per_row = 2  # a micro-batch of B pairs is one [2B, T] forward pass

    def __init__(self, cfg, train: PreferenceBatcher, val: PreferenceBatcher | None,
                 plan: BatchPlan, dp_rank: int, hidden_size: int, is_main: bool):
        super().__init__(train, plan, dp_rank, cfg.training.seed, cfg.data.shuffle)
        self.cfg, self.val, self.hidden_size, self.is_main = cfg, val, hidden_size, is_main

    def forward_step(self, model, batch):
        return rm_forward_step(model, batch)

    def _eval_batch(self) -> int:
        return self.cfg.evaluation.eval_batch_size or self.plan.micro_batch_size

    def evaluate(self, engine, step: int) -> dict:
        if self.val is None:
            return {}
        rewards = score_pairs(engine, self.val, self._eval_batch(),
                              self.cfg.evaluation.max_eval_samples)
        return pair_metrics(rewards, self.cfg.training.margin)

    def after_save(self, engine, path: str) -> None:
        reference, name = ((self.val, "validation") if self.val is not None
                           else (self.train, "training"))
        rewards = score_pairs(engine, reference, self._eval_batch(),
                              self.cfg.training.reward_stats_samples)
        if self.is_main:
            write_reward_file(path, self.hidden_size, normalization_stats(rewards),
                              f"{name} data, {len(rewards)} pairs", self.cfg.training.margin)


def prepare_rm(cfg, world_size: int) -> Prepared:
    """All checks that need no process group; raises TrainConfigError."""
    glm, layout, plan = model_layout_plan(cfg, world_size)
    t = cfg.training
    if cfg.model.freeze_encoder_layers > glm.num_hidden_layers:
        raise TrainConfigError(f"model.freeze_encoder_layers: {cfg.model.freeze_encoder_layers} > "
                               f"the model's {glm.num_hidden_layers} layers")
    train, val = tokenized_splits(cfg.data, "preference", t.max_seq_length, glm.vocab_size, t.seed)
    return finish_prepare(cfg, glm, layout, plan, train, val, len(train), "preference pairs")


def build_reward_model(glm, cfg, layout):
    """LM weights loaded into the GLM model (and frozen as configured), then the reward head;
    a reward checkpoint as ``model.load_checkpoint`` loads with its head."""
    m = cfg.model
    model_dir = ckpt.resolve_model_dir(m.load_checkpoint) if m.load_checkpoint else None
    if model_dir is None or not is_reward_checkpoint(model_dir):
        chunks, tconfig, source = build_trained_model(glm, m, cfg.training, layout)
        attach_reward_heads(chunks, tconfig, seed=cfg.training.seed)
        return chunks, tconfig, source
    from ...models.checkpoint import load_model_weights

    no_weights = replace(m, load_checkpoint=None, hf_checkpoint=None)
    chunks, tconfig, _ = build_trained_model(glm, no_weights, cfg.training, layout)
    attach_reward_heads(chunks, tconfig, seed=cfg.training.seed)
    load_model_weights(chunks, model_dir)
    return chunks, tconfig, f"{model_dir} (reward model)"


def run_rm(cfg, *, log=print):
    """Train; returns (loop result, engine, parallel context) on every rank."""
    from ...parallel import initialize_parallel

    env = read_launch_env()
    prep = prepare_rm(cfg, env.world_size)
    ctx = initialize_parallel(prep.layout, model_shape(prep.glm), seed=cfg.training.seed, env=env)
    from megatron.core import parallel_state as ps

    t = cfg.training
    chunks, tconfig, source = build_reward_model(prep.glm, cfg, ctx.layout)
    engine = Engine(chunks, tconfig, t, prep.total_steps,
                    adapter_base=adapter_base(cfg.model, prep.glm))
    mult = pad_multiple(ctx.layout)

    def batcher(data):
        return PreferenceBatcher(data, model_pad_id(prep.glm), mult, t.margin, ctx.device)

    task = RMTask(cfg, batcher(prep.train), batcher(prep.val) if prep.val is not None else None,
                  prep.plan, ps.get_data_parallel_rank(), prep.glm.hidden_size, ctx.is_main)
    if ctx.is_main:
        p = prep.plan
        log(f"rm: {ctx.layout.describe()} on {ctx.world_size} ranks (DP={p.data_parallel_size}); "
            f"global batch {p.global_batch_size} pairs = {p.micro_batch_size} x "
            f"{p.gradient_accumulation_steps} accumulation x {p.data_parallel_size} DP; "
            f"{task.steps_per_epoch} steps/epoch, {prep.total_steps} steps; weights: {source}; "
            f"margin {t.margin}; frozen: embeddings={cfg.model.freeze_embeddings}, "
            f"bottom {cfg.model.freeze_encoder_layers} layers")
    result = run_loop(cfg, engine, task, schedule_from_config(cfg, prep.total_steps),
                      prep.glm.to_hf_dict(), ctx.is_main,
                      resume_from=prep.resume_from)
    if ctx.is_main:
        out = os.path.abspath(cfg.checkpoint.output_dir)
        log(f"rm {result.reason} at step {result.state.step}; checkpoints in {out}"
            + (f" (best: {result.state.best_checkpoint})" if result.state.best_checkpoint else ""))
    return result, engine, ctx
