"""The DPO losses, TRL's metrics, and the policy's forward step (Megatron's loss contract).

Per pair, with ``pi`` the policy's and ``ref`` the reference's log-probs of a whole response
(summed over its response tokens, the chat template's loss mask) and
``h = (pi_c - ref_c) - (pi_r - ref_r)``:

* ``sigmoid`` (DPO):            ``-log sigmoid(beta h)``
* ``conservative`` (cDPO):      ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``, a
  preference label flipped with probability ``eps = label_smoothing``
* ``ipo``:                      ``(h_avg - 1 / (2 beta))^2`` with ``h_avg`` made of per-token
  *averages*, ``(pi_c - ref_c) / n_c - (pi_r - ref_r) / n_r`` (``n``: response tokens)

These are TRL's formulas: sigmoid and ipo as ``DPOTrainer._compute_loss`` (TRL 1.16,
trl/trainer/dpo_trainer.py; its IPO normalises by the completion length, which the IPO authors
confirmed to TRL), conservative as TRL's sigmoid loss with ``label_smoothing`` before 1.0 (1.16
keeps the same expression for ``aot``). The metrics are TRL's too, from the summed log-probs:
``rewards/chosen = beta (pi_c - ref_c)``, ``rewards/rejected``, ``rewards/accuracies``
(chosen reward > rejected reward), ``rewards/margins`` (their difference), ``logps/chosen``,
``logps/rejected``, each a mean over pairs.

The loss function returns the loss summed over the micro-batch's pairs with the pair count
(the engine's ``calculate_per_token_loss``: Megatron divides by the global count), so the
gradient is that of the mean over every pair of the global batch, whatever the layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from ...engine.token_logprobs import run_hidden, token_stats

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected")
# What a micro-batch reports (sums over its pairs), summed over micro-batches and ranks by
# engine.sum_reports: the loss, the six metrics, the pair count.
REPORT_KEYS = ("loss", *METRICS, "pairs")


@dataclass(frozen=True)
class DPOLoss:
    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[rows, T] per-token log-probs -> [rows] sums over the masked (response) tokens."""
    return (token_logps.float() * mask.float()).sum(-1)


def preference_losses(policy: torch.Tensor, reference: torch.Tensor, tokens: torch.Tensor,
                      hp: DPOLoss) -> torch.Tensor:
    """Per-pair losses of B pairs: ``policy``, ``reference`` and ``tokens`` (response lengths)
    are [2B], the B chosen responses first."""
    n = policy.shape[0] // 2
    ratios = policy - reference
    chosen, rejected = ratios[:n], ratios[n:]
    if hp.loss_type == "ipo":
        count = tokens.float().clamp(min=1.0)
        h = chosen / count[:n] - rejected / count[n:]
        return (h - 1.0 / (2.0 * hp.beta)) ** 2
    logits = hp.beta * (chosen - rejected)
    if hp.loss_type == "sigmoid":
        return -F.logsigmoid(logits)
    if hp.loss_type == "conservative":
        eps = hp.label_smoothing
        return -(1.0 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
    raise ValueError(f"unknown DPO loss_type {hp.loss_type!r}")


def pair_report(policy: torch.Tensor, reference: torch.Tensor, losses: torch.Tensor,
                weight: torch.Tensor, beta: float) -> torch.Tensor:
    """The REPORT_KEYS sums over the pairs (``weight`` 0: filler pairs that count for nothing)."""
    n = policy.shape[0] // 2
    rewards = beta * (policy - reference).detach()
    chosen, rejected = rewards[:n], rewards[n:]
    terms = torch.stack([losses.detach(), chosen, rejected, (chosen > rejected).float(),
                         chosen - rejected, policy[:n].detach(), policy[n:].detach()], dim=1)
    w = weight.float()
    return torch.cat([(terms * w[:, None]).sum(0), w.sum().reshape(1)])


def report_means(sums, prefix: str = "") -> dict:
    """REPORT_KEYS sums -> means per pair: {'loss', 'rewards/chosen', ...} (``prefix`` eval_)."""
    values = [float(v) for v in sums]
    pairs = max(values[-1], 1.0)
    return {f"{prefix}{k}": v / pairs for k, v in zip(REPORT_KEYS[:-1], values[:-1])}


def _dpo_loss(model, batch: dict, hp: DPOLoss, hidden_size: int, output):
    res, _ = token_stats(model, output, batch, 1.0, hidden_size, entropy=False)
    policy = sequence_logps(res.logprobs, batch["mask"])
    losses = preference_losses(policy, batch["ref_logps"], batch["mask"].sum(-1), hp)
    weight = batch["weight"].float()
    total = (losses * weight).sum()
    count = weight.sum()
    report = pair_report(policy, batch["ref_logps"], losses, weight, hp.beta)
    return total, count.to(torch.int), {"dpo loss": torch.stack([total.detach(), count]),
                                        "dpo": report}


def dpo_loss_step(hp: DPOLoss, hidden_size: int):
    """The policy's training forward step: hidden states -> fused log-probs -> the DPO loss."""

    def forward_step(model, batch):
        return run_hidden(model, batch), partial(_dpo_loss, model, batch, hp, hidden_size)

    return forward_step
