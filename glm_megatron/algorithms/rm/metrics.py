"""Reward-model evaluation over every data-parallel rank: accuracy, margins, reward statistics.

Pairs are dealt to data-parallel ranks in global batches by
:func:`glm_megatron.engine.eval_batches.dealt_batches` (a short last batch is filled with masked
copies of pair 0). Each pair's two rewards are gathered to every rank,
so the metrics, the calibration table and the normalisation statistics are computed from the
same numbers everywhere.
"""

from __future__ import annotations

import numpy as np
import torch.distributed as dist
from megatron.core import parallel_state as ps

from ...engine.eval_batches import dealt_batches
from .calibration import calibration_table
from .loss import ranking_loss, rm_forward_step


def score_pairs(runner, batcher, batch_size: int, max_samples: int | None = None) -> np.ndarray:
    """[N, 2] (chosen, rejected) rewards of the first N pairs, on every rank."""
    n = len(batcher) if max_samples is None else min(len(batcher), max_samples)
    mine = []
    contributes = (ps.is_pipeline_last_stage(ignore_virtual=True)
                   and ps.get_tensor_model_parallel_rank() == 0
                   and ps.get_context_parallel_rank() == 0)
    for rows, filler, length in dealt_batches(batcher, batch_size, n):
        mb = batcher.microbatch(rows, length, mask_rows=filler)
        reports = runner.eval_step([mb], rm_forward_step)
        if contributes:
            keep = ~filler
            for r in reports:  # one micro-batch: one report, one row per pair
                pairs = r["rm pairs"].detach().float().cpu().numpy()
                # With the global row index: the result is in data order whatever the layout.
                mine.append((rows[keep], pairs[keep, :2]))
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    found = {}
    for part in gathered:
        for idx, pairs in part or []:
            for i, row in zip(idx, pairs):
                found[int(i)] = row
    if len(found) != n:
        raise RuntimeError(f"reward evaluation gathered {len(found)} of {n} pairs")
    return np.stack([found[i] for i in range(n)]) if n else np.zeros((0, 2))


def pair_metrics(rewards: np.ndarray, margin: float = 0.0, num_bins: int = 10) -> dict:
    """Metrics of [N, 2] (chosen, rejected) rewards; keys prefixed ``eval_`` for the loop."""
    import torch

    chosen, rejected = rewards[:, 0].astype(np.float64), rewards[:, 1].astype(np.float64)
    diff = chosen - rejected
    loss = ranking_loss(torch.as_tensor(chosen), torch.as_tensor(rejected), margin).mean()
    both = np.concatenate([chosen, rejected])
    return {
        "eval_loss": float(loss),
        "eval_accuracy": float((diff > 0).mean()),
        "eval_mean_margin": float(diff.mean()),
        "eval_reward_chosen_mean": float(chosen.mean()),
        "eval_reward_chosen_std": float(chosen.std()),
        "eval_reward_rejected_mean": float(rejected.mean()),
        "eval_reward_rejected_std": float(rejected.std()),
        "eval_reward_mean": float(both.mean()),
        "eval_reward_std": float(both.std()),
        "eval_ece": calibration_table(chosen, rejected, num_bins)["expected_calibration_error"],
        "eval_samples": float(len(diff)),
    }


def normalization_stats(rewards: np.ndarray) -> dict:
    """Mean/std of every reward (chosen and rejected) of a reference set: PPO's
    ``(r - mean) / std``."""
    both = np.concatenate([rewards[:, 0], rewards[:, 1]]).astype(np.float64)
    return {"mean": float(both.mean()), "std": float(max(both.std(), 1e-8)), "count": int(len(both))}
