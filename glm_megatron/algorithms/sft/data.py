"""SFT data for the trainer: splits, the deterministic global-batch plan, padded micro-batches.

Determinism is what makes resume exact: epoch ``e`` visits the rows in the permutation drawn
from ``seed + e``, step ``k`` of the epoch takes rows ``[k*G, (k+1)*G)`` of it (G the global
batch), and the data position saved in a checkpoint is just ``(epoch, step_in_epoch)``. Each data
parallel rank takes its micro-batches from the global batch laid out ``[accumulation, DP, micro]``.

Every rank knows the whole global batch (lengths come from the index, no data read), so all
micro-batches of a step are padded to one length: Megatron's pipeline sends fixed shapes, and
the MoE all-gather dispatcher needs equal token counts on every expert-parallel rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ...data.collate import IGNORE_INDEX, collate_sft
from ...data.dataset import TokenizedDataset
from ...data.errors import DataValidationError
from ...data.packing import PackedSFTDataset, packed_attention_mask
from ...engine.config import BatchPlan, TrainConfigError


class Truncated(Sequence):
    """A view whose rows are cut to ``max_tokens`` (= max_seq_length + 1 before shifting)."""

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


def open_sft_dataset(path: str, key: str, vocab_size: int) -> TokenizedDataset:
    try:
        ds = TokenizedDataset(path)
    except DataValidationError as err:
        raise TrainConfigError(f"{key}: {err}") from None
    if ds.kind != "sft":
        raise TrainConfigError(f"{key}: {path} holds {ds.kind!r} rows, SFT needs 'sft' "
                               "(tools/tokenize_data.py --format sft)")
    tok_vocab = (ds.manifest.get("tokenizer") or {}).get("vocab_size")
    if isinstance(tok_vocab, int) and tok_vocab > vocab_size:
        raise TrainConfigError(f"{key}: the data's tokenizer has {tok_vocab} tokens, more than the "
                               f"model's vocab_size {vocab_size}")
    return ds


def sft_splits(data_cfg, max_seq_length: int, vocab_size: int, seed: int):
    """(train, validation or None) views, rows cut to max_seq_length positions."""
    if not data_cfg.train_data_path:
        raise TrainConfigError("data.train_data_path is not set")
    train = open_sft_dataset(data_cfg.train_data_path, "data.train_data_path", vocab_size)
    cap = max_seq_length + 1
    if data_cfg.validation_data_path:
        val = open_sft_dataset(data_cfg.validation_data_path, "data.validation_data_path",
                               vocab_size)
        return Truncated(train, cap), Truncated(val, cap)
    if data_cfg.validation_split > 0:
        order = np.random.RandomState(seed).permutation(len(train))
        n_val = max(1, int(round(data_cfg.validation_split * len(train))))
        return Truncated(train, cap, np.sort(order[n_val:])), Truncated(train, cap, np.sort(order[:n_val]))
    return Truncated(train, cap), None


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


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def pad_batch(batch: dict, length: int, pad_id: int) -> dict:
    """Right-pad a collate_sft batch to ``length`` positions."""
    b, t = batch["tokens"].shape
    if t == length:
        return batch
    extra = length - t

    def pad(x, value):
        return torch.cat([x, torch.full((b, extra), value, dtype=x.dtype)], dim=1)

    return {
        "tokens": pad(batch["tokens"], pad_id),
        "labels": pad(batch["labels"], IGNORE_INDEX),
        "loss_mask": pad(batch["loss_mask"], 0),
        "attention_mask": pad(batch["attention_mask"], False),
        "position_ids": torch.arange(length).expand(b, length).clone(),
    }


def finalize_for_model(batch: dict, ignore_index: int, device) -> dict:
    """Loss mask = stored mask AND a real label; labels made valid ids for Megatron's CE."""
    labels = batch["labels"]
    valid = (labels != IGNORE_INDEX) & (labels != ignore_index)
    out = {
        "tokens": batch["tokens"].to(device),
        "labels": torch.where(valid, labels, torch.zeros_like(labels)).to(device),
        "loss_mask": (batch["loss_mask"] * valid).float().to(device),
        "position_ids": batch["position_ids"].to(device),
        "attn_mask": batch.get("attn_mask"),
    }
    if out["attn_mask"] is not None:
        out["attn_mask"] = out["attn_mask"].to(device)
    return out


class SFTBatcher:
    """Turns row indices into model-ready micro-batches (padded or packed)."""

    def __init__(self, dataset, max_seq_length: int, pad_id: int, pad_multiple: int,
                 ignore_index: int, packing: bool, device):
        self.packing = packing
        self.pad_id, self.pad_multiple, self.ignore_index = pad_id, pad_multiple, ignore_index
        self.device = device
        self.max_seq_length = _round_up(max_seq_length, pad_multiple)
        if packing:
            self.rows = PackedSFTDataset(dataset, self.max_seq_length, pad_id)
            self._lengths = np.full(len(self.rows), self.max_seq_length)
            doc = np.asarray(dataset.lengths()) - 1
            self._real = np.array([int(doc[pack].sum()) for pack in self.rows.packs])
        else:
            self.rows = dataset
            self._lengths = np.asarray(dataset.lengths()) - 1  # positions after shifting
            self._real = self._lengths

    def __len__(self) -> int:
        return len(self.rows)

    def step_length(self, rows: np.ndarray) -> int:
        return _round_up(int(self._lengths[rows].max()), self.pad_multiple)

    def real_tokens(self, rows: np.ndarray) -> int:
        return int(self._real[rows].sum())

    def microbatch(self, rows: np.ndarray, length: int, mask_rows: np.ndarray | None = None) -> dict:
        """``mask_rows`` (bool per row): rows whose loss is zeroed (eval filler rows)."""
        samples = [self.rows[int(i)] for i in rows]
        if self.packing:
            batch = {k: torch.as_tensor(np.stack([s[k] for s in samples]))
                     for k in ("tokens", "labels", "loss_mask", "position_ids")}
            # Megatron's masks are True where attention is *not* allowed.
            allowed = torch.stack([packed_attention_mask(torch.as_tensor(s["cu_seqlens"]), length)
                                   for s in samples])
            batch["attn_mask"] = ~allowed[:, None]
        else:
            batch = pad_batch(collate_sft(samples, self.pad_id), length, self.pad_id)
        if mask_rows is not None:
            batch["loss_mask"] = batch["loss_mask"] * torch.as_tensor(~mask_rows)[:, None]
        return finalize_for_model(batch, self.ignore_index, self.device)
