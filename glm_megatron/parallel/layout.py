"""The parallel layout (TP / PP / VPP / CP / EP / ETP / SP) and its validation.

Every impossible layout is refused *before* any process group or model exists, with a message
that says which sizes clash and what would work. Validation needs the model's shape, so it takes a
:class:`ModelShape` (heads, KV groups, experts, layers, vocab) rather than a whole model config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


class LayoutError(ValueError):
    """A parallel layout that cannot work for this world size or model."""


@dataclass(frozen=True)
class ModelShape:
    """The model facts a layout must respect."""

    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    num_moe_experts: int | None  # None for a dense model
    vocab_size: int
    mtp_num_layers: int = 0


@dataclass(frozen=True)
class ParallelLayout:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    context_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    # None: Megatron's default, the expert layers use the dense TP size.
    expert_tensor_parallel_size: int | None = None
    sequence_parallel: bool = False
    # Uneven pipelines: the first / last stage may hold fewer layers (embedding / loss live there).
    num_layers_in_first_pipeline_stage: int | None = None
    num_layers_in_last_pipeline_stage: int | None = None

    @property
    def tp(self) -> int:
        return self.tensor_model_parallel_size

    @property
    def pp(self) -> int:
        return self.pipeline_model_parallel_size

    @property
    def cp(self) -> int:
        return self.context_parallel_size

    @property
    def ep(self) -> int:
        return self.expert_model_parallel_size

    @property
    def etp(self) -> int:
        if self.expert_tensor_parallel_size is None:
            return self.tensor_model_parallel_size
        return self.expert_tensor_parallel_size

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.tp * self.pp * self.cp)

    def describe(self) -> str:
        text = f"TP={self.tp} PP={self.pp} CP={self.cp} EP={self.ep} ETP={self.etp}"
        if self.virtual_pipeline_model_parallel_size:
            text += f" VPP={self.virtual_pipeline_model_parallel_size}"
        return text + (" +SP" if self.sequence_parallel else "")


def minimal_world_size(layout: ParallelLayout) -> int:
    """The smallest world in which TP×CP and EP×ETP both tile every pipeline stage."""
    per_stage = math.lcm(layout.tp * layout.cp, layout.ep * layout.etp)
    return per_stage * layout.pp


def pipeline_stage_layer_counts(layout: ParallelLayout, num_layers: int) -> list[int]:
    """Layers per pipeline stage, honouring uneven first/last stages. Raises LayoutError."""
    pp = layout.pp
    first = layout.num_layers_in_first_pipeline_stage
    last = layout.num_layers_in_last_pipeline_stage
    if pp == 1:
        if first is not None or last is not None:
            raise LayoutError("num_layers_in_first/last_pipeline_stage needs pipeline size > 1")
        return [num_layers]
    fixed = [c for c in (first, last) if c is not None]
    if any(c < 0 for c in fixed):
        raise LayoutError("num_layers_in_first/last_pipeline_stage must be >= 0")
    middle_stages = pp - len(fixed)
    remaining = num_layers - sum(fixed)
    if remaining < 0 or (middle_stages == 0 and remaining != 0):
        raise LayoutError(
            f"the first/last pipeline stages ({first}, {last}) do not add up to {num_layers} layers"
        )
    if middle_stages and remaining % middle_stages:
        hint = "" if fixed else (
            " (set num_layers_in_first_pipeline_stage / num_layers_in_last_pipeline_stage for an"
            " uneven split)"
        )
        raise LayoutError(
            f"pipeline size {pp} does not split {remaining} layers evenly over {middle_stages} "
            f"stages{hint}"
        )
    per_stage = remaining // middle_stages if middle_stages else 0
    counts = [per_stage] * pp
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    vpp = layout.virtual_pipeline_model_parallel_size
    if vpp:
        for stage, count in enumerate(counts):
            if count % vpp:
                raise LayoutError(
                    f"pipeline stage {stage} has {count} layers, not divisible by the virtual "
                    f"pipeline size {vpp}"
                )
    return counts


def validate_layout(
    layout: ParallelLayout,
    world_size: int,
    model: ModelShape | None = None,
    *,
    training: bool = True,
    cuda: bool = False,
    have_transformer_engine: bool = False,
) -> ParallelLayout:
    """Check ``layout`` against the world size and model; return it with implied settings on.

    Raises :class:`LayoutError` listing every problem found. The only setting changed is
    sequence parallelism, which Megatron requires for MoE with TP > 1 in training.
    """
    problems: list[str] = []
    sizes = {
        "tensor_model_parallel_size": layout.tp,
        "pipeline_model_parallel_size": layout.pp,
        "context_parallel_size": layout.cp,
        "expert_model_parallel_size": layout.ep,
        "expert_tensor_parallel_size": layout.etp,
    }
    for name, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            problems.append(f"{name} must be a positive integer, got {value!r}")
    if problems:
        raise LayoutError("invalid parallel layout:\n  - " + "\n  - ".join(problems))

    model_parallel = layout.tp * layout.pp * layout.cp
    if world_size % model_parallel:
        problems.append(
            f"world size {world_size} is not divisible by TP×PP×CP = {layout.tp}×{layout.pp}×"
            f"{layout.cp} = {model_parallel}"
        )
    else:
        # Megatron builds the expert groups inside each pipeline stage: EP×ETP must tile the
        # ranks of one stage, exactly as TP×CP×DP does.
        ranks_per_stage = world_size // layout.pp
        if ranks_per_stage % (layout.ep * layout.etp):
            problems.append(
                f"EP×ETP = {layout.ep}×{layout.etp} does not fit the {ranks_per_stage} ranks of a "
                f"pipeline stage (world size {world_size} / PP {layout.pp})"
            )
    vpp = layout.virtual_pipeline_model_parallel_size
    if vpp is not None and (vpp < 1 or layout.pp < 2):
        problems.append(f"virtual pipeline size {vpp} needs pipeline size > 1 and vpp >= 1")
    if layout.cp > 1 and not have_transformer_engine:
        problems.append(
            f"context parallelism (CP={layout.cp}) needs Transformer Engine attention; it is not "
            "installed (pip install 'glm_megatron[gpu]')"
        )
    if layout.sequence_parallel and layout.tp == 1:
        # Megatron silently ignores it; say so instead of pretending.
        layout = replace(layout, sequence_parallel=False)

    if model is not None:
        problems += _model_problems(layout, model)
        is_moe = bool(model.num_moe_experts)
        if is_moe and layout.tp > 1 and training and not layout.sequence_parallel:
            layout = replace(layout, sequence_parallel=True)

    if problems:
        raise LayoutError(
            f"invalid parallel layout {layout.describe()} for world size {world_size}:\n  - "
            + "\n  - ".join(problems)
        )
    return layout


def _model_problems(layout: ParallelLayout, model: ModelShape) -> list[str]:
    problems = []
    if model.num_attention_heads % layout.tp:
        problems.append(
            f"TP={layout.tp} does not divide the {model.num_attention_heads} attention heads"
        )
    if model.num_query_groups % layout.tp:
        problems.append(
            f"TP={layout.tp} does not divide the {model.num_query_groups} KV groups "
            f"(TP can be at most {model.num_query_groups} and must divide it)"
        )
    if model.vocab_size % layout.tp:
        problems.append(
            f"TP={layout.tp} does not divide the vocabulary size {model.vocab_size}"
        )
    if model.num_moe_experts:
        if model.num_moe_experts % layout.ep:
            problems.append(
                f"EP={layout.ep} does not divide the {model.num_moe_experts} routed experts"
            )
    elif layout.ep > 1:
        problems.append(f"EP={layout.ep} but the model is dense (no routed experts): "
                        "expert_model_parallel_size must be 1")
    try:
        pipeline_stage_layer_counts(layout, model.num_layers)
    except LayoutError as err:
        problems.append(str(err))
    return problems
