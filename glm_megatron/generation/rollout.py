"""The rollout interface PPO uses to turn prompts into responses, and its in-engine implementation.

A :class:`RolloutGenerator` may be the training engine itself (:class:`InEngineGenerator`, the KV
cache generator over the actor's own Megatron chunks) or a client of an external inference server
(vLLM, SGLang) that was sent the current weights. The trainer depends only on this contract:

* **Collective.** ``generate`` is called by every rank of the job at the same time (the in-engine
  implementation runs collectives over the whole world; a server client may use them to gather
  prompts to one rank and scatter the responses back).
* **Per data-parallel rank.** Each rank passes the prompts of its data-parallel rank; the ranks of
  one model replica (its TP and PP ranks) pass identical prompts. Different DP ranks may pass
  different numbers of prompts, including none.
* **Identical results within a replica.** Every rank of one model replica gets the same responses,
  so the following log-prob / value passes see the same tokens everywhere.
* **Responses** are the new token ids only (no prompt), one list per prompt in order, ending with
  the stop token when one was produced (it is part of the action and gets a log-prob), otherwise
  ``max_new_tokens`` long.
* **Seed.** ``seed`` makes sampling reproducible: the same seed, prompts, weights and layout give
  the same tokens. Callers should derive it from (base seed, step, DP rank), e.g.
  ``base + 1_000_003 * step + dp_rank``: with one seed everywhere, DP ranks given the same prompt
  would draw the same random stream. The ranks of one replica may pass different seeds; the
  in-engine generator uses TP rank 0's draw.
"""

from __future__ import annotations

from typing import Protocol

import torch

from .kv_cache import generate
from .sampling import SamplingParams

__all__ = ["RolloutGenerator", "InEngineGenerator", "SamplingParams"]


class RolloutGenerator(Protocol):
    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, sampling: SamplingParams,
                 seed: int) -> list[list[int]]: ...


class InEngineGenerator:
    """:class:`RolloutGenerator` over the engine's own model chunks, with Megatron's KV cache."""

    def __init__(self, chunks: list[torch.nn.Module], stop_ids, *, pad_id: int = 0, device=None):
        self.chunks = chunks
        self.stop_ids = list(stop_ids)
        self.pad_id = pad_id
        self.device = torch.device(device) if device is not None else next(chunks[0].parameters()).device

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, sampling: SamplingParams,
                 seed: int) -> list[list[int]]:
        # The generator lives on the model's device, where the logits are sampled.
        generator = torch.Generator(device=self.device).manual_seed(seed)
        return generate(self.chunks, prompts, max_new_tokens=max_new_tokens, stop_ids=self.stop_ids,
                        sampling=sampling, generator=generator, pad_id=self.pad_id, device=self.device)
