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
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil

import numpy as np
import torch
import torch.distributed as dist

from ..models.checkpoint import is_dist_checkpoint, load_model_weights, save_model_weights
from ..models.config import ConfigError, config_from_hf_dict
from .config import TrainConfigError

ITER_RE = re.compile(r"^iter_(\d{7,})$")
COMPLETE = "COMPLETE"
LATEST = "latest"


def iter_name(step: int) -> str:
    return f"iter_{step:07d}"


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE))


def list_checkpoints(ckpt_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints of ``ckpt_dir``, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = []
    for name in os.listdir(ckpt_dir):
        m = ITER_RE.match(name)
        path = os.path.join(ckpt_dir, name)
        if m and is_complete(path):
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(ckpt_dir: str) -> str | None:
    """The iter dir named by ``latest`` if complete, else the newest complete one."""
    marker = os.path.join(ckpt_dir, LATEST)
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8") as fh:
            path = os.path.join(ckpt_dir, fh.read().strip())
        if is_complete(path):
            return path
    found = list_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


def follow_marker(path: str) -> str:
    """``CKPT_DIR/latest`` or ``CKPT_DIR/best`` (text files) -> the iter dir they name."""
    if os.path.isfile(path) and os.path.basename(path) in (LATEST, "best"):
        with open(path, encoding="utf-8") as fh:
            return os.path.join(os.path.dirname(path), fh.read().strip())
    return path


def resolve_model_dir(path: str, key: str = "model.load_checkpoint") -> str:
    """The torch_dist weights directory behind ``path``: a weights dir itself, an ``iter_x`` dir
    (it must be COMPLETE), ``CKPT_DIR/best`` / ``CKPT_DIR/latest``, or a run's CKPT_DIR (the
    checkpoint its ``latest`` names, else its newest complete one). Every command that loads
    weights goes through here (trainers, evaluate-*, PPO's models, the converters), so all accept
    the same paths and fail with the same errors, each naming ``key``."""
    path = follow_marker(path)
    if not os.path.exists(path):
        raise TrainConfigError(f"{key}: {path}: no such directory")
    if os.path.normpath(path).endswith(".partial"):
        raise TrainConfigError(f"{key}: {path}: an interrupted conversion's leftovers, not a checkpoint")
    if is_dist_checkpoint(path):
        weights = path
    elif is_dist_checkpoint(os.path.join(path, "model")):
        if ITER_RE.match(os.path.basename(os.path.normpath(path))) and not is_complete(path):
            raise TrainConfigError(f"{key}: {path}: checkpoint is incomplete (no COMPLETE marker)")
        weights = os.path.join(path, "model")
    else:
        marker = os.path.join(path, LATEST)
        latest = follow_marker(marker) if os.path.isfile(marker) else latest_checkpoint(path)
        if latest is None:
            raise TrainConfigError(
                f"{key}: {path}: not a Megatron checkpoint (no metadata.json, no iter_x/model, and "
                "no complete checkpoint of a run in it)")
        return resolve_model_dir(latest, key)
    if not os.path.exists(os.path.join(weights, ".metadata")):
        raise TrainConfigError(f"{key}: {weights}: torch_dist checkpoint is incomplete (no .metadata file)")
    return weights


def model_config_file(model_dir: str) -> str | None:
    for candidate in (os.path.join(model_dir, "model_config.json"),
                      os.path.join(os.path.dirname(model_dir.rstrip("/")), "model_config.json")):
        if os.path.isfile(candidate):
            return candidate
    return None


def checkpoint_model_config(model_dir: str, key: str, missing_hint: str):
    """The GLMConfig saved with the weights (``model_config.json`` beside them or one level up);
    errors name ``key``, and ``missing_hint`` says what to do when the file is absent."""
    file = model_config_file(model_dir)
    if file is None:
        raise TrainConfigError(f"{key}: {model_dir} has no model_config.json beside it; {missing_hint}")
    with open(file, encoding="utf-8") as fh:
        try:
            return config_from_hf_dict(json.load(fh), source=file)
        except ConfigError as err:
            raise TrainConfigError(f"{key}: {err}") from None


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


def _optimizer_sharded_state(engine, is_loading: bool) -> dict:
    from ..models.checkpoint import _sharded_state_dict

    model_sd = _sharded_state_dict(engine.modules)
    # "fully_reshardable": loads at another TP/PP/EP/DP layout. Megatron 0.16's default for
    # the distributed optimizer (fully_sharded_model_space) relies on flattened ShardedTensors,
    # which its own checkpointing no longer accepts.
    return engine.optimizer.sharded_state_dict(
        model_sd, is_loading=is_loading,
        metadata={"distrib_optim_sharding_type": "fully_reshardable"})


def _materialize_optimizer_state(optimizer) -> None:
    """Give a fresh torch Adam its state tensors before a load.

    Without Apex/TE, Megatron's distributed optimizer reads ``state["step"]`` of every
    parameter while building the sharded state dict to load into, and a fresh optimizer has no
    state yet. Zeros are placeholders: the load overwrites all of them.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                state = inner.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p.data)
                    state["exp_avg_sq"] = torch.zeros_like(p.data)


def _load_optimizer_state(optimizer, state: dict) -> None:
    """``optimizer.load_state_dict`` working around a Megatron-Core 0.16 bug without Apex/TE.

    Its distributed optimizer first gives every parameter a torch-Adam ``step`` entry, then
    copies the loaded tensors over *all* state entries, ``step`` included, which the loaded
    tensors never contain (KeyError 'step'). During the load only, the copy skips ``step``.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    patched = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(opt, DistributedOptimizer):
            continue
        original = opt._set_main_param_and_optimizer_states

        def without_step(model_param, tensors, _opt=opt, _original=original):
            group, order = _opt.model_param_group_index_map[model_param]
            main_param = _opt.optimizer.param_groups[group]["params"][order]
            adam_state = _opt.optimizer.state[main_param]
            step = adam_state.pop("step", None)
            try:
                _original(model_param, tensors)
            finally:
                if step is not None:
                    adam_state["step"] = step

        opt._set_main_param_and_optimizer_states = without_step
        patched.append(opt)
    try:
        optimizer.load_state_dict(state)
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states
    _unshare_adam_steps(optimizer)


def _unshare_adam_steps(optimizer) -> None:
    """Give every parameter its own Adam ``step`` tensor after a load.

    Megatron-Core 0.16 (without Apex/TE) assigns one and the same step tensor to every
    parameter's state on load; torch's Adam increments it in place once per parameter, so after
    a resume the step count (and Adam's bias correction) ran ahead by the number of parameters
    per step, and the dense and expert optimizers disagreed at the next resume.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in opt.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


def _save_engine(engine, path: str) -> None:
    from megatron.core import dist_checkpointing

    save_model_weights(engine.modules, os.path.join(path, "model"))
    dist_checkpointing.save(_optimizer_sharded_state(engine, False), os.path.join(path, "optimizer"))


def _load_engine(engine, path: str, scheduler_state: dict) -> None:
    from megatron.core import dist_checkpointing

    load_model_weights(engine.modules, os.path.join(path, "model"))
    _materialize_optimizer_state(engine.optimizer)
    opt_state = dist_checkpointing.load(_optimizer_sharded_state(engine, True),
                                        os.path.join(path, "optimizer"))
    _load_optimizer_state(engine.optimizer, opt_state)
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
