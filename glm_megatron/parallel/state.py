"""Bring up (and tear down) the process group, Megatron's parallel_state and the RNG trackers.

One call, :func:`initialize_parallel`, is what every trainer, tool and distributed test uses:
it reads the launcher's environment, picks NCCL + CUDA when a GPU is present and gloo + CPU
otherwise, validates the layout against the model, initializes Megatron-Core's model-parallel
groups and seeds its RNG trackers. Without CUDA it needs the CPU support of :mod:`.cpu_compat`,
which the program's entry point installs (:func:`~.cpu_compat.install_cpu_support`); it is never
installed here.
"""

from __future__ import annotations

import datetime
import logging
import os
import random
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import cpu_compat
from .launch_env import LaunchEnv, read_launch_env
from .layout import ModelShape, ParallelLayout, validate_layout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParallelContext:
    """What the rest of the engine needs to know about this process's place in the job."""

    env: LaunchEnv
    layout: ParallelLayout  # validated, with implied settings (e.g. sequence parallel) applied
    backend: str
    device: torch.device

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0


def have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def initialize_parallel(
    layout: ParallelLayout,
    model_shape: ModelShape | None = None,
    *,
    seed: int = 1234,
    training: bool = True,
    timeout_minutes: int = 30,
    env: LaunchEnv | None = None,
) -> ParallelContext:
    """Initialize torch.distributed and Megatron-Core for ``layout``; return the context.

    The layout is validated before any process group exists, so an impossible layout fails
    fast on every rank with the same message. Without CUDA, raises
    :class:`~.cpu_compat.CpuSupportError` unless the entry point called ``install_cpu_support()``.
    """
    cpu_compat.require_runtime_support("initialize_parallel")
    env = env or read_launch_env()
    cuda = torch.cuda.is_available()
    layout = validate_layout(
        layout, env.world_size, model_shape, training=training, cuda=cuda,
        have_transformer_engine=have_transformer_engine(),
    )
    if cuda:
        backend = "nccl"
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        backend = "gloo"
        device = torch.device("cpu")

    if not dist.is_initialized():
        # Slurm's srun does not export these; torch's env:// rendezvous needs them.
        os.environ.setdefault("MASTER_ADDR", env.master_addr)
        os.environ.setdefault("MASTER_PORT", str(env.master_port))
        dist.init_process_group(
            backend=backend,
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )

    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline_model_parallel_size,
        context_parallel_size=layout.cp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
        distributed_timeout_minutes=timeout_minutes,
        # Megatron's gloo side-groups are only needed by NCCL jobs for CPU-side collectives; on
        # a gloo job every group already is one.
        create_gloo_process_groups=cuda,
    )
    seed_everything(seed)
    ctx = ParallelContext(env=env, layout=layout, backend=backend, device=device)
    if ctx.is_main:
        log.info(
            "parallel: %s, world %d (DP=%d), backend %s",
            layout.describe(), env.world_size, layout.data_parallel_size(env.world_size), backend,
        )
    return ctx


def seed_everything(seed: int) -> None:
    """Seed Python, torch and Megatron's RNG trackers (default / tensor-parallel / expert).

    Megatron offsets the tensor-parallel and expert streams by TP / EP rank, so dropout inside
    a TP region differs across TP ranks while the data-parallel stream is the same.
    """
    from megatron.core import tensor_parallel

    random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_parallel() -> None:
    """Tear down Megatron's groups and the default process group; safe to call twice."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
