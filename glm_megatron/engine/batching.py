"""Batching every trainer shares: the batch arithmetic, the deterministic step plan, tokenized
splits, padding lengths and pad ids.

Determinism is what makes resume exact: epoch ``e`` visits the rows in the permutation drawn
from ``seed + e``, step ``k`` of the epoch takes rows ``[k*G, (k+1)*G)`` of it (G the global
batch), and the data position saved in a checkpoint is just ``(epoch, step_in_epoch)``. Each data
parallel rank takes its micro-batches from the global batch laid out ``[accumulation, DP, micro]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..data.dataset import TokenizedDataset
from ..data.errors import DataValidationError
from .config import TrainConfigError, TrainingSection

# What each trainer needs from tools/tokenize_data.py (the split's ``kind``), for the error text.
KIND_USERS = {"sft": "SFT needs", "preference": "the reward model and DPO need",
              "prompts": "PPO needs"}


@dataclass(frozen=True)
class BatchPlan:
    micro_batch_size: int
    gradient_accumulation_steps: int
    data_parallel_size: int

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation_steps * self.data_parallel_size


def resolve_batch(t: TrainingSection, data_parallel_size: int) -> BatchPlan:
    """Micro batch x accumulation x data parallel = global batch; derive the one left out."""
    mbs, ga, gbs = t.per_device_train_batch_size, t.gradient_accumulation_steps, t.global_batch_size
    dp = data_parallel_size
    if gbs is None:
        return BatchPlan(mbs, ga or 1, dp)
    if ga is None:
        if gbs % (mbs * dp):
            raise TrainConfigError(
                f"training.global_batch_size {gbs} is not divisible by "
                f"training.per_device_train_batch_size x data-parallel size = {mbs} x {dp}")
        return BatchPlan(mbs, gbs // (mbs * dp), dp)
    if mbs * ga * dp != gbs:
        raise TrainConfigError(
            f"training.global_batch_size {gbs} != per_device_train_batch_size x "
            f"gradient_accumulation_steps x data-parallel size = {mbs} x {ga} x {dp} = "
            f"{mbs * ga * dp} (set one of them to null to derive it)")
    return BatchPlan(mbs, ga, dp)


class StepPlanner:
    """Which rows form each global batch, and how they split into micro-batches."""

    def __init__(self, num_rows: int, plan: BatchPlan, seed: int, shuffle: bool, what: str):
        self.n, self.plan, self.seed, self.shuffle = num_rows, plan, seed, shuffle
        self.steps_per_epoch = num_rows // plan.global_batch_size
        if self.steps_per_epoch == 0:
            raise TrainConfigError(
                f"{what}: {num_rows} training rows is less than one global batch "
                f"({plan.global_batch_size}); lower training.global_batch_size")
        self._order: tuple[int, np.ndarray] | None = None

    def order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            perm = (np.random.RandomState(self.seed + epoch).permutation(self.n) if self.shuffle
                    else np.arange(self.n))
            self._order = (epoch, perm)
        return self._order[1]

    def global_batch(self, epoch: int, step_in_epoch: int) -> np.ndarray:
        g = self.plan.global_batch_size
        rows = self.order(epoch)[step_in_epoch * g:(step_in_epoch + 1) * g]
        p = self.plan
        return rows.reshape(p.gradient_accumulation_steps, p.data_parallel_size, p.micro_batch_size)


class Truncated(Sequence):
    """A view whose rows are cut to ``max_tokens`` tokens."""

    def __init__(self, dataset, max_tokens: int, indices: np.ndarray | None = None):
        self.dataset, self.max_tokens = dataset, max_tokens
        self.indices = np.arange(len(dataset)) if indices is None else np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        row = self.dataset[int(self.indices[i])]
        return {k: v[: self.max_tokens] for k, v in row.items()}

    def lengths(self) -> np.ndarray:
        return np.minimum(np.asarray(self.dataset.lengths())[self.indices], self.max_tokens)


def open_tokenized(path: str, key: str, kind: str, vocab_size: int) -> TokenizedDataset:
    """A tokenized split of ``kind`` ('sft', 'preference', 'prompts') whose tokenizer fits a model
    of ``vocab_size``; every problem is a TrainConfigError naming the config ``key``."""
    try:
        ds = TokenizedDataset(path)
    except DataValidationError as err:
        raise TrainConfigError(f"{key}: {err}") from None
    if ds.kind != kind:
        raise TrainConfigError(f"{key}: {path} holds {ds.kind!r} rows, {KIND_USERS[kind]} "
                               f"{kind!r} (tools/tokenize_data.py --format {kind})")
    tok_vocab = (ds.manifest.get("tokenizer") or {}).get("vocab_size")
    if isinstance(tok_vocab, int) and tok_vocab > vocab_size:
        raise TrainConfigError(f"{key}: the data's tokenizer has {tok_vocab} tokens, more than the "
                               f"model's vocab_size {vocab_size}")
    return ds


def tokenized_splits(data_cfg, kind: str, max_tokens: int, vocab_size: int, seed: int):
    """(train, validation or None) views of ``data.train_data_path`` / ``validation_data_path``,
    or of a ``validation_split`` held out of the training rows; rows cut to ``max_tokens``."""
    if not data_cfg.train_data_path:
        raise TrainConfigError("data.train_data_path is not set")
    train = open_tokenized(data_cfg.train_data_path, "data.train_data_path", kind, vocab_size)
    if data_cfg.validation_data_path:
        val = open_tokenized(data_cfg.validation_data_path, "data.validation_data_path", kind,
                             vocab_size)
        return Truncated(train, max_tokens), Truncated(val, max_tokens)
    if data_cfg.validation_split > 0:
        order = np.random.RandomState(seed).permutation(len(train))
        n_val = max(1, int(round(data_cfg.validation_split * len(train))))
        return (Truncated(train, max_tokens, np.sort(order[n_val:])),
                Truncated(train, max_tokens, np.sort(order[:n_val])))
    return Truncated(train, max_tokens), None


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_multiple(layout) -> int:
    """What every padded length must be a multiple of: sequence parallelism splits the sequence
    over TP ranks; context parallelism splits it in 2*CP chunks."""
    multiple = layout.tp if layout.sequence_parallel else 1
    return math.lcm(multiple, 2 * layout.cp) if layout.cp > 1 else multiple


def model_pad_id(glm) -> int:
    """The model's pad token when it is a real id of its vocabulary, else 0 (padding is masked)."""
    pad = glm.pad_token_id
    return pad if isinstance(pad, int) and 0 <= pad < glm.vocab_size else 0
