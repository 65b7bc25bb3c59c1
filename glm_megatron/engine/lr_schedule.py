"""Learning-rate schedule: linear warmup (``warmup_ratio`` of the run) then cosine / linear decay
to ``min_learning_rate``, or constant. Megatron's ``OptimizerParamScheduler`` does the work; it
counts optimizer steps here (increment 1 per step), and its state goes into every checkpoint.
"""

from __future__ import annotations

import math

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from .config import OptimConfig


def warmup_steps(t: OptimConfig, total_steps: int) -> int:
    if t.warmup_steps is not None:
        steps = t.warmup_steps
    else:
        steps = math.ceil(t.warmup_ratio * total_steps)
    # Megatron requires warmup < decay steps.
    return min(steps, max(total_steps - 1, 0))


def build_scheduler(optimizer, t: OptimConfig, total_steps: int) -> OptimizerParamScheduler:
    warm = warmup_steps(t, total_steps)
    init_lr = 0.0 if warm else t.learning_rate
    sched = OptimizerParamScheduler(
        optimizer,
        init_lr=init_lr,
        max_lr=t.learning_rate,
        min_lr=t.min_learning_rate if t.lr_scheduler != "constant" else t.learning_rate,
        lr_warmup_steps=warm,
        lr_decay_steps=max(total_steps, 1),
        lr_decay_style=t.lr_scheduler,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
        # The checkpoint is the truth on resume (a resumed run must equal an uninterrupted one).
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
    )
    # Megatron's counter holds the step whose lr is set: after k optimizer steps it is k + 1,
    # so the first update uses lr(1) (not init_lr, which would waste step 1 at lr 0).
    sched.step(1)
    return sched


def current_lr(optimizer) -> float:
    for group in optimizer.param_groups:
        if group.get("default_config", True):
            return float(group["lr"])
    return float(optimizer.param_groups[0]["lr"])
