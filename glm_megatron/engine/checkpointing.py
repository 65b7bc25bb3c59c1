"""Trainer checkpoints: layout on disk, save, resume, retention.

::

    CKPT_DIR/latest                  text: the newest complete iter dir name (written atomically)
    CKPT_DIR/iter_0000200/
        model/                       weights only, exactly ``models.checkpoint.save_model_weights``
                                     (initial weights of the next stage, input of the converter)
        model_config.json            the GLMConfig as an HF config dict (self-describing)
        optimizer/                   torch_dist of the optimizer's sharded state (any DP size)
        rng/rank_00000.safetensors   per-rank RNG states: torch / Megatron-tracker generator
                                     states as tensors, Python / NumPy states as JSON metadata
                                     (no pickle: a checkpoint from elsewhere cannot run code)
        trainer_state.json           step, epoch, data position, scheduler, best metric, config
        COMPLETE                     written by rank 0 after every rank finished (barrier)

A directory without ``COMPLETE`` (a run killed while saving) is never picked by ``--resume auto``
and is overwritten when the same step is saved again. ``--resume auto`` also passes over a
complete checkpoint whose ``trainer_state.json`` or torch_dist metadata is unreadable, truncated
or refused, saying so, and resumes from the newest older one that is usable.

Nothing here unpickles: trainer state is JSON, RNG states are safetensors + JSON
(``engine.rng_state``), torch_dist directories are read through ``models.torch_dist_files``
(allowlisted metadata, weights-only loads).

Reading the layout (names, markers, which path leads to which weights) is
``models.checkpoint_dirs``, shared with the converters; the Megatron-Core distributed-optimizer
workarounds that saving and loading need are ``engine.megatron_workarounds``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

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
from ..models.torch_dist_files import check_torch_dist, checked_read
from .config import TrainConfigError
from .megatron_workarounds import (
    load_optimizer_state,
    materialize_optimizer_state,
    optimizer_sharded_state_dict,
)
from .rng_state import RNG_DIR, read_rng_state, rng_file, rng_state, set_rng_state, write_rng_state

log = logging.getLogger(__name__)
TRAINER_STATE = "trainer_state.json"

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


# GLMConfig fields that are not architecture (token ids, position limit, init scale).
_NOT_ARCHITECTURE = {"eos_token_id", "pad_token_id", "bos_token_id", "max_position_embeddings",
                     "initializer_range"}


def check_architecture_matches(m) -> None:
    """Before any work: a ``model.preset`` / ``model.hf_config`` / ``model.hf_checkpoint`` given beside
    ``model.load_checkpoint`` must describe the checkpoint's architecture (its
    ``model_config.json``); a mismatch is one TrainConfigError naming every differing field with
    both values (the weights would otherwise fail to load deep inside Megatron, once per rank, or
    load into a model that computes something else)."""
    declared_key = next((k for k in ("preset", "hf_config", "hf_checkpoint") if getattr(m, k)), None)
    if not m.load_checkpoint or declared_key is None:
        return
    value = getattr(m, declared_key)
    declared_key = f"model.{declared_key}"
    model_dir = resolve_model_dir(m.load_checkpoint)
    if checkpoint_dirs.model_config_file(model_dir) is None:
        return  # nothing to compare with: the preset is the only description
    saved = checkpoint_model_config(model_dir, "model.load_checkpoint", "")
    try:
        from ..models import get_preset, load_hf_config

        declared = get_preset(value) if declared_key == "model.preset" else load_hf_config(value)
    except ConfigError as err:
        raise TrainConfigError(f"{declared_key}: {err}") from None
    diffs = [f"{f}: {declared_key} {getattr(declared, f)!r} vs checkpoint {getattr(saved, f)!r}"
             for f in GLMConfig.__dataclass_fields__
             if f not in _NOT_ARCHITECTURE and getattr(declared, f) != getattr(saved, f)]
    if diffs:
        raise TrainConfigError(
            f"{declared_key} {value!r} does not match the architecture of model.load_checkpoint "
            f"{model_dir} (its {checkpoint_dirs.MODEL_CONFIG_FILE}): " + "; ".join(diffs)
            + f". Remove {declared_key} to use the checkpoint's own architecture, or load a "
            "checkpoint of that architecture")


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0) == 0


def _torch_dist_dirs(path: str) -> list[str]:
    """The torch_dist directories of checkpoint ``path``: its model/ and optimizer/, and those of
    the extra engines saved beside it (``iter_x/NAME/{model,optimizer}``)."""
    found = [os.path.join(path, "model"), os.path.join(path, "optimizer")]
    for name in sorted(os.listdir(path)):
        found += [os.path.join(path, name, sub) for sub in ("model", "optimizer")
                  if os.path.isdir(os.path.join(path, name, sub))]
    return found


def checkpoint_problem(path: str) -> str | None:
    """Why the complete checkpoint ``path`` cannot be resumed from (its trainer state or a
    torch_dist directory unreadable, truncated or refused), or None. Reads metadata only."""
    try:
        read_trainer_state(path)
        for directory in _torch_dist_dirs(path):
            check_torch_dist(directory)
    except (TrainConfigError, ConfigError) as err:
        return str(err)
    return None


def resolve_resume(resume: str | None, output_dir: str) -> str | None:
    """The iter dir to resume from: ``auto`` -> the latest usable complete checkpoint in
    ``output_dir`` (None when there is none: a fresh start, said in one line), or an explicit iter
    dir / run dir (an unusable one is an error naming the file)."""
    if not resume:
        return None
    if resume == "auto":
        candidates = [p for _, p in reversed(list_checkpoints(output_dir))]
        latest = latest_checkpoint(output_dir)
        if latest in candidates:  # the one ``latest`` names first (it is normally the newest)
            candidates.remove(latest)
            candidates.insert(0, latest)
        skipped = []
        for path in candidates:
            problem = checkpoint_problem(path)
            if problem is None:
                if skipped and _is_main_process():
                    log.warning("--resume auto: resuming from %s, the newest usable checkpoint; "
                                "passed over: %s", path, "; ".join(skipped))
                return path
            skipped.append(f"{os.path.basename(path)} ({problem})")
        if skipped:
            raise TrainConfigError(f"checkpoint.resume=auto: no usable checkpoint in {output_dir}: "
                                   + "; ".join(skipped))
        if _is_main_process():
            log.warning("--resume auto: no complete checkpoint in %s: starting a fresh run",
                        os.path.abspath(output_dir))
        return None
    resume = follow_marker(resume)
    if not is_complete(resume):
        latest = latest_checkpoint(resume) if os.path.isdir(resume) else None
        if latest is None:
            raise TrainConfigError(f"checkpoint.resume: {resume} is not a complete checkpoint")
        resume = latest
    problem = checkpoint_problem(resume)
    if problem is not None:
        raise TrainConfigError(f"checkpoint.resume: {problem}")
    return resume


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
    with checked_read(os.path.join(path, "optimizer")):
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
        os.makedirs(os.path.join(path, RNG_DIR))
    dist.barrier()
    _save_engine(engine, path)
    for name, extra in (extra_engines or {}).items():
        if rank == 0:
            os.makedirs(os.path.join(path, name, "optimizer"))
        dist.barrier()
        _save_engine(extra, os.path.join(path, name))
    write_rng_state(rng_file(path, rank), rng_state())
    if rank == 0:
        state = dict(trainer_state, scheduler=engine.scheduler.state_dict(),
                     world_size=dist.get_world_size())
        state["extra_schedulers"] = {n: e.scheduler.state_dict()
                                     for n, e in (extra_engines or {}).items()}
        _write_json_atomic(os.path.join(path, TRAINER_STATE), state)
        _write_json_atomic(os.path.join(path, "model_config.json"), model_config)
    dist.barrier()  # every rank has written its shards
    if rank == 0:
        _write_json_atomic(os.path.join(path, COMPLETE), f"step {step}\n")
        _write_json_atomic(os.path.join(ckpt_dir, LATEST), iter_name(step) + "\n")
    dist.barrier()
    return path


def read_trainer_state(path: str) -> dict:
    """``path/trainer_state.json``; TrainConfigError naming the file when it is missing,
    truncated or lacks the step / scheduler state."""
    file = os.path.join(path, TRAINER_STATE)
    try:
        with open(file, encoding="utf-8") as fh:
            state = json.load(fh)
    except FileNotFoundError:
        raise TrainConfigError(f"{file}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TrainConfigError(f"{file}: unreadable, truncated or corrupt ({err})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) \
            or not isinstance(state.get("scheduler"), dict):
        raise TrainConfigError(f"{file}: not a trainer state (no integer 'step' and "
                               "'scheduler' state)")
    return state


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
    if state.get("world_size") == dist.get_world_size():
        for file in (rng_file(path, dist.get_rank()), rng_file(path, dist.get_rank(), legacy=True)):
            if os.path.isfile(file):
                set_rng_state(read_rng_state(file))
                break
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
