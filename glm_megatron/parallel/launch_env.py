"""Who am I in the job? Read the launcher's environment (torchrun, or Slurm's ``srun``).

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. A job started with
``srun python -m glm_megatron ...`` (no torchrun) only has SLURM_PROCID / SLURM_NTASKS /
SLURM_LOCALID / SLURM_NODELIST; the first host of the node list becomes the rendezvous address.
A plain ``python`` run is a world of one.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass

DEFAULT_MASTER_PORT = 29500


class LaunchEnvError(ValueError):
    """The launcher's environment is incomplete or contradictory."""


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"


def _int_var(env, name: str) -> int:
    value = env.get(name)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise LaunchEnvError(f"environment variable {name}={value!r} is not an integer") from None


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list, e.g. ``gpu[003-005,9],cpu1`` -> ``gpu003``.

    ``scontrol show hostnames`` is the authority when present; the parser covers the common
    ``prefix[ranges]`` form so that a missing scontrol binary is not fatal.
    """
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    first = re.split(r",(?![^\[]*\])", nodelist.strip())[0]
    match = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", first)
    if not match:
        return first
    prefix, ranges, suffix = match.groups()
    start = ranges.split(",")[0].split("-")[0]
    return f"{prefix}{start}{suffix}"


def read_launch_env(env=None) -> LaunchEnv:
    """Parse the environment of the current process (or ``env``) into a :class:`LaunchEnv`."""
    env = os.environ if env is None else env
    if "RANK" in env or "WORLD_SIZE" in env:
        missing = [k for k in ("RANK", "WORLD_SIZE") if k not in env]
        if missing:
            raise LaunchEnvError(f"torchrun-style launch but {', '.join(missing)} is not set")
        rank, world = _int_var(env, "RANK"), _int_var(env, "WORLD_SIZE")
        local_rank = _int_var(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        port = _int_var(env, "MASTER_PORT") if "MASTER_PORT" in env else DEFAULT_MASTER_PORT
        launcher = "torchrun"
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = _int_var(env, "SLURM_PROCID"), _int_var(env, "SLURM_NTASKS")
        local_rank = _int_var(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if "MASTER_ADDR" in env:
            addr = env["MASTER_ADDR"]
        elif nodelist:
            addr = first_slurm_host(nodelist)
        else:
            raise LaunchEnvError("Slurm launch without SLURM_NODELIST or MASTER_ADDR")
        if "MASTER_PORT" in env:
            port = _int_var(env, "MASTER_PORT")
        else:
            # Derive the port from the job id so two jobs sharing a node do not collide.
            job = int(env.get("SLURM_JOB_ID", "0") or 0)
            port = 20000 + job % 20000
        launcher = "slurm"
    else:
        rank, world, local_rank = 0, 1, 0
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        port = _int_var(env, "MASTER_PORT") if "MASTER_PORT" in env else DEFAULT_MASTER_PORT
        launcher = "single"
    if world < 1 or not 0 <= rank < world:
        raise LaunchEnvError(f"rank {rank} is outside a world of size {world}")
    if local_rank < 0:
        raise LaunchEnvError(f"local rank {local_rank} is negative")
    return LaunchEnv(rank, world, local_rank, addr, port, launcher)


# What a collective raises on a rank whose peer has died (gloo's TCP pairs, NCCL's watchdog):
# such a rank is a victim; the error that ended the job is the dead peer's.
_PEER_FAILURE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                 "remote process exited", "NCCL communicator was aborted")


def is_peer_failure(err: BaseException) -> bool:
    """Whether ``err`` says that another rank of the job went away (not this rank's own fault)."""
    text = str(err)
    return any(marker in text for marker in _PEER_FAILURE)
