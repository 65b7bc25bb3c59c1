"""Argument checks shared by the token log-prob entry points: clear ValueErrors before any compute."""

from __future__ import annotations

import math

import torch

from .kl import check_kl_type


def check_common(labels, temperature, ref_logprobs, kl_type, vocab_size, ignore_index, device):
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but the inputs are on {device}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if (ref_logprobs is None) != (kl_type is None):
        raise ValueError("ref_logprobs and kl_type must be given together (KL needs both)")
    if kl_type is not None:
        check_kl_type(kl_type)
        if ref_logprobs.shape != labels.shape:
            raise ValueError(
                f"ref_logprobs shape {tuple(ref_logprobs.shape)} != labels shape {tuple(labels.shape)}"
            )
    # One reduction over N labels; on CUDA it costs a host sync, which we accept: an out-of-range
    # id would otherwise silently give logp = -lse (its target logit counted as zero).
    valid = labels != ignore_index
    if labels.numel() and bool(((labels < 0) | (labels >= vocab_size))[valid].any()):
        bad = labels[valid & ((labels < 0) | (labels >= vocab_size))][0].item()
        raise ValueError(
            f"label {bad} is outside the vocabulary [0, {vocab_size}) and is not ignore_index={ignore_index}"
        )


def check_hidden_weight(hidden, weight, labels):
    if hidden.dim() < 2:
        raise ValueError(f"hidden must be [..., H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be this rank's vocab shard [V/TP, H], got shape {tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden size mismatch: hidden {tuple(hidden.shape)} vs weight {tuple(weight.shape)} "
            "(last dims differ)"
        )
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal hidden.shape[:-1] {tuple(hidden.shape[:-1])}"
        )
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if not (hidden.is_floating_point() and weight.is_floating_point()):
        raise ValueError("hidden and weight must be floating point")


def check_logits(logits, labels):
    if logits.dim() < 2:
        raise ValueError(f"logits must be [..., V/TP], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError("logits must be floating point")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal logits.shape[:-1] {tuple(logits.shape[:-1])}"
        )
