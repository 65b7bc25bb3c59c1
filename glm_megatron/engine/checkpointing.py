"""Trainer checkpoints: layout on disk, save, resume, retention.

::

    CKPT_DIR/latest                  text: the newest complete iter dir name (written atomically)
    CKPT_DIR/iter_0000200/
        model/                       weights only, exactly ``models.checkpoint.save_model_weights``
                                     (initial weights of the next stage, input of the converter)
        model_config.json            the GLMConfig as an HF config dict (self-describing)
        optimizer/                   torch_dist of the optimizer's sharded state (any DP size)
        rng/rank_00000.pt ...        per-rank RNG states (Python, NumPy, torch, Megatron tracker)
        trainer_state.json           step, epoch, data position, scheduler, best metric, config
        COMPLETE                     written by rank 0 after every rank finished (barrier)

A directory without ``COMPLETE`` (a run killed while saving) is never picked by ``--resume auto``
and is overwritten when the same step is saved again.

Reading the layout (names, markers, which path leads to which weights) is
``models.checkpoint_dirs``, shared with the converters; the Megatron-Core distributed-optimizer
workarounds that saving and loading need are ``engine.megatron_workarounds``.
"""

from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist

from ..models import checkpoint_dirs
from ..models.checkpoint import load_model_weights, save_model_weights
from ..models.checkpoint_dirs import (
    COMPLETE,
    LATEST,
    CheckpointError,
    follow_marker,
    is_complete,
    iter_name,
    latest_checkpoint,
    list_checkpoints,
)
from ..models.config import ConfigError, GLMConfig
from ..models.lora_files import BASE_FILE, check_same_base, read_adapter_base
from .config import TrainConfigError
from .megatron_workarounds import (
    load_optimizer_state,
    materialize_optimizer_state,
    optimizer_sharded_state_dict,
)

# ---------------------------------------------------------------------------------------------
# Layout: the directory names and markers live in models.checkpoint_dirs (the converters read
# them too); here they raise TrainConfigError, like every other trainer config check.


def resolve_model_dir(path: str, key: str = "model.load_checkpoint") -> str:
    """:func:`glm_megatron.models.checkpoint_dirs.resolve_model_dir` (same accepted paths, same
    messages naming ``key``), raising TrainConfigError."""
    try:
        return checkpoint_dirs.resolve_model_dir(path, key)
    except CheckpointError as err:
        raise TrainConfigError(str(err)) from None


def checkpoint_model_config(model_dir: str, key: str, missing_hint: str) -> GLMConfig:
    """:func:`glm_megatron.models.checkpoint_dirs.checkpoint_model_config`, raising
    TrainConfigError."""
    try:
        return checkpoint_dirs.checkpoint_model_config(model_dir, key, missing_hint)
    except CheckpointError as err:
        raise TrainConfigError(str(err)) from None


def resolve_resume(resume: str | None, output_dir: str) -> str | None:
    """The iter dir to resume from: ``auto`` -> latest complete in ``output_dir`` (None when
    there is none: a fresh start), or an explicit iter dir / run dir."""
    if not resume:
        return None
    if resume == "auto":
        return latest_checkpoint(output_dir)
    resume = follow_marker(resume)
    if is_complete(resume):
        return resume
    latest = latest_checkpoint(resume) if os.path.isdir(resume) else None
    if latest is None:
        raise TrainConfigError(f"checkpoint.resume: {resume} is not a complete checkpoint")
    return latest


# ---------------------------------------------------------------------------------------------
# RNG


def rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


# ---------------------------------------------------------------------------------------------
# Save / load


def _write_json_atomic(path: str, data) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        if isinstance(data, str):
            fh.write(data)
        else:
            json.dump(data, fh, indent=1, default=str)
    os.replace(tmp, path)


def _save_engine(engine, path: str) -> None:
    from megatron.core import dist_checkpointing

    base = getattr(engine, "adapter_base", None)
    save_model_weights(engine.modules, os.path.join(path, "model"), adapters_only=base is not None)
    if base is not None and dist.get_rank() == 0:
        _write_json_atomic(os.path.join(path, "model", BASE_FILE), base)
    dist_checkpointing.save(optimizer_sharded_state_dict(engine.optimizer, engine.modules, False),
                            os.path.join(path, "optimizer"))


def _load_engine(engine, path: str, scheduler_state: dict) -> None:
    from megatron.core import dist_checkpointing

    base = getattr(engine, "adapter_base", None)
    if base is not None:
        saved = read_adapter_base(os.path.join(path, "model"))
        if saved is None:
            raise TrainConfigError(f"checkpoint.resume: {path} holds no LoRA adapters "
                                   f"({BASE_FILE} missing) but this run uses model.use_peft")
        try:
            check_same_base(saved, base, f"checkpoint.resume: {path}")
        except ConfigError as err:
            raise TrainConfigError(str(err)) from None
    load_model_weights(engine.modules, os.path.join(path, "model"), adapters_only=base is not None)
    materialize_optimizer_state(engine.optimizer)
    opt_state = dist_checkpointing.load(
        optimizer_sharded_state_dict(engine.optimizer, engine.modules, True),
        os.path.join(path, "optimizer"))
    load_optimizer_state(engine.optimizer, opt_state)
    # load_state_dict *adds* the saved count to the current one (see lr_schedule).
    engine.scheduler.num_steps = 0
    engine.scheduler.load_state_dict(scheduler_state)


def save_checkpoint(engine, ckpt_dir: str, step: int, trainer_state: dict,
                    model_config: dict, extra_engines: dict | None = None) -> str:
    """Collective. Writes ``CKPT_DIR/iter_{step}`` and marks it complete; returns its path.

    ``extra_engines`` (PPO's separate value model) are saved the same way under
    ``iter_x/NAME/{model,optimizer}``, their schedulers in the trainer state."""
    path = os.path.join(ckpt_dir, iter_name(step))
    rank = dist.get_rank()
    if rank == 0:
        if os.path.exists(path):  # an incomplete leftover (or a re-save of the same step)
            shutil.rmtree(path)
        os.makedirs(os.path.join(path, "optimizer"))
        os.makedirs(os.path.join(path, "rng"))
    dist.barrier()
    _save_engine(engine, path)
    for name, extra in (extra_engines or {}).items():
        if rank == 0:
            os.makedirs(os.path.join(path, name, "optimizer"))
        dist.barrier()
        _save_engine(extra, os.path.join(path, name))
    torch.save(rng_state(), os.path.join(path, "rng", f"rank_{rank:05d}.pt"))
    if rank == 0:
        state = dict(trainer_state, scheduler=engine.scheduler.state_dict(),
                     world_size=dist.get_world_size())
        state["extra_schedulers"] = {n: e.scheduler.state_dict()
                                     for n, e in (extra_engines or {}).items()}
        _write_json_atomic(os.path.join(path, "trainer_state.json"), state)
        _write_json_atomic(os.path.join(path, "model_config.json"), model_config)
    dist.barrier()  # every rank has written its shards
    if rank == 0:
        _write_json_atomic(os.path.join(path, COMPLETE), f"step {step}\n")
        _write_json_atomic(os.path.join(ckpt_dir, LATEST), iter_name(step) + "\n")
    dist.barrier()
    return path


def read_trainer_state(path: str) -> dict:
    with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as fh:
        return json.load(fh)


def load_checkpoint(engine, path: str, extra_engines: dict | None = None) -> dict:
    """Collective. Restores weights, optimizer, scheduler and (same world size) RNG; returns the
    trainer state."""
    state = read_trainer_state(path)
    _load_engine(engine, path, state["scheduler"])
    for name, extra in (extra_engines or {}).items():
        saved = state.get("extra_schedulers", {}).get(name)
        if saved is None or not os.path.isdir(os.path.join(path, name)):
            raise TrainConfigError(f"checkpoint.resume: {path} has no {name!r} model state")
        _load_engine(extra, os.path.join(path, name), saved)
    rng_file = os.path.join(path, "rng", f"rank_{dist.get_rank():05d}.pt")
    if state.get("world_size") == dist.get_world_size() and os.path.isfile(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=False))
    return state


def prune_checkpoints(ckpt_dir: str, limit: int | None, keep: set[str]) -> list[str]:
    """Rank 0: delete the oldest complete checkpoints beyond ``limit``, never one in ``keep``
    (the best model); the newest is always kept. Returns the deleted paths."""
    if not limit:
        return []
    found = [p for _, p in list_checkpoints(ckpt_dir)]
    keep = {os.path.abspath(k) for k in keep if k} | ({os.path.abspath(found[-1])} if found else set())
    deleted = []
    excess = len(found) - limit
    for path in found:
        if excess <= 0:
            break
        if os.path.abspath(path) in keep:
            continue
        # Drop the marker first: a half-deleted directory must never look complete.
        os.remove(os.path.join(path, COMPLETE))
        shutil.rmtree(path)
        deleted.append(path)
        excess -= 1
    return deleted


def write_marker(ckpt_dir: str, name: str, iter_dir_name: str) -> None:
    """``latest`` / ``best``: a text file naming an iter dir, replaced atomically."""
    _write_json_atomic(os.path.join(ckpt_dir, name), iter_dir_name + "\n")
