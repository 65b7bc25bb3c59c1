"""DPO / IPO / conservative DPO on the shared engine and loop: offline preference optimisation
against a frozen reference, no reward model and no rollouts.

``run_dpo(cfg)`` follows ``run_rm``: every check that needs no process group first (config,
data, batch arithmetic, layout, the reference checkpoint's architecture), then the parallel
setup, the policy (``model.load_checkpoint`` / ``model.hf_checkpoint``, LoRA with
``model.use_peft``), the reference (:mod:`.reference`), the engine and the loop.

Each step: the step's global batch of pairs (the engine's deterministic plan: resume replays
it), the reference's summed response log-probs of every micro-batch (one forward-only pass over
the step's micro-batches, or a lookup when precomputed), then one optimizer step over the
micro-batches with the DPO loss computed on the last pipeline stage inside Megatron's schedule
(the reference numbers ride in each micro-batch dict). Log-probs never come from full logits:
hidden states go through the fused vocab-parallel kernel on this rank's LM-head shard.

Logged per step (TensorBoard ``train/NAME``, ``train_log.jsonl``) and per evaluation (``eval_``
prefixed, TensorBoard ``eval/NAME``), under TRL's names: ``loss``, ``rewards/chosen``,
``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``,
``logps/rejected``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from ...engine.batching import BatchPlan, model_pad_id, pad_multiple, tokenized_splits
from ...engine.config import TrainConfigError
from ...engine.engine import Engine, sum_reports
from ...engine.eval_batches import dealt_batches
from ...engine.frozen import ModelSource, resolve_source
from ...engine.loop import BatchedTask, StepResult, run_loop, schedule_from_config
from ...engine.model_setup import adapter_base, build_trained_model
from ...engine.prepare import Prepared, finish_prepare, model_layout_plan
from ...models.config import model_shape
from ...parallel import read_launch_env
from .config import DPOConfig
from .data import DPOBatcher
from .loss import REPORT_KEYS, DPOLoss, dpo_loss_step, pair_report, preference_losses, report_means
from .reference import PrecomputedReference, live_reference, precompute, response_logps


def loss_params(cfg: DPOConfig) -> DPOLoss:
    t = cfg.training
    return DPOLoss(t.loss_type, t.beta, t.label_smoothing)


def evaluate_pairs(chunks, reference, batcher: DPOBatcher, batch_size: int, n: int,
                   hp: DPOLoss, hidden_size: int) -> dict:
    """``eval_``-prefixed means over the first ``n`` validation pairs, the same on every rank."""
    total = torch.zeros(len(REPORT_KEYS), dtype=torch.float64)
    for rows, filler, length in dealt_batches(batcher, batch_size, n):
        mb = batcher.microbatch(rows, length, mask_rows=filler)
        reference.attach([mb], "validation")
        policy = response_logps(chunks, [mb], hidden_size)
        losses = preference_losses(policy, mb["ref_logps"], mb["mask"].sum(-1), hp)
        total += pair_report(policy, mb["ref_logps"], losses, mb["weight"], hp.beta).double().cpu()
    # Every rank of a data-parallel replica holds the same numbers (the scores are broadcast
    # over the pipeline and identical over TP): summing over the data-parallel group counts
    # each pair once.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    total = total.to(device)
    dist.all_reduce(total, group=ps.get_data_parallel_group())
    return dict(report_means(total.cpu(), "eval_"), eval_samples=float(n))


class DPOTask(BatchedTask):
    loss_key = "dpo loss"
    sequences_per_row = 2  # a micro-batch of B pairs is one [2B, T] forward pass

    def __init__(self, cfg: DPOConfig, train: DPOBatcher, val: DPOBatcher | None, plan: BatchPlan,
                 dp_rank: int, reference, hidden_size: int):
        super().__init__(train, plan, dp_rank, cfg.training.seed, cfg.data.shuffle)
        self.cfg, self.val, self.reference, self.hidden_size = cfg, val, reference, hidden_size
        self.hp = loss_params(cfg)
        self.loss_step = dpo_loss_step(self.hp, hidden_size)
        self.reference_time = 0.0

    def forward_step(self, model, batch):
        return self.loss_step(model, batch)

    def step_batch(self, epoch: int, step_in_epoch: int):
        batch = super().step_batch(epoch, step_in_epoch)
        start = time.perf_counter()
        self.reference.attach(batch.microbatches, "train")
        self.reference_time = time.perf_counter() - start
        return batch

    def step_metrics(self, reports: list) -> dict:
        means = report_means(sum_reports(reports, "dpo", width=len(REPORT_KEYS)))
        means.pop("loss")  # the loop's own "loss" is the same number
        return dict(means, reference_time=self.reference_time)

    def step_line(self, step: int, total: int, epoch: float, result: StepResult) -> str:
        m = result.scalars
        return (super().step_line(step, total, epoch, result)
                + f" | rewards/accuracies {m['rewards/accuracies']:.3f} | rewards/margins "
                  f"{m['rewards/margins']:+.4f} | reference {m['reference_time']:.2f}s")

    def eval_batch_size(self) -> int:
        return self.cfg.evaluation.eval_batch_size or self.plan.micro_batch_size

    def eval_count(self) -> int:
        limit = self.cfg.evaluation.max_eval_samples
        return len(self.val) if limit is None else min(len(self.val), limit)

    def evaluate(self, engine, step: int) -> dict:
        if self.val is None:
            return {}
        return evaluate_pairs(engine.modules, self.reference, self.val, self.eval_batch_size(),
                              self.eval_count(), self.hp, self.hidden_size)


@dataclass
class DPOPrepared(Prepared):
    reference_source: ModelSource | None = None


def prepare_dpo(cfg: DPOConfig, world_size: int) -> DPOPrepared:
    """All checks that need no process group; raises TrainConfigError."""
    glm, layout, plan = model_layout_plan(cfg, world_size)
    t = cfg.training
    source = None
    if t.reference_model:
        source = resolve_source(t.reference_model, "training.reference_model")
        if source.glm.to_hf_dict() != glm.to_hf_dict():
            raise TrainConfigError(
                f"training.reference_model: {source.weights} has another architecture than the "
                "policy (DPO compares both models' log-probs of the same tokens, on one layout)")
    train, val = tokenized_splits(cfg.data, "preference", t.max_seq_length, glm.vocab_size, t.seed)
    prep = finish_prepare(cfg, glm, layout, plan, train, val, len(train), "preference pairs")
    return DPOPrepared(**vars(prep), reference_source=source)


def build_reference(cfg: DPOConfig, prep: DPOPrepared, chunks, layout, task_batchers, log):
    """The live reference, or its precomputed table of every pair (then no model is kept)."""
    live = live_reference(cfg, prep.glm, prep.reference_source, chunks, layout)
    if not cfg.training.precompute_ref_log_probs:
        return live
    start = time.perf_counter()
    batch = cfg.evaluation.eval_batch_size or prep.plan.micro_batch_size
    tables = {}
    for split, (batcher, n) in task_batchers.items():
        tables[split] = precompute(live, batcher, batch, n)
    pairs = sum(len(v) for v in tables.values())
    log(f"dpo: reference log-probs of {pairs} pairs precomputed with {live.description} in "
        f"{time.perf_counter() - start:.1f}s")
    return PrecomputedReference(tables, f"precomputed ({pairs} pairs) with {live.description}")


def run_dpo(cfg: DPOConfig, *, log=print):
    """Train; returns (loop result, engine, parallel context) on every rank."""
    from ...parallel import initialize_parallel

    env = read_launch_env()
    prep = prepare_dpo(cfg, env.world_size)
    ctx = initialize_parallel(prep.layout, model_shape(prep.glm), seed=cfg.training.seed, env=env)
    t = cfg.training
    chunks, tconfig, source = build_trained_model(prep.glm, cfg.model, t, ctx.layout)
    mult, pad = pad_multiple(ctx.layout), model_pad_id(prep.glm)
    train_b = DPOBatcher(prep.train, pad, mult, ctx.device)
    val_b = DPOBatcher(prep.val, pad, mult, ctx.device) if prep.val is not None else None
    splits = {"train": (train_b, len(train_b))}
    if val_b is not None:
        limit = cfg.evaluation.max_eval_samples
        splits["validation"] = (val_b, len(val_b) if limit is None else min(len(val_b), limit))
    say = log if ctx.is_main else (lambda *a: None)
    # Before the engine exists and before the loop loads a resumed checkpoint: the chunks hold
    # the starting weights, which is what the default reference is.
    reference = build_reference(cfg, prep, chunks, ctx.layout, splits, say)
    engine = Engine(chunks, tconfig, t, prep.total_steps,
                    adapter_base=adapter_base(cfg.model, prep.glm))
    task = DPOTask(cfg, train_b, val_b, prep.plan, ps.get_data_parallel_rank(), reference,
                   prep.glm.hidden_size)
    p = prep.plan
    say(f"dpo: {ctx.layout.describe()} on {ctx.world_size} ranks (DP={p.data_parallel_size}); "
        f"loss {t.loss_type} (beta {t.beta}"
        + (f", label_smoothing {t.label_smoothing}" if t.loss_type == "conservative" else "")
        + f"); global batch {p.global_batch_size} pairs = {p.micro_batch_size} x "
        f"{p.gradient_accumulation_steps} accumulation x {p.data_parallel_size} DP; "
        f"{task.steps_per_epoch} steps/epoch, {prep.total_steps} steps; weights: {source}; "
        f"reference: {reference.description}")
    result = run_loop(cfg, engine, task, schedule_from_config(cfg, prep.total_steps),
                      prep.glm.to_hf_dict(), ctx.is_main, resume_from=prep.resume_from)
    out = os.path.abspath(cfg.checkpoint.output_dir)
    say(f"dpo {result.reason} at step {result.state.step}; checkpoints in {out}"
        + (f" (best: {result.state.best_checkpoint})" if result.state.best_checkpoint else ""))
    return result, engine, ctx
