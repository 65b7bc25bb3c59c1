"""The training loop shared by the trainers: steps, evaluation, checkpoints, preemption, logs.

A trainer supplies a :class:`TrainTask` (how to build a step's micro-batches, the forward step,
how to evaluate); the loop owns everything else. It reads top to bottom::

    resume -> [eval at start] -> for each step: batch, train step, log, eval, save, preempt?
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field

import torch.distributed as dist

from . import checkpointing as ckpt
from .config import greater_is_better, save_interval
from .engine import Engine, sum_reports
from .metrics import RunLogger, format_eval, format_step
from .signals import PreemptionFlag


@dataclass
class TrainerState:
    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    consumed_samples: int = 0
    best_metric: float | None = None
    best_checkpoint: str | None = None
    last_eval: dict = field(default_factory=dict)
    last_eval_step: int | None = None


@dataclass
class StepBatch:
    microbatches: list
    real_tokens: int  # non-padding positions in the whole global batch
    total_tokens: int  # computed positions in the whole global batch


class TrainTask:
    """What a trainer plugs into the loop."""

    loss_key = "lm loss"
    steps_per_epoch: int
    global_batch_size: int

    def step_batch(self, epoch: int, step_in_epoch: int) -> StepBatch:
        raise NotImplementedError

    def forward_step(self, model, batch):
        raise NotImplementedError

    def evaluate(self, engine: Engine) -> dict:
        return {}

    def after_save(self, engine: Engine, path: str) -> None:
        """Collective, after each checkpoint is complete: extra files next to it (the reward
        model's normalisation statistics)."""


@dataclass
class LoopResult:
    state: TrainerState
    reason: str  # "finished" | "preempted"
    last_checkpoint: str | None
    history: list  # (step, train loss) on every rank
    eval_history: list  # (step, metrics)


def _better(value: float, best: float | None, higher: bool) -> bool:
    return best is None or (value > best if higher else value < best)


def run_loop(cfg, engine: Engine, task: TrainTask, total_steps: int, model_config: dict,
             is_main: bool, resume_from: str | None = None) -> LoopResult:
    out_dir = cfg.checkpoint.output_dir
    state = TrainerState()
    if resume_from:
        saved = ckpt.load_checkpoint(engine, resume_from)
        state = TrainerState(**{k: saved[k] for k in asdict(state) if k in saved})
    tb_dir = cfg.logging.tensorboard_dir or os.path.join(out_dir, "tensorboard")
    logger = RunLogger(is_main, tb_dir, total_steps, state.step, cfg.logging.progress_bar)
    if resume_from:
        logger.line(f"resumed from {resume_from} at step {state.step} (epoch {state.epoch}, "
                    f"step {state.step_in_epoch} of the epoch)")
    if is_main:
        os.makedirs(out_dir, exist_ok=True)
    preempt = PreemptionFlag().install()
    higher = greater_is_better(cfg)
    ev, cp = cfg.evaluation, cfg.checkpoint
    interval = save_interval(cfg)
    history, eval_history = [], []
    last_ckpt = None

    def evaluate():
        metrics = task.evaluate(engine)
        if not metrics:
            return
        state.last_eval, state.last_eval_step = metrics, state.step
        eval_history.append((state.step, metrics))
        logger.scalars(state.step, {k.removeprefix("eval_"): v for k, v in metrics.items()}, "eval")
        logger.line(format_eval(state.step, metrics))

    def save():
        nonlocal last_ckpt
        metric = state.last_eval.get(ev.metric_for_best_model)
        path = os.path.join(out_dir, ckpt.iter_name(state.step))
        if metric is not None and state.last_eval_step == state.step and _better(
                metric, state.best_metric, higher):
            state.best_metric, state.best_checkpoint = metric, path
        trainer_state = dict(asdict(state), config=cfg.to_dict(), model_config=model_config)
        last_ckpt = ckpt.save_checkpoint(engine, out_dir, state.step, trainer_state, model_config)
        task.after_save(engine, last_ckpt)
        if is_main:
            if state.best_checkpoint:
                ckpt.write_marker(out_dir, "best", os.path.basename(state.best_checkpoint))
            for gone in ckpt.prune_checkpoints(out_dir, cp.save_total_limit, {state.best_checkpoint}):
                logger.line(f"removed old checkpoint {gone}")
        logger.line(f"saved checkpoint {last_ckpt}")
        dist.barrier()

    if ev.eval_at_start and ev.eval_strategy != "no" and state.step == 0:
        evaluate()
    reason = "finished"
    window_tokens, window_time = 0, 0.0
    try:
        while state.step < total_steps:
            batch = task.step_batch(state.epoch, state.step_in_epoch)
            start = time.perf_counter()
            out = engine.train_step(batch.microbatches, task.forward_step)
            elapsed = time.perf_counter() - start
            loss_sum, count = sum_reports(out["reports"], task.loss_key).tolist()
            loss = loss_sum / max(count, 1.0)
            state.step += 1
            state.step_in_epoch += 1
            state.consumed_samples += task.global_batch_size
            epoch_end = state.step_in_epoch == task.steps_per_epoch
            if epoch_end:
                state.epoch += 1
                state.step_in_epoch = 0
            history.append((state.step, loss))
            if is_main:
                # Appended across resumes: a step logged twice (killed after logging, before
                # the next checkpoint) appears twice; the last entry is the one that counts.
                with open(os.path.join(out_dir, "train_log.jsonl"), "a", encoding="utf-8") as fh:
                    fh.write(json.dumps({"step": state.step, "loss": loss, "lr": out["lr"],
                                         "grad_norm": out["grad_norm"]}) + "\n")
            window_tokens += batch.real_tokens
            window_time += elapsed
            metrics = {
                "loss": loss, "learning_rate": out["lr"], "grad_norm": out["grad_norm"],
                "tokens_per_sec": batch.real_tokens / max(elapsed, 1e-9),
                "real_token_fraction": batch.real_tokens / max(batch.total_tokens, 1),
                "epoch": state.epoch + state.step_in_epoch / task.steps_per_epoch,
            }
            logger.scalars(state.step, metrics, "train")
            logger.progress(state.step, {"loss": loss, "lr": out["lr"]})
            if state.step % cfg.logging.log_interval == 0 or state.step == total_steps:
                metrics["tokens_per_sec"] = window_tokens / max(window_time, 1e-9)
                logger.line(format_step(state.step, total_steps, metrics["epoch"], metrics))
                window_tokens, window_time = 0, 0.0

            last = state.step == total_steps
            if ev.eval_strategy != "no" and (
                    (ev.eval_strategy == "steps" and state.step % ev.eval_steps == 0)
                    or (ev.eval_strategy == "epoch" and epoch_end) or last):
                evaluate()
            preempted = preempt.agreed()
            if cp.save_strategy != "no" and (
                    (cp.save_strategy == "steps" and state.step % interval == 0)
                    or (cp.save_strategy == "epoch" and epoch_end)):
                save()
            elif preempted or (last and cp.save_final):
                save()
            if preempted:
                reason = "preempted"
                logger.line(f"signal {preempt.received or 'on another rank'}: checkpoint saved "
                            f"at step {state.step}, exiting")
                break
    finally:
        preempt.uninstall()
        logger.close()
    return LoopResult(state, reason, last_ckpt, history, eval_history)
