"""Token sampling for rollouts: temperature, top-k, top-p (nucleus), greedy.

Pure torch, no distributed code: :mod:`glm_megatron.generation.kv_cache` calls it on the full
(TP-gathered) fp32 logits of the last fed position and then shares the result across ranks.
The order of the filters is the usual one (HF transformers, vLLM): temperature first, so that
top-p sees the tempered distribution, then top-k, then top-p on what top-k kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # <= 0 or greedy=True -> argmax
    top_p: float = 1.0  # nucleus; 1.0 = off
    top_k: int = 0  # 0 = off
    greedy: bool = False

    def __post_init__(self):
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature <= 0


def filter_logits(logits: torch.Tensor, sampling: SamplingParams) -> torch.Tensor:
    """fp32 logits [b, V] after temperature, with the tokens top-k / top-p drop set to -inf.

    top-k keeps every token whose logit reaches the k-th largest (ties at the boundary are all
    kept). top-p keeps the smallest prefix of the tokens sorted by probability whose mass
    reaches ``top_p``: a token stays when the mass strictly before it is below ``top_p``, so the
    most likely token always stays.
    """
    logits = logits.float()
    if sampling.temperature > 0 and sampling.temperature != 1.0:
        logits = logits / sampling.temperature
    vocab = logits.shape[-1]
    if 0 < sampling.top_k < vocab:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = mass_before >= sampling.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_tokens(logits: torch.Tensor, sampling: SamplingParams,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of ``logits`` [b, V] (long tensor [b], on the logits' device).

    ``generator`` must live on the logits' device (a CUDA generator for CUDA logits).
    """
    if sampling.is_greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(filter_logits(logits, sampling), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
