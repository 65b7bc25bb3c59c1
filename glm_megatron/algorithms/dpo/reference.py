"""The reference's log-probs of each response, live per step or precomputed once.

Where they come from (``training.reference_model``, ``model.use_peft``,
``training.precompute_ref_log_probs``):

* **LoRA**: the policy's own chunks with every adapter switched off
  (``models.lora.AdaptersOff``): the base model, with one copy of the weights in memory.
* **a frozen model**: ``training.reference_model``'s checkpoint, or by default an exact copy of
  the policy's starting weights taken before anything trains (whatever loaded them: a
  checkpoint, HF safetensors or a seeded random init; a resumed run makes the same copy, because
  the loop loads the resumed weights afterwards). Optionally offloaded to host memory between
  uses (``engine.frozen.Offloaded``).
* **precomputed**: every training (and validation) pair is scored once before the loop, by the
  reference above or, by default, by the policy itself before it trains, so no second model is
  ever built; each step then looks its pairs up (``rows``). TRL's ``precompute_ref_log_probs``.

Live scoring runs forward-only through Megatron's schedule (:func:`engine.token_logprobs.
score_logprobs`: hidden states and the fused log-prob kernel, the result broadcast over the
pipeline), once for all the micro-batches of a step, before the policy's forward/backward.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from ...engine.eval_batches import dealt_batches
from ...engine.frozen import Offloaded, build_frozen, frozen_copy
from ...engine.token_logprobs import score_logprobs
from ...models.lora import AdaptersOff
from .loss import sequence_logps


def response_logps(chunks, microbatches: list[dict], hidden_size: int) -> torch.Tensor:
    """[rows] summed response log-probs of ``microbatches`` (rows concatenated), every rank."""
    per_token = score_logprobs(chunks, microbatches, 1.0, hidden_size, values=False)["logprobs"]
    return sequence_logps(per_token, torch.cat([mb["mask"] for mb in microbatches]))


class LiveReference:
    """Scores micro-batches with ``chunks`` inside ``switch`` (AdaptersOff, Offloaded or none)."""

    def __init__(self, chunks, switch, hidden_size: int, description: str):
        self.chunks, self.switch, self.hidden_size = chunks, switch, hidden_size
        self.description = description

    def logps(self, microbatches: list[dict]) -> torch.Tensor:
        with self.switch:
            return response_logps(self.chunks, microbatches, self.hidden_size)

    def attach(self, microbatches: list[dict], split: str) -> None:
        found = self.logps(microbatches)
        for mb in microbatches:
            n = mb["tokens"].shape[0]
            mb["ref_logps"], found = found[:n], found[n:]


class PrecomputedReference:
    """Per-pair (chosen, rejected) reference log-probs of each split, looked up by row."""

    def __init__(self, tables: dict[str, np.ndarray], description: str):
        self.tables, self.description = tables, description

    def attach(self, microbatches: list[dict], split: str) -> None:
        table = self.tables[split]
        for mb in microbatches:
            rows = mb["rows"].cpu().numpy()
            pairs = torch.as_tensor(table[rows], dtype=torch.float32, device=mb["tokens"].device)
            mb["ref_logps"] = torch.cat([pairs[:, 0], pairs[:, 1]])


def precompute(reference: LiveReference, batcher, batch_size: int, n: int) -> np.ndarray:
    """[n, 2] reference log-probs of the first ``n`` pairs, the same on every rank."""
    table = torch.zeros((n, 2), dtype=torch.float64)
    for rows, filler, length in dealt_batches(batcher, batch_size, n):
        mb = batcher.microbatch(rows, length, mask_rows=filler)
        found = reference.logps([mb]).double().cpu()
        b = len(rows)
        keep = torch.as_tensor(~filler)
        index = torch.as_tensor(rows)[keep]
        table[index, 0], table[index, 1] = found[:b][keep], found[b:][keep]
    # Each pair was scored by exactly one data-parallel rank (every rank of its replica holds
    # the same numbers): a sum over the data-parallel group fills the table everywhere.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    table = table.to(device)
    dist.all_reduce(table, group=ps.get_data_parallel_group())
    return table.cpu().numpy()


def live_reference(cfg, glm, source, chunks, layout) -> LiveReference:
    """The reference that scores live: LoRA base, ``training.reference_model``, or a frozen copy
    of the policy's starting weights (``chunks`` before any step), or - with precompute and no
    reference model - the policy's own chunks, used before the first step only."""
    t = cfg.training
    if cfg.model.use_peft:
        return LiveReference(chunks, AdaptersOff(chunks), glm.hidden_size,
                             "the policy's base weights (LoRA adapters off, no second copy)")
    if source is not None:
        ref = build_frozen(source, layout, t, reward=False)
        what = f"{source.weights} (frozen)"
    elif t.precompute_ref_log_probs:
        return LiveReference(chunks, contextlib.nullcontext(), glm.hidden_size,
                             "the starting policy itself, before its first step")
    else:
        ref = frozen_copy(chunks, glm, layout, t)
        what = "a frozen copy of the starting policy's weights"
    switch = Offloaded(ref, t.offload_reference)
    switch.offload()
    if t.offload_reference:
        what += ", offloaded to host memory between steps"
    return LiveReference(ref, switch, glm.hidden_size, what)
