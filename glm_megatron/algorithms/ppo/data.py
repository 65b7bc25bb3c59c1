"""Prompts for PPO and the rollout batches built from them.

Prompts are a tokenized ``prompts`` split (``tools/tokenize_data.py --format prompts``): the GLM
chat template rendered up to and including the ``<|assistant|>`` generation prompt; or, as the
guide writes it, a raw JSONL prompt file rendered the same way when the run starts
(:mod:`glm_megatron.data.prompt_files`, with ``data.tokenizer_path``). The order is
the engine's deterministic plan (``engine.batching.StepPlanner``), so a resumed run draws
the same prompts: PPO step ``k`` of epoch ``e`` takes rows ``[k*B, (k+1)*B)`` of epoch ``e``'s
permutation, each data-parallel rank its ``B / DP`` share.

A rollout batch is laid out in *label space*: for a sequence ``x`` (prompt + response, right
padded to ``T``), position ``p`` predicts ``x[p + 1]``, so per-token quantities (log-probs, values,
KL, rewards, advantages) live at ``[b, p]`` with a mask that is 1 where ``x[p + 1]`` is a
response token. Right padding needs no attention mask under causal attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ...data.dataset import TokenizedDataset
from ...data.errors import DataValidationError
from ...data.prompt_files import is_raw_prompt_file, tokenize_prompt_file
from ...engine.batching import BatchPlan, StepPlanner, open_tokenized
from ...engine.config import TrainConfigError


def open_prompts(path: str, key: str, vocab_size: int, max_prompt_length: int,
                 tokenizer_path: str | None = None, template: str | None = None) -> tuple[list, int]:
    """(prompt id lists no longer than ``max_prompt_length``, number skipped as too long).

    ``path``: a tokenized ``prompts`` split, or a raw JSONL/JSON prompt file tokenized here with
    ``tokenizer_path`` (``data.tokenizer_path``) and the chat ``template``."""
    if is_raw_prompt_file(path):
        every = raw_prompts(path, key, vocab_size, tokenizer_path, template)
    else:
        ds = open_tokenized(path, key, "prompts", vocab_size)
        every = [ds[i]["prompt_ids"].astype(np.int64).tolist() for i in range(len(ds))]
    prompts = [p for p in every if 0 < len(p) <= max_prompt_length]
    if not prompts:
        raise TrainConfigError(f"{key}: no prompt of {path} fits data.max_prompt_length "
                               f"{max_prompt_length}")
    return prompts, len(every) - len(prompts)


def raw_prompts(path: str, key: str, vocab_size: int, tokenizer_path: str | None,
                template: str | None) -> list:
    if not tokenizer_path:
        raise TrainConfigError(f"{key}: {path} is a raw prompt file; set data.tokenizer_path to "
                               "the tokenizer to render it with (or tokenize it first: "
                               "tools/tokenize_data.py --format prompts)")
    try:
        prompts, tok = tokenize_prompt_file(path, tokenizer_path, template)
    except DataValidationError as err:
        raise TrainConfigError(f"{key}: {err}") from None
    if tok["vocab_size"] > vocab_size:
        raise TrainConfigError(f"{key}: data.tokenizer_path {tokenizer_path} has "
                               f"{tok['vocab_size']} tokens, more than the policy's vocab_size "
                               f"{vocab_size}")
    return prompts


def prompt_tokenizer_info(prompt_path: str, tokenizer_path: str | None) -> dict:
    """What the prompts were tokenized with (path, stop_ids, pad_id from the split's manifest);
    ``data.tokenizer_path`` overrides the path used for sample text."""
    if is_raw_prompt_file(prompt_path) and tokenizer_path:
        from ...data.tokenizer import load_tokenizer

        return load_tokenizer(tokenizer_path).describe()
    try:
        info = dict(TokenizedDataset(prompt_path).manifest.get("tokenizer") or {})
    except DataValidationError:
        info = {}
    if tokenizer_path:
        info["path"] = tokenizer_path
    return info


class PromptPlanner:
    """Prompts of PPO step ``step`` for one data-parallel rank; cycles epochs forever."""

    def __init__(self, num_prompts: int, per_rank: int, dp: int, seed: int, shuffle: bool):
        self.planner = StepPlanner(num_prompts, BatchPlan(per_rank, 1, dp), seed, shuffle,
                                   "data.prompt_data_path")
        self.steps_per_epoch = self.planner.steps_per_epoch

    def rows(self, step: int, dp_rank: int) -> np.ndarray:
        epoch, k = divmod(step, self.steps_per_epoch)
        return self.planner.global_batch(epoch, k)[0, dp_rank]


@dataclass
class Rollouts:
    """One data-parallel rank's rollouts, label space (see the module docstring)."""

    prompts: list  # list[list[int]]
    responses: list  # list[list[int]], each may end with a stop token
    tokens: torch.Tensor  # [b, T] prompt + response, right-padded
    labels: torch.Tensor  # [b, T] tokens shifted left (pad at the end)
    mask: torch.Tensor  # [b, T] float: 1 where labels[p] is a response token
    last_index: torch.Tensor  # [b] position of each sequence's last real token
    # Per-token tensors added by scoring (old_logprobs, values, advantages, returns, ...).
    fields: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, rows) -> dict:
        """A model-ready micro-batch of the given rows (plus whatever per-token fields exist)."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        batch = {"tokens": self.tokens[idx], "labels": self.labels[idx], "mask": self.mask[idx],
                 "last_index": self.last_index[idx]}
        for name, value in self.fields.items():
            batch[name] = value[idx]
        return batch


def build_rollouts(prompts: list, responses: list, pad_id: int, pad_multiple: int,
                   min_length: int = 0) -> Rollouts:
    """Right-padded label-space tensors; ``T`` is rounded up to ``pad_multiple`` and to at least
    ``min_length`` (every data-parallel rank must use the same ``T``: see :func:`agree_length`)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    full = [list(p) + list(r) for p, r in zip(prompts, responses)]
    longest = max(max(len(s) for s in full), min_length)
    length = -(-longest // pad_multiple) * pad_multiple
    b = len(full)
    tokens = torch.full((b, length), pad_id, dtype=torch.long)
    labels = torch.full((b, length), pad_id, dtype=torch.long)
    mask = torch.zeros((b, length), dtype=torch.float32)
    last = torch.zeros(b, dtype=torch.long)
    for i, (p, s) in enumerate(zip(prompts, full)):
        tokens[i, :len(s)] = torch.as_tensor(s)
        labels[i, :len(s) - 1] = torch.as_tensor(s[1:])
        # Position p predicts s[p + 1]: response tokens s[len(p):] are predicted at len(p)-1 ...
        mask[i, len(p) - 1:len(s) - 1] = 1.0
        last[i] = len(s) - 1
    return Rollouts(list(map(list, prompts)), list(map(list, responses)), tokens, labels, mask, last)


def agree_length(local_length: int, pad_multiple: int) -> int:
    """The longest rollout over every rank, rounded to ``pad_multiple``: Megatron's pipeline and
    the MoE dispatcher need one sequence length on every rank."""
    import torch.distributed as dist

    t = torch.tensor([local_length], dtype=torch.int64,
                     device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return -(-int(t) // pad_multiple) * pad_multiple
