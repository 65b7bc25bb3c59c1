"""The shared training engine: one trainable Megatron model with its optimizer and schedule.

The SFT, reward-model and PPO trainers all drive an :class:`Engine`: they hand it micro-batches
and a ``forward_step(model, batch) -> (output, loss_func)`` (Megatron's contract, the loss
function returning ``(sum, token_count, report)``), and the engine runs Megatron's
forward/backward schedule (pipeline-parallel when PP > 1), finalizes gradients, clips, steps the
optimizer and the LR schedule. Several engines (policy, value) can live in one process: nothing
here is global except Megatron's parallel state.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from .config import OptimConfig
from .lr_schedule import build_scheduler, current_lr
from .optimizer import build_optimizer, wrap_ddp


class ModelRunner:
    """Runs micro-batches through a model's chunks with Megatron's schedule (no optimizer):
    evaluation, frozen models (PPO's reference and reward models)."""

    def __init__(self, modules: list[torch.nn.Module]):
        self.modules = modules  # unwrapped chunks: checkpoints use their keys
        self.model = modules

    def train(self, mode: bool = True) -> None:
        for m in self.model:
            m.train(mode)

    def forward_backward(self, microbatches: list[dict], forward_step: Callable, *,
                         forward_only: bool = False) -> list:
        """Run the schedule over ``microbatches``; returns the loss reports (last PP stage)."""
        first = microbatches[0]["tokens"]

        def step(data_iterator, model):
            return forward_step(model, next(data_iterator))

        if len(self.model) > 1:
            data = [iter(microbatches) for _ in self.model]
        else:
            data = iter(microbatches)
        return get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=data,
            model=self.model,
            num_microbatches=len(microbatches),
            seq_length=first.shape[1],
            micro_batch_size=first.shape[0],
            forward_only=forward_only,
        )

    @torch.no_grad()
    def eval_step(self, microbatches: list[dict], forward_step: Callable) -> list:
        self.train(False)
        try:
            return self.forward_backward(microbatches, forward_step, forward_only=True)
        finally:
            self.train(True)


class Engine(ModelRunner):
    """A trainable model: Megatron DDP chunks, the optimizer and the LR schedule."""

    def __init__(self, modules: list[torch.nn.Module], tconfig, t: OptimConfig, total_steps: int,
                 adapter_base: dict | None = None):
        super().__init__(modules)
        self.tconfig = tconfig
        # A LoRA model on named base weights (model_setup.adapter_base): its checkpoints hold
        # the adapters and name the base instead of copying it.
        self.adapter_base = adapter_base
        self.model = wrap_ddp(modules, tconfig, t)
        self.optimizer = build_optimizer(self.model, t, bf16=tconfig.bf16)
        self.scheduler = build_scheduler(self.optimizer, t, total_steps)
        tconfig.grad_scale_func = self.optimizer.scale_loss
        tconfig.finalize_model_grads_func = finalize_model_grads

    def train_step(self, microbatches: list[dict], forward_step: Callable, *,
                   skip_nonfinite: bool = False) -> dict:
        """One optimizer step over a global batch; returns grad norm, lr and the loss reports.

        ``skip_nonfinite``: when any rank's gradients hold a NaN/inf, skip the update (and the
        LR schedule) on every rank instead of writing NaN into the weights.
        """
        self.train(True)
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        lr = current_lr(self.optimizer)
        reports = self.forward_backward(microbatches, forward_step)
        if skip_nonfinite and not grads_finite(self.model):
            return {"reports": reports, "grad_norm": float("nan"), "lr": lr, "skipped": True}
        ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(1)
        return {"reports": reports, "grad_norm": float(grad_norm or 0.0), "lr": lr,
                "skipped": not ok}


def grads_finite(ddp_chunks: list) -> bool:
    """True when no rank's reduced gradient buffers hold a NaN/inf (collective, whole world)."""
    bad = 0.0
    for m in ddp_chunks:
        for buffer in m.buffers + m.expert_parallel_buffers:
            if not bool(torch.isfinite(buffer.grad_data).all()):
                bad = 1.0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    flag = torch.tensor([bad], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return float(flag) == 0.0


def sum_reports(reports: list, key: str, width: int = 2) -> torch.Tensor:
    """Sum one key of Megatron loss reports over micro-batches and data-parallel ranks.

    Reports exist on the last pipeline stage only, once per TP/CP group member; only one member
    per data-parallel replica contributes, then a world all-reduce gives every rank the total.
    """
    total = torch.zeros(width, dtype=torch.float64)
    contributes = (ps.is_pipeline_last_stage(ignore_virtual=True)
                   and ps.get_tensor_model_parallel_rank() == 0
                   and ps.get_context_parallel_rank() == 0)
    if contributes:
        for r in reports:
            total += r[key].detach().to(torch.float64).cpu()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    total = total.to(device)
    dist.all_reduce(total)
    return total.cpu()
