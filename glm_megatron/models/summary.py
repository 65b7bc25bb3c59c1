"""Parameter counts and per-rank memory of a GLM model at a layout, without any real weights.

Each pipeline stage's model is built by the real builder on the ``meta`` device, for one rank of
that stage, inside a *fake* process group of the layout's world size (``torch.distributed``'s
``fake`` backend: groups exist, no communication happens). So the counts are those of the model
the trainers build, and the 355B model is summarised on a laptop in seconds.

With LoRA settings, :func:`attach_lora` adds its adapters to the same meta model (so the counts
are what the trainers create, equal to PEFT's) and the memory is that of a LoRA run: the frozen
base holds bf16 weights only, the adapters train like any parameter.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..parallel import cpu_compat
from ..parallel.layout import ParallelLayout, minimal_world_size, validate_layout
from .builder import build_gpt_model
from .config import GLMConfig, model_shape
from .lora import LoraSettings, attach_lora
from .lora_names import is_adapter_param
from .megatron_config import to_transformer_config

# bf16 weight + fp32 main grad; fp32 master weight + Adam m + v (sharded with the distributed
# optimizer over the data-parallel ranks that hold the same parameter).
WEIGHT_GRAD_BYTES = 2 + 4
OPTIMIZER_BYTES = 4 + 4 + 4
# LoRA: the frozen base keeps its bf16 weights only (no gradient, no optimizer state).
FROZEN_BYTES = 2


@dataclass
class StageSummary:
    stage: int
    params: int = 0  # on one rank of this stage
    expert_params: int = 0  # routed-expert part of ``params``
    mtp_params: int = 0  # MTP part of ``params``
    weight_grad_bytes: int = 0
    optimizer_bytes: int = 0
    # With LoRA: this rank's adapter parameters and the memory of a LoRA run on this rank.
    adapter_params: int = 0
    frozen_bytes: int = 0  # the base (``params``) as frozen bf16 weights
    adapter_weight_grad_bytes: int = 0
    adapter_optimizer_bytes: int = 0


@dataclass
class ModelSummary:
    layout: ParallelLayout
    world_size: int
    total_params: int = 0  # the model without MTP (what HF transformers builds)
    mtp_params: int = 0
    routed_expert_params: int = 0
    active_params: int = 0  # per token: shared parts + top-k of the routed experts
    embedding_params: int = 0  # input embedding + output layer (in total and active)
    stages: list[StageSummary] = field(default_factory=list)
    lora: LoraSettings | None = None
    adapter_params: int = 0  # every adapter parameter once (what PEFT counts as trainable)


def summarize(cfg: GLMConfig, layout: ParallelLayout, *, world_size: int = 0,
              include_mtp: bool = True, lora: LoraSettings | None = None) -> ModelSummary:
    """Counts and per-rank memory; with ``lora`` (targets resolved, see ``resolve_targets``)
    also the adapters and a LoRA run's memory."""
    world = world_size or minimal_world_size(layout)
    layout = validate_layout(layout, world, model_shape(cfg), training=True)
    if dist.is_initialized():
        raise RuntimeError("summarize() needs its own fake process group; call it before init")
    cpu_compat.require_runtime_support("summarize()")
    from megatron.core import parallel_state as ps
    from torch.testing._internal.distributed.fake_pg import FakeStore

    result = ModelSummary(layout=layout, world_size=world, lora=lora)
    ranks_per_stage = world // layout.pp
    dp = world // (layout.tp * layout.cp * layout.pp)
    expert_dp = world // (layout.ep * layout.etp * layout.pp)
    for stage in range(layout.pp):
        dist.init_process_group("fake", store=FakeStore(), rank=stage * ranks_per_stage,
                                world_size=world)
        try:
            ps.initialize_model_parallel(
                tensor_model_parallel_size=layout.tp,
                pipeline_model_parallel_size=layout.pp,
                context_parallel_size=layout.cp,
                expert_model_parallel_size=layout.ep,
                expert_tensor_parallel_size=layout.etp,
                create_gloo_process_groups=False,
            )
            tconfig = to_transformer_config(
                cfg, layout, params_dtype=torch.bfloat16, build_mtp=include_mtp,
                use_cpu_initialization=True,
            )
            with torch.device("meta"):
                model = build_gpt_model(cfg, tconfig)
            summary = _count_stage(stage, model, layout, result, dp, expert_dp)
            if lora is not None:
                # The distributed optimizer shards non-expert parameters over DP x CP, expert
                # ones over expert DP.
                _count_adapters(summary, model, cfg, lora, layout, result, dp * layout.cp, expert_dp)
            result.stages.append(summary)
        finally:
            ps.destroy_model_parallel()
            dist.destroy_process_group()
    if cfg.is_moe:
        idle = result.routed_expert_params * (1 - cfg.num_experts_per_tok / cfg.n_routed_experts)
        result.active_params = result.total_params - round(idle)
    else:
        result.active_params = result.total_params
    return result


def _count_stage(stage, model, layout, result, dp, expert_dp) -> StageSummary:
    s = StageSummary(stage=stage)
    optimizer = 0.0
    for name, param in model.named_parameters():
        n = param.numel()
        expert = ".mlp.experts." in name
        split = getattr(param, "tensor_model_parallel", False)
        # How many ranks of the stage hold a different piece of this parameter.
        pieces = (layout.ep * (layout.etp if split else 1)) if expert else (layout.tp if split else 1)
        s.params += n
        optimizer += n * OPTIMIZER_BYTES / (expert_dp if expert else dp)
        if expert:
            s.expert_params += n
        if name.startswith("mtp."):
            s.mtp_params += n
            result.mtp_params += n * pieces
            continue
        # With MTP the last stage holds a copy of the word embedding (tied to the first
        # stage's, kept in sync by Megatron): memory on that rank, but not another parameter.
        if name.startswith("embedding.") and stage > 0:
            continue
        result.total_params += n * pieces
        if expert:
            result.routed_expert_params += n * pieces
        if name.startswith(("embedding.", "output_layer.")):
            result.embedding_params += n * pieces
    s.weight_grad_bytes = s.params * WEIGHT_GRAD_BYTES
    s.optimizer_bytes = round(optimizer)
    return s


def _count_adapters(s: StageSummary, model, cfg, lora, layout, result, dp_cp, expert_dp) -> None:
    """Attach the adapters to this stage's meta model as the trainers do and count them."""
    with torch.device("meta"):  # A's random init and B's zeros: no memory
        created = attach_lora([model], cfg, lora)
    adapters = [(n, p) for n, p in model.named_parameters() if is_adapter_param(n)]
    assert sum(p.numel() for _, p in adapters) == created, "adapters not found by name"
    optimizer = 0.0
    for _, p in adapters:
        split = getattr(p, "tensor_model_parallel", False)
        if getattr(p, "allreduce", True) is False:
            # A routed expert's: its expert lives on one EP rank; split over expert TP when
            # marked so with expert TP > 1. The distributed optimizer shards it over expert DP.
            pieces = layout.ep * (layout.etp if split and layout.etp > 1 else 1)
            optimizer += p.numel() * OPTIMIZER_BYTES / expert_dp
        else:
            # Column adapters' B and row adapters' A are split over TP, the rest replicated.
            pieces = layout.tp if split else 1
            optimizer += p.numel() * OPTIMIZER_BYTES / dp_cp
        result.adapter_params += p.numel() * pieces
    s.adapter_params = created
    s.frozen_bytes = s.params * FROZEN_BYTES
    s.adapter_weight_grad_bytes = created * WEIGHT_GRAD_BYTES
    s.adapter_optimizer_bytes = round(optimizer)


def format_summary(summary: ModelSummary, name: str) -> str:
    gib = 1024**3
    lines = [
        f"model: {name}",
        f"layout: {summary.layout.describe()}  (world size {summary.world_size}, "
        f"DP={summary.layout.data_parallel_size(summary.world_size)})",
        f"total parameters:        {summary.total_params:>18,}  ({summary.total_params / 1e9:.2f} B)",
        f"  routed experts:        {summary.routed_expert_params:>18,}",
        f"active per token:        {summary.active_params:>18,}  ({summary.active_params / 1e9:.2f} B)",
        f"  without embedding and output layer: "
        f"{summary.active_params - summary.embedding_params:,} "
        f"({(summary.active_params - summary.embedding_params) / 1e9:.2f} B)",
        f"MTP layer(s), separate:  {summary.mtp_params:>18,}  ({summary.mtp_params / 1e9:.2f} B)",
        "",
        "per rank (one rank of each pipeline stage; bf16 weights + fp32 grads, fp32 master + Adam"
        " m/v sharded by the distributed optimizer over DP):",
        f"{'stage':>5} {'params':>16} {'experts':>16} {'MTP':>12} {'weights+grads':>14} "
        f"{'optimizer':>10} {'total':>10}",
    ]
    for s in summary.stages:
        total = s.weight_grad_bytes + s.optimizer_bytes
        lines.append(
            f"{s.stage:>5} {s.params:>16,} {s.expert_params:>16,} {s.mtp_params:>12,} "
            f"{s.weight_grad_bytes / gib:>11.1f} GiB {s.optimizer_bytes / gib:>6.1f} GiB "
            f"{total / gib:>6.1f} GiB"
        )
    lines.append("(activations, KV caches and framework buffers come on top)")
    if summary.lora is not None:
        lines += ["", *_format_lora(summary)]
    return "\n".join(lines)


def _format_lora(summary: ModelSummary) -> list[str]:
    gib, mib = 1024**3, 1024**2
    lora = summary.lora
    share = 100 * summary.adapter_params / max(summary.total_params, 1)
    lines = [
        f"LoRA r={lora.r} on {', '.join(lora.targets)} (base frozen):",
        f"trainable (adapter) parameters: {summary.adapter_params:>11,}  "
        f"({summary.adapter_params / 1e6:.2f} M, {share:.3f} % of the total)",
        "",
        "per rank with LoRA (frozen base: bf16 weights, no grads, no optimizer state; adapters: "
        "bf16 weights + fp32 grads, fp32 master + Adam m/v sharded by the distributed optimizer"
        " over DP x CP):",
        f"{'stage':>5} {'adapter params':>16} {'frozen weights':>15} {'adapters+grads':>15} "
        f"{'optimizer':>12} {'total':>10}",
    ]
    for s in summary.stages:
        total = s.frozen_bytes + s.adapter_weight_grad_bytes + s.adapter_optimizer_bytes
        lines.append(
            f"{s.stage:>5} {s.adapter_params:>16,} {s.frozen_bytes / gib:>11.2f} GiB "
            f"{s.adapter_weight_grad_bytes / mib:>11.1f} MiB {s.adapter_optimizer_bytes / mib:>8.1f} "
            f"MiB {total / gib:>6.2f} GiB"
        )
    return lines
