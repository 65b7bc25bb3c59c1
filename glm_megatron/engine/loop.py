"""The one training loop: steps, evaluation, checkpoints, preemption, logs — for every trainer.

An algorithm hands the loop a :class:`TrainTask` (what one step does, how to evaluate, its own
state to checkpoint, extra engines to save beside the main one) and a :class:`LoopSchedule`
(when to log, evaluate and save); the loop owns everything else. It reads top to bottom::

    resume -> [eval at start] -> for each step: task step, log, eval, save, preempt?

:class:`BatchedTask` is the task of the trainers that read tokenized rows (SFT, reward model):
one optimizer step over the micro-batches of a deterministic global batch.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field

import torch.distributed as dist

from . import checkpointing as ckpt
from . import run_dir
from .batching import BatchPlan, StepPlanner
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
class LoopSchedule:
    """When the loop logs, evaluates and saves; built from a config by the algorithm."""

    total_steps: int
    output_dir: str
    tensorboard_dir: str
    log_file: str = "train_log.jsonl"  # one JSON row per step in output_dir
    log_interval: int = 10
    progress_bar: bool = True
    eval_enabled: bool = True
    eval_every: int | None = None  # steps
    eval_on_epoch_end: bool = False
    eval_at_start: bool = False
    save_every: int | None = None  # steps
    save_on_epoch_end: bool = False
    save_final: bool = True
    save_total_limit: int | None = None
    metric_for_best: str | None = None  # None: no best checkpoint
    greater_is_better: bool = False


def schedule_from_config(cfg, total_steps: int) -> LoopSchedule:
    """The schedule of a config with the seed's ``checkpoint:`` / ``evaluation:`` / ``logging:``."""
    ev, cp, lg = cfg.evaluation, cfg.checkpoint, cfg.logging
    return LoopSchedule(
        total_steps=total_steps, output_dir=cp.output_dir,
        tensorboard_dir=lg.tensorboard_dir or os.path.join(cp.output_dir, "tensorboard"),
        log_interval=lg.log_interval, progress_bar=lg.progress_bar,
        eval_enabled=ev.eval_strategy != "no",
        eval_every=ev.eval_steps if ev.eval_strategy == "steps" else None,
        eval_on_epoch_end=ev.eval_strategy == "epoch", eval_at_start=ev.eval_at_start,
        save_every=save_interval(cfg) if cp.save_strategy == "steps" else None,
        save_on_epoch_end=cp.save_strategy == "epoch", save_final=cp.save_final,
        save_total_limit=cp.save_total_limit, metric_for_best=ev.metric_for_best_model,
        greater_is_better=greater_is_better(cfg))


@dataclass
class StepResult:
    """What one step of a task reports to the loop."""

    history: object  # kept in LoopResult.history as (step, history)
    scalars: dict  # TensorBoard train/*
    log_row: dict  # the step's JSON row (the loop adds "step" first)
    progress: dict  # the progress bar's postfix
    notes: list = field(default_factory=list)  # lines logged right away (skipped steps, ...)


class TrainTask:
    """What an algorithm plugs into the loop."""

    steps_per_epoch: int
    global_batch_size: int  # samples per step, counted in TrainerState.consumed_samples
    extra_engines: dict | None = None  # saved and resumed beside the main engine (a value model)

    def on_start(self, logger: RunLogger) -> None:
        """Called once the run's logger exists, before the first evaluation."""

    def run_step(self, engine: Engine, state: TrainerState) -> StepResult:
        raise NotImplementedError

    def step_line(self, step: int, total: int, epoch: float, result: StepResult) -> str:
        """The line logged every ``log_interval`` steps."""
        raise NotImplementedError

    def evaluate(self, engine: Engine, step: int) -> dict:
        return {}

    def eval_line(self, step: int, metrics: dict) -> str:
        return format_eval(step, metrics)

    def after_save(self, engine: Engine, path: str) -> None:
        """Collective, after each checkpoint is complete: extra files next to it (the reward
        model's normalisation statistics)."""

    def state_dict(self) -> dict:
        """The algorithm's own state saved in ``trainer_state.json`` (e.g. a KL controller)."""
        return {}

    def load_state_dict(self, saved: dict) -> None:
        """Restore :meth:`state_dict`'s keys from a resumed checkpoint's trainer state."""


@dataclass
class StepBatch:
    microbatches: list
    real_tokens: int  # non-padding positions in the whole global batch
    total_tokens: int  # computed positions in the whole global batch


class BatchedTask(TrainTask):
    """One optimizer step over a deterministic global batch of tokenized rows.

    A subclass sets ``train`` (a batcher: ``len``, ``step_length``, ``microbatch``,
    ``real_tokens``), ``loss_key`` and ``sequences_per_row`` (2 for preference pairs) and
    implements :meth:`forward_step`."""

    loss_key = "lm loss"
    sequences_per_row = 1

    def __init__(self, train, plan: BatchPlan, dp_rank: int, seed: int, shuffle: bool):
        self.train, self.plan, self.dp_rank = train, plan, dp_rank
        self.planner = StepPlanner(len(train), plan, seed, shuffle, "data.train_data_path")
        self.steps_per_epoch = self.planner.steps_per_epoch
        self.global_batch_size = plan.global_batch_size
        self.window_tokens, self.window_time = 0, 0.0  # tokens/s over the log interval

    def forward_step(self, model, batch):
        raise NotImplementedError

    def step_batch(self, epoch: int, step_in_epoch: int) -> StepBatch:
        rows = self.planner.global_batch(epoch, step_in_epoch)  # [GA, DP, MBS]
        length = self.train.step_length(rows.reshape(-1))
        mbs = [self.train.microbatch(rows[i, self.dp_rank], length) for i in range(rows.shape[0])]
        return StepBatch(mbs, self.train.real_tokens(rows.reshape(-1)),
                         self.sequences_per_row * rows.size * length)

    def run_step(self, engine: Engine, state: TrainerState) -> StepResult:
        batch = self.step_batch(state.epoch, state.step_in_epoch)
        start = time.perf_counter()
        out = engine.train_step(batch.microbatches, self.forward_step)
        elapsed = time.perf_counter() - start
        loss_sum, count = sum_reports(out["reports"], self.loss_key).tolist()
        loss = loss_sum / max(count, 1.0)
        self.window_tokens += batch.real_tokens
        self.window_time += elapsed
        scalars = {
            "loss": loss, "learning_rate": out["lr"], "grad_norm": out["grad_norm"],
            "tokens_per_sec": batch.real_tokens / max(elapsed, 1e-9),
            "real_token_fraction": batch.real_tokens / max(batch.total_tokens, 1),
        }
        extra = self.step_metrics(out["reports"])
        scalars.update(extra)
        return StepResult(loss, scalars, {"loss": loss, "lr": out["lr"], "grad_norm": out["grad_norm"],
                                          **extra}, {"loss": loss, "lr": out["lr"]})

    def step_metrics(self, reports: list) -> dict:
        """The step's metrics beside the loss, from the loss reports (DPO's rewards/*): logged to
        TensorBoard (train/NAME) and the step's JSON row. Collective (sum_reports)."""
        return {}

    def step_line(self, step: int, total: int, epoch: float, result: StepResult) -> str:
        metrics = dict(result.scalars, tokens_per_sec=self.window_tokens / max(self.window_time, 1e-9))
        self.window_tokens, self.window_time = 0, 0.0
        return format_step(step, total, epoch, metrics)


@dataclass
class LoopResult:
    state: TrainerState
    reason: str  # "finished" | "preempted"
    last_checkpoint: str | None
    history: list  # (step, what the task's step reported) on every rank
    eval_history: list  # (step, metrics)


def _better(value: float, best: float | None, higher: bool) -> bool:
    return best is None or (value > best if higher else value < best)


def run_loop(cfg, engine: Engine, task: TrainTask, schedule: LoopSchedule, model_config: dict,
             is_main: bool, resume_from: str | None = None) -> LoopResult:
    s, out_dir = schedule, schedule.output_dir
    state = TrainerState()
    if resume_from:
        saved = ckpt.load_checkpoint(engine, resume_from, extra_engines=task.extra_engines)
        state = TrainerState(**{k: saved[k] for k in asdict(state) if k in saved})
        task.load_state_dict(saved)
    logger = RunLogger(is_main, s.tensorboard_dir, s.total_steps, state.step, s.progress_bar)
    if resume_from:
        logger.line(f"resumed from {resume_from} at step {state.step} (epoch {state.epoch}, "
                    f"step {state.step_in_epoch} of the epoch)")
    if is_main:
        os.makedirs(out_dir, exist_ok=True)
        # Rows after the start step (logged by a run killed before its next checkpoint, or by
        # an earlier run in this directory) would otherwise appear twice.
        for file, dropped in run_dir.cut_step_logs(out_dir, state.step).items():
            logger.line(f"{os.path.basename(file)}: dropped {dropped} row(s) after step {state.step}")
    task.on_start(logger)
    preempt = PreemptionFlag().install()
    history, eval_history = [], []
    last_ckpt = None

    def evaluate():
        metrics = task.evaluate(engine, state.step)
        if not metrics:
            return
        state.last_eval, state.last_eval_step = metrics, state.step
        eval_history.append((state.step, metrics))
        logger.scalars(state.step, {k.removeprefix("eval_"): v for k, v in metrics.items()}, "eval")
        logger.line(task.eval_line(state.step, metrics))

    def save():
        nonlocal last_ckpt
        metric = state.last_eval.get(s.metric_for_best) if s.metric_for_best else None
        path = os.path.join(out_dir, ckpt.iter_name(state.step))
        if metric is not None and state.last_eval_step == state.step and _better(
                metric, state.best_metric, s.greater_is_better):
            state.best_metric, state.best_checkpoint = metric, path
        trainer_state = dict(asdict(state), **task.state_dict(), config=cfg.to_dict(),
                             model_config=model_config)
        last_ckpt = ckpt.save_checkpoint(engine, out_dir, state.step, trainer_state, model_config,
                                         extra_engines=task.extra_engines)
        task.after_save(engine, last_ckpt)
        if is_main:
            if state.best_checkpoint:
                ckpt.write_marker(out_dir, "best", os.path.basename(state.best_checkpoint))
            for gone in ckpt.prune_checkpoints(out_dir, s.save_total_limit, {state.best_checkpoint}):
                logger.line(f"removed old checkpoint {gone}")
        logger.line(f"saved checkpoint {last_ckpt}")
        dist.barrier()

    if s.eval_at_start and s.eval_enabled and state.step == 0:
        evaluate()
    reason = "finished"
    try:
        while state.step < s.total_steps:
            result = task.run_step(engine, state)
            state.step += 1
            state.step_in_epoch += 1
            state.consumed_samples += task.global_batch_size
            epoch_end = state.step_in_epoch == task.steps_per_epoch
            if epoch_end:
                state.epoch += 1
                state.step_in_epoch = 0
            epoch = state.epoch + state.step_in_epoch / task.steps_per_epoch
            history.append((state.step, result.history))
            if is_main:
                # Appended across resumes; rows after the resumed step were cut at the start.
                with open(os.path.join(out_dir, s.log_file), "a", encoding="utf-8") as fh:
                    fh.write(json.dumps({"step": state.step, **result.log_row}) + "\n")
            logger.scalars(state.step, dict(result.scalars, epoch=epoch), "train")
            logger.progress(state.step, result.progress)
            for note in result.notes:
                logger.line(f"step {state.step}: {note}")
            last = state.step == s.total_steps
            if state.step % s.log_interval == 0 or last:
                logger.line(task.step_line(state.step, s.total_steps, epoch, result))

            if s.eval_enabled and ((s.eval_every and state.step % s.eval_every == 0)
                                   or (s.eval_on_epoch_end and epoch_end) or last):
                evaluate()
            preempted = preempt.agreed()
            if (s.save_every and state.step % s.save_every == 0) or (s.save_on_epoch_end and epoch_end):
                save()
            elif preempted or (last and s.save_final):
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
