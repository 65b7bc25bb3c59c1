"""One PPO step in three phases: rollout, scoring, update.

    rollout  prompts -> responses (the RolloutGenerator: in-engine KV-cache sampling)
    scoring  old log-probs + values (policy), reference log-probs, reward-model scores ->
             per-token KL, rewards, GAE advantages (whitened over data-parallel ranks) and returns
    update   ppo_epochs passes of mini-batches: clipped surrogate + clipped value loss - entropy
             bonus, one optimizer step per mini-batch; the step's remaining mini-batches are
             skipped when approx-KL runs far above target

Every rank of a data-parallel replica holds the replica's whole rollout batch (see
:func:`.forward.collect`), so the arithmetic between passes runs identically everywhere.
Randomness is seeded by (seed, step, data-parallel rank): a resumed run replays the same rollouts
and mini-batch orders.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

import glm_kernels as kernels

from ...engine.collect import collect
from ...engine.engine import Engine, sum_reports
from ...engine.frozen import Offloaded
from ...engine.token_logprobs import score_logprobs
from ...generation.sampling import SamplingParams
from ...models.lora import AdaptersOff
from ...models.policy_heads import hidden_output
from .data import Rollouts, agree_length, build_rollouts
from .forward import REPORT_KEYS, ppo_loss_step, reward_step, value_loss_step, value_step
from .loss import (
    batch_repetition,
    ended_with_stop,
    normalize_scores,
    penalize_missing_stop,
    should_stop_epoch,
    token_rewards,
)


def step_seed(seed: int, step: int, dp_rank: int, purpose: int = 0) -> int:
    """A reproducible 63-bit seed per (seed, step, data-parallel rank, purpose)."""
    return zlib.crc32(f"{seed}/{step}/{dp_rank}/{purpose}".encode()) * 2654435761 % (2**63 - 1)


@dataclass
class PPOModels:
    policy: Engine  # with a value head when value is None
    value: Engine | None  # a separate value model
    reference: list  # frozen chunks
    reward: list  # frozen chunks
    # The context the reference scores in: Offloaded (its own chunks, on the device only while
    # in use) or models.lora.AdaptersOff (a LoRA policy with its adapters skipped).
    reference_offload: Offloaded | AdaptersOff
    reward_offload: Offloaded
    hidden_size: int  # the policy's
    reference_hidden_size: int

    def memory_summary(self) -> str:
        """Parameter counts of this rank's models: what the four models cost in weights."""
        def count(chunks, trainable_only=False) -> str:
            n = sum(p.numel() for c in chunks for p in c.parameters()
                    if p.requires_grad or not trainable_only)
            return f"{n / 1e6:.2f}M"

        shared = self.reference is self.policy.modules
        parts = [f"policy {count(self.policy.modules)} "
                 f"({count(self.policy.modules, trainable_only=True)} trainable)",
                 "reference: the policy's base weights (LoRA adapters off, no second copy)"
                 if shared else f"reference {count(self.reference)}",
                 f"reward {count(self.reward)}"]
        if self.value is not None:
            parts.append(f"value {count(self.value.modules)}")
        return ", ".join(parts)


class PPOStep:
    def __init__(self, cfg, models: PPOModels, generator, reward_stats: dict, plan,
                 pad_id: int, pad_multiple: int, kl_ctl, eos_id: int | None = None):
        self.cfg, self.r, self.m = cfg, cfg.rlhf, models
        self.generator, self.reward_stats, self.plan = generator, reward_stats, plan
        self.pad_id, self.pad_multiple, self.kl_ctl = pad_id, pad_multiple, kl_ctl
        self.eos_id = eos_id
        self.dp_rank = ps.get_data_parallel_rank()
        self.dp_group = ps.get_data_parallel_group()
        r = cfg.rlhf
        self.sampling = SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k)
        self.hp = {"temperature": r.temperature, "clip_range": r.clip_range,
                   "clip_range_vf": r.clip_range_vf, "vf_coef": r.vf_coef,
                   "entropy_coef": r.entropy_coef}
        self.micro = r.rollout_micro_batch_size or plan.micro_batch_size

    # -- rollout ---------------------------------------------------------------------------

    def rollout(self, prompts: list, seed: int, sampling: SamplingParams | None = None) -> Rollouts:
        responses = self.generator.generate(prompts, max_new_tokens=self.r.max_new_tokens,
                                            sampling=sampling or self.sampling, seed=seed)
        local = max(len(p) + len(s) for p, s in zip(prompts, responses))
        length = agree_length(local, self.pad_multiple)
        return build_rollouts(prompts, responses, self.pad_id, self.pad_multiple, min_length=length)

    # -- scoring ---------------------------------------------------------------------------

    def _microbatches(self, ro: Rollouts) -> list[dict]:
        # Megatron's pipeline needs one micro-batch shape: a short last one is filled with
        # copies of row 0, whose results are dropped (see _trim).
        n = len(ro)
        rows = list(range(n)) + [0] * (-n % self.micro)
        return [ro.select(rows[i:i + self.micro]) for i in range(0, len(rows), self.micro)]

    def score(self, ro: Rollouts, stop_ids) -> dict:
        """Fill ``ro.fields`` (old_logprobs, values, advantages, returns, ...); returns the
        per-rollout raw numbers the metrics need."""
        m, r = self.m, self.r
        mbs = self._microbatches(ro)
        shared_value = m.value is None
        n = len(ro)
        pol = _trim(score_logprobs(m.policy.modules, mbs, r.temperature, m.hidden_size,
                                   values=shared_value), n)
        values = pol["values"] if shared_value else _trim(
            collect(m.value.modules, mbs, value_step, ("values",)), n)["values"]
        with m.reference_offload:
            ref = _trim(score_logprobs(m.reference, mbs, r.temperature, m.reference_hidden_size,
                                       values=False), n)
        rm_mbs = mbs
        if r.score_stops_as_eos and self.eos_id is not None:
            rm_mbs = [ending_with(b, stop_ids, self.eos_id) for b in mbs]
        with m.reward_offload:
            raw = _trim(collect(m.reward, rm_mbs, reward_step, ("scores",)), n)["scores"]
        mask = ro.mask
        kl = kernels.kl_penalty(pol["logprobs"], ref["logprobs"], self.cfg.kl_type) * mask
        scores = normalize_scores(raw, self.reward_stats["mean"], self.reward_stats["std"], r.reward_clip)
        scores = penalize_missing_stop(scores, ended_with_stop(ro.responses, stop_ids),
                                       r.missing_eos_penalty)
        rewards = token_rewards(scores, kl, mask, self.kl_ctl.value)
        if r.vf_clip_range is not None:
            values = values.clamp(-r.vf_clip_range, r.vf_clip_range)
        values = values * mask
        adv, ret = kernels.compute_gae(rewards, values, mask, gamma=r.gamma, lam=r.lam,
                                       whiten=False)
        if r.whiten_advantages:
            adv = kernels.whiten_advantages(adv, mask, group=self.dp_group)
        if r.vf_clip_range is not None:
            ret = ret.clamp(-r.vf_clip_range, r.vf_clip_range)
        ro.fields.update(old_logprobs=pol["logprobs"], old_values=values, advantages=adv,
                         returns=ret * mask, ref_logprobs=ref["logprobs"], scores=scores)
        return {"raw_scores": raw, "scores": scores, "kl": kl}

    # -- update ----------------------------------------------------------------------------

    def update(self, ro: Rollouts, step: int) -> dict:
        p, r = self.plan, self.r
        totals = torch.zeros(len(REPORT_KEYS), dtype=torch.float64)
        updates = skipped = 0
        stopped_early = False
        policy_step = ppo_loss_step(self.hp, self.m.hidden_size)
        value_step_fn = value_loss_step(self.hp)
        grad_norm = lr = 0.0
        for epoch in range(r.ppo_epochs):
            gen = torch.Generator().manual_seed(step_seed(r.seed, step, self.dp_rank, 1 + epoch))
            order = torch.randperm(len(ro), generator=gen)
            for k in range(p.mini_batches_per_epoch):
                rows = order[k * p.mini_batch_per_rank:(k + 1) * p.mini_batch_per_rank]
                micro = [ro.select(rows[j * p.micro_batch_size:(j + 1) * p.micro_batch_size])
                         for j in range(p.gradient_accumulation_steps)]
                with hidden_output(self.m.policy.modules):
                    out = self.m.policy.train_step(micro, policy_step, skip_nonfinite=True)
                mb_totals = sum_reports(out["reports"], "ppo", width=len(REPORT_KEYS))
                skipped += int(out["skipped"])
                if self.m.value is not None:
                    vout = self.m.value.train_step(micro, value_step_fn, skip_nonfinite=True)
                    mb_totals += sum_reports(vout["reports"], "ppo", width=len(REPORT_KEYS))
                    skipped += int(vout["skipped"])
                totals += mb_totals
                updates += 1
                grad_norm, lr = out["grad_norm"], out["lr"]
                tokens = max(float(mb_totals[-1]), 1.0)
                approx_kl = float(mb_totals[REPORT_KEYS.index("approx_kl")]) / tokens
                if r.approx_kl_stop_factor is not None and should_stop_epoch(
                        approx_kl, r.target_kl, r.approx_kl_stop_factor):
                    stopped_early = True
                    break
            if stopped_early:
                break
        tokens = max(float(totals[-1]), 1.0)
        per_token = {k: float(totals[i]) / tokens for i, k in enumerate(REPORT_KEYS) if k != "tokens"}
        return dict(per_token, optimizer_steps=updates, skipped_steps=skipped,
                    stopped_early=float(stopped_early), grad_norm=grad_norm, learning_rate=lr)

    # -- metrics ---------------------------------------------------------------------------

    def rollout_stats(self, ro: Rollouts, scored: dict, stop_ids) -> dict:
        """Global (all data-parallel ranks) statistics of one rollout batch."""
        mask = ro.mask
        lengths = mask.sum(1)
        ended = int(ended_with_stop(ro.responses, stop_ids).sum())
        local = torch.tensor([
            float(scored["scores"].sum()), float((scored["scores"] ** 2).sum()),
            float(scored["raw_scores"].sum()), float(scored["kl"].sum()), float(mask.sum()),
            float(lengths.sum()), float(batch_repetition(ro.responses) * len(ro)), float(ended),
            float(len(ro)), float((scored["kl"].sum(1)).sum()),
        ], dtype=torch.float64)
        local = _dp_sum(local, self.dp_group)
        (s, s2, raw, kl, tokens, length, rep, ended, n, seq_kl) = local.tolist()
        mean = s / n
        return {"mean_reward": mean, "reward_std": max(s2 / n - mean * mean, 0.0) ** 0.5,
                "raw_score": raw / n, "kl_divergence": kl / max(tokens, 1.0),
                "sequence_kl": seq_kl / n, "response_length": length / n, "repetition": rep / n,
                "stop_fraction": ended / n, "kl_penalty": self.kl_ctl.value}

    def digest(self, ro: Rollouts) -> int:
        """A checksum of every rank's responses (resume replays the same rollouts)."""
        crc = zlib.crc32(repr(ro.responses).encode())
        t = _dp_sum(torch.tensor([crc], dtype=torch.float64), self.dp_group)
        return int(t.item())

    # -- the whole step --------------------------------------------------------------------

    def run(self, prompts: list, step: int, stop_ids) -> tuple[dict, Rollouts]:
        t0 = time.perf_counter()
        ro = self.rollout(prompts, step_seed(self.r.seed, step, self.dp_rank))
        t1 = time.perf_counter()
        scored = self.score(ro, stop_ids)
        t2 = time.perf_counter()
        stats = self.rollout_stats(ro, scored, stop_ids)
        trained = self.update(ro, step)
        t3 = time.perf_counter()
        generated = _dp_sum(torch.tensor([float(sum(len(s) for s in ro.responses))],
                                         dtype=torch.float64), self.dp_group).item()
        # Adaptive KL: the controller sees the per-token KL of this batch (the seed's scale).
        self.kl_ctl.update(stats["kl_divergence"], self.r.batch_size)
        metrics = dict(stats, **trained, time_rollout=t1 - t0, time_scoring=t2 - t1,
                       time_training=t3 - t2, generated_tokens_per_sec=generated / max(t1 - t0, 1e-9),
                       rollout_digest=float(self.digest(ro)))
        return metrics, ro

    # -- validation ------------------------------------------------------------------------

    def validate(self, prompts: list, seed: int, stop_ids) -> tuple[dict, Rollouts]:
        """Mean normalised reward and KL of sampled responses to held-out prompts (no update)."""
        ro = self.rollout(prompts, seed)
        scored = self.score(ro, stop_ids)
        stats = self.rollout_stats(ro, scored, stop_ids)
        return {k: stats[k] for k in ("mean_reward", "reward_std", "raw_score", "kl_divergence",
                                      "response_length", "repetition", "stop_fraction")}, ro


def ending_with(batch: dict, stop_ids, eos_id: int) -> dict:
    """The micro-batch with each sequence's final stop token replaced by ``eos_id`` (a copy)."""
    tokens = batch["tokens"].clone()
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    last = batch["last_index"].to(tokens.device)
    stops = torch.as_tensor(list(stop_ids), dtype=tokens.dtype, device=tokens.device)
    stopped = torch.isin(tokens[rows, last], stops)
    tokens[rows[stopped], last[stopped]] = eos_id
    return dict(batch, tokens=tokens)


def _trim(found: dict, n: int) -> dict:
    return {k: v[:n] for k, v in found.items()}


def _dp_sum(t: torch.Tensor, group) -> torch.Tensor:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t = t.to(device)
    dist.all_reduce(t, group=group)
    return t.cpu()

