"""PPO RLHF: ``run_ppo(cfg)`` = checks, the four models, then the step loop.

Order, like the other trainers: everything that can fail without a process group first (config,
every model's config and the layout against each, prompts, batch arithmetic, resume path), then
the parallel setup, the models, the engines and the loop::

    resume -> [validate at start] -> for each step: rollout, score, update, log, [validate],
    [save], preempt?

Checkpoints are the engine's (``iter_x/model`` = the policy, with its value head when it has
one; ``iter_x/value/`` = a separate value model) plus the KL controller and the step in
``trainer_state.json``. ``iter_x/model`` exports to HF with ``tools/convert_checkpoint.py
megatron-to-hf`` (the value head is skipped).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import partial

import torch

from ...data.chat_template import template_for_model_type
from ...engine import checkpointing as ckpt
from ...engine.batching import pad_multiple
from ...engine.config import TrainConfigError
from ...engine.engine import Engine
from ...engine.frozen import Offloaded, build_frozen, resolve_source
from ...engine.loop import LoopSchedule, StepResult, TrainTask, run_loop
from ...engine.metrics import RunLogger
from ...engine.model_setup import adapter_base, add_adapters, lora_settings
from ...generation.rollout import InEngineGenerator
from ...models.config import model_shape
from ...models.lora import AdaptersOff
from ...parallel import LayoutError, read_launch_env, validate_layout
from ...parallel.state import have_transformer_engine
from .config import PPOConfig, ppo_save_interval, resolve_ppo_batch
from .data import PromptPlanner, open_prompts, prompt_tokenizer_info
from .loss import kl_controller
from .models import build_policy, build_value_model, check_same_vocabulary, reward_normalization
from .step import PPOModels, PPOStep, step_seed

LOG_FILE = "ppo_log.jsonl"


@dataclass
class Prepared:
    sources: dict
    layout: object
    plan: object
    prompts: list
    val_prompts: list | None
    skipped: dict
    tokenizer: dict
    reward_stats: dict
    resume_from: str | None


def prepare_ppo(cfg: PPOConfig, world_size: int) -> Prepared:
    """Every check that needs no process group; raises TrainConfigError / LayoutError."""
    r, d = cfg.rlhf, cfg.data
    sources = {"policy": resolve_source(r.policy_model, "rlhf.policy_model"),
               "reward": resolve_source(r.reward_model, "rlhf.reward_model")}
    sources["reference"] = resolve_source(r.reference_model or r.policy_model,
                                          "rlhf.reference_model" if r.reference_model else
                                          "rlhf.policy_model")
    if r.value_model:
        sources["value"] = resolve_source(r.value_model, "rlhf.value_model")
    policy = sources["policy"].glm
    for name, src in sources.items():
        if name != "policy":
            check_same_vocabulary(policy, src.glm, src.key)
    if sources["reference"].glm.to_hf_dict() != policy.to_hf_dict():
        raise TrainConfigError(f"{sources['reference'].key}: the reference model's architecture "
                               "differs from the policy's (it must be the policy's initial weights)")
    reward_stats = reward_normalization(sources["reward"])
    layout = None
    for src in sources.values():
        try:
            layout = validate_layout(cfg.parallel, world_size, model_shape(src.glm),
                                     training=True, cuda=torch.cuda.is_available(),
                                     have_transformer_engine=have_transformer_engine())
        except LayoutError as err:
            raise TrainConfigError(f"parallel: {err} (for {src.key})") from None
    plan = resolve_ppo_batch(cfg, layout.data_parallel_size(world_size))
    # A raw prompt file is rendered with the policy family's chat template.
    raw = {"tokenizer_path": d.tokenizer_path, "template": template_for_model_type(policy.model_type)}
    prompts, skipped = open_prompts(d.prompt_data_path, "data.prompt_data_path", policy.vocab_size,
                                    d.max_prompt_length, **raw)
    skipped_all = {"train": skipped}
    if len(prompts) < r.batch_size:
        raise TrainConfigError(f"data.prompt_data_path: {len(prompts)} usable prompts is less than "
                               f"one PPO batch (rlhf.batch_size {r.batch_size})")
    val = None
    if d.validation_prompt_path:
        val, skipped_all["validation"] = open_prompts(
            d.validation_prompt_path, "data.validation_prompt_path", policy.vocab_size,
            d.max_prompt_length, **raw)
        dp = plan.data_parallel_size
        val = val[:min(len(val), d.max_validation_prompts) // dp * dp]
        if not val:
            raise TrainConfigError(f"data.validation_prompt_path: fewer prompts than data-parallel "
                                   f"ranks ({dp})")
    tokenizer = prompt_tokenizer_info(d.prompt_data_path, d.tokenizer_path)
    resume_from = ckpt.resolve_resume(cfg.checkpoint.resume, cfg.checkpoint.output_dir)
    return Prepared(sources, layout, plan, prompts, val, skipped_all, tokenizer, reward_stats,
                    resume_from)


def build_models(cfg: PPOConfig, prep: Prepared, layout) -> PPOModels:
    r, s = cfg.rlhf, prep.sources
    t_policy = cfg.optim()
    optimizer_steps = r.max_steps * r.ppo_epochs * prep.plan.mini_batches_per_epoch
    lora = lora_settings(r, s["policy"].glm, "rlhf")
    chunks, tconfig = build_policy(s["policy"], layout, t_policy, value_head=not r.value_model,
                                   seed=r.seed,
                                   adapters=partial(add_adapters, glm=s["policy"].glm, m=r,
                                                    lora=lora, seed=r.seed, section="rlhf")
                                   if lora else None)
    policy = Engine(chunks, tconfig, t_policy, optimizer_steps,
                    adapter_base=adapter_base(r, s["policy"].glm, s["policy"].weights, "rlhf"))
    value = None
    if r.value_model:
        t_value = cfg.optim(value=True)
        v_chunks, v_config = build_value_model(s["value"], layout, t_value, seed=r.seed)
        value = Engine(v_chunks, v_config, t_value, optimizer_steps)
    if lora:
        # The reference is the policy's base: the same chunks with the adapters skipped.
        reference, reference_switch = chunks, AdaptersOff(chunks)
    else:
        reference = build_frozen(s["reference"], layout, t_policy, reward=False)
        reference_switch = Offloaded(reference, r.offload_reference)
        reference_switch.offload()
    reward = build_frozen(s["reward"], layout, t_policy, reward=True)
    models = PPOModels(policy, value, reference, reward,
                       reference_switch, Offloaded(reward, r.offload_reward_model),
                       s["policy"].glm.hidden_size, s["reference"].glm.hidden_size)
    models.reward_offload.offload()
    return models


def _load_tokenizer(info: dict):
    path = info.get("path")
    if not path:
        return None
    from ...data.tokenizer import load_tokenizer

    try:
        return load_tokenizer(path)
    except Exception:  # sample text is a convenience; token ids are logged instead
        return None


class SampleWriter:
    """Prompt + response text of a few rollouts, appended to ``samples.jsonl`` and TensorBoard."""

    def __init__(self, out_dir: str, tokenizer, count: int, logger: RunLogger):
        self.path = os.path.join(out_dir, "samples.jsonl")
        self.tok, self.count, self.logger = tokenizer, count, logger

    def _text(self, ids):
        return self.tok.decode(list(ids)) if self.tok is not None else " ".join(map(str, ids))

    def write(self, step: int, ro, scores) -> None:
        rows = []
        for i in range(min(self.count, len(ro))):
            rows.append({"step": step, "prompt": self._text(ro.prompts[i]),
                         "response": self._text(ro.responses[i]), "reward": float(scores[i])})
        with open(self.path, "a", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
        if self.logger.writer is not None and rows:
            text = "\n\n".join(f"**prompt** {r['prompt']}  \n**response** {r['response']}  \n"
                               f"**reward** {r['reward']:.3f}" for r in rows)
            self.logger.writer.add_text("samples", text, step)


def format_ppo_step(step: int, total: int, m: dict) -> str:
    return (f"step {step}/{total} | reward {m['mean_reward']:+.3f} (std {m['reward_std']:.3f}) | "
            f"kl {m['kl_divergence']:.4f} (coef {m['kl_penalty']:.3f}) | policy {m['policy_loss']:+.4f} | "
            f"value {m['value_loss']:.4f} | entropy {m['entropy']:.3f} | approx_kl {m['approx_kl']:.4f} | "
            f"clip {m['clip_fraction']:.3f} | len {m['response_length']:.1f} | "
            f"time rollout/score/train {m['time_rollout']:.1f}/{m['time_scoring']:.1f}/"
            f"{m['time_training']:.1f}s | gen tok/s {m['generated_tokens_per_sec']:.0f}")


class PPOTask(TrainTask):
    """One PPO step for the engine's loop: rollouts of this step's prompts, scoring, updates.

    The prompts and sampling seeds of step ``k`` depend on ``k`` only, so a resumed run replays
    the rollouts an uninterrupted one would have made. Its own checkpointed state: the KL
    controller and the validation history."""

    def __init__(self, cfg: PPOConfig, prep: Prepared, stepper: PPOStep, kl_ctl, planner: PromptPlanner,
                 value_engine: Engine | None, stop_ids, dp_rank: int, is_main: bool, tokenizer):
        self.cfg, self.prep, self.stepper, self.kl_ctl = cfg, prep, stepper, kl_ctl
        self.planner, self.stop_ids, self.dp_rank, self.is_main = planner, stop_ids, dp_rank, is_main
        self.steps_per_epoch = planner.steps_per_epoch
        self.global_batch_size = cfg.rlhf.batch_size
        self.extra_engines = {"value": value_engine} if value_engine is not None else None
        self.tokenizer, self.samples, self.validation = tokenizer, None, []

    def on_start(self, logger: RunLogger) -> None:
        self.samples = SampleWriter(self.cfg.checkpoint.output_dir, self.tokenizer,
                                    self.cfg.logging.num_samples_to_log, logger)

    def run_step(self, engine, state) -> StepResult:
        prompts = [self.prep.prompts[i] for i in self.planner.rows(state.step, self.dp_rank)]
        metrics, _ = self.stepper.run(prompts, state.step, self.stop_ids)
        notes = []
        if metrics["skipped_steps"]:
            notes.append(f"{int(metrics['skipped_steps'])} optimizer step(s) skipped: non-finite "
                         "gradients")
        return StepResult(metrics, metrics, metrics,
                          {"reward": metrics["mean_reward"], "kl": metrics["kl_divergence"]}, notes)

    def step_line(self, step: int, total: int, epoch: float, result: StepResult) -> str:
        return format_ppo_step(step, total, result.scalars)

    def evaluate(self, engine, step: int) -> dict:
        val = self.prep.val_prompts
        if not val:
            return {}
        dp = self.prep.plan.data_parallel_size
        per = len(val) // dp
        mine = val[self.dp_rank * per:(self.dp_rank + 1) * per]
        seed = step_seed(self.cfg.rlhf.seed, 0, self.dp_rank, purpose=99)
        metrics, ro = self.stepper.validate(mine, seed, self.stop_ids)
        self.validation.append((step, metrics))
        if self.is_main:
            self.samples.write(step, ro, ro.fields["scores"])
        return metrics

    def eval_line(self, step: int, metrics: dict) -> str:
        return f"validation @ step {step} | " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items())

    def state_dict(self) -> dict:
        return {"kl_controller": self.kl_ctl.state_dict(), "validation": self.validation}

    def load_state_dict(self, saved: dict) -> None:
        self.kl_ctl.load_state_dict(saved["kl_controller"])
        self.validation = [tuple(v) for v in saved.get("validation", [])]


def ppo_schedule(cfg: PPOConfig) -> LoopSchedule:
    r, c, lg = cfg.rlhf, cfg.checkpoint, cfg.logging
    return LoopSchedule(
        total_steps=r.max_steps, output_dir=c.output_dir, log_file=LOG_FILE,
        tensorboard_dir=lg.tensorboard_dir or os.path.join(c.output_dir, "tensorboard"),
        log_interval=lg.log_interval, progress_bar=lg.progress_bar,
        eval_every=r.eval_steps, eval_at_start=r.eval_at_start,
        save_every=ppo_save_interval(cfg) if c.save_strategy == "steps" else None,
        save_final=c.save_final, save_total_limit=c.save_total_limit)


def run_ppo(cfg: PPOConfig, *, log=print) -> dict:
    """Train; returns {history, validation, reason, last_checkpoint, models} on every rank."""
    from megatron.core import parallel_state as ps

    from ...parallel import initialize_parallel

    env = read_launch_env()
    prep = prepare_ppo(cfg, env.world_size)
    r = cfg.rlhf
    ctx = initialize_parallel(prep.layout, model_shape(prep.sources["policy"].glm), seed=r.seed, env=env)
    models = build_models(cfg, prep, ctx.layout)
    policy_glm = prep.sources["policy"].glm
    tok = prep.tokenizer
    pad_id = tok.get("pad_id") if isinstance(tok.get("pad_id"), int) else 0
    stop_ids = tok.get("stop_ids") or policy_glm.stop_token_ids
    generator = InEngineGenerator(models.policy.modules, stop_ids, pad_id=pad_id, device=ctx.device)
    kl_ctl = kl_controller(r.kl_coef, r.target_kl, r.kl_horizon)
    stepper = PPOStep(cfg, models, generator, prep.reward_stats, prep.plan, pad_id,
                      pad_multiple(ctx.layout), kl_ctl, eos_id=tok.get("eos_id"))
    dp_rank, dp = ps.get_data_parallel_rank(), prep.plan.data_parallel_size
    planner = PromptPlanner(len(prep.prompts), prep.plan.rollouts_per_rank, dp, r.seed, cfg.data.shuffle)
    task = PPOTask(cfg, prep, stepper, kl_ctl, planner, models.value, stop_ids, dp_rank,
                   ctx.is_main, _load_tokenizer(tok) if ctx.is_main else None)
    if ctx.is_main:
        p = prep.plan
        log(f"ppo: {ctx.layout.describe()} on {ctx.world_size} ranks (DP={dp}); {r.batch_size} rollouts"
            f"/step ({p.rollouts_per_rank}/rank), mini-batch {r.mini_batch_size} = {p.micro_batch_size}"
            f" x {p.gradient_accumulation_steps} accumulation x {dp} DP, {r.ppo_epochs} epochs; "
            f"value: {'head on the policy' if r.value_model is None else r.value_model}; "
            f"{len(prep.prompts)} prompts ({prep.skipped['train']} too long, skipped)"
            + (f", {len(prep.val_prompts)} validation prompts" if prep.val_prompts else ""))
        log(f"ppo: weights on this rank: {models.memory_summary()}")
    result = run_loop(cfg, models.policy, task, ppo_schedule(cfg), policy_glm.to_hf_dict(),
                      ctx.is_main, resume_from=prep.resume_from)
    validation = task.validation
    if ctx.is_main and validation:
        first, final = validation[0], validation[-1]
        log(f"ppo {result.reason} at step {result.state.step}: validation reward "
            f"{first[1]['mean_reward']:+.3f} (step {first[0]}) -> {final[1]['mean_reward']:+.3f} "
            f"(step {final[0]}), KL to the reference {final[1]['kl_divergence']:.4f}; checkpoints in "
            f"{os.path.abspath(cfg.checkpoint.output_dir)}")
    return {"history": result.history, "validation": validation, "reason": result.reason,
            "last_checkpoint": result.last_checkpoint, "models": models}
