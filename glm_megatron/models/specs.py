"""GLM layer specs for Megatron's ``GPTModel`` (MoE and dense families).

Transformer Engine specs on GPU when TE is installed (fused layernorm-linear, grouped experts);
Megatron's local specs otherwise, with :class:`GLMRMSNorm` in every norm slot so sequence
parallelism works without TE (Megatron's ``WrappedTorchNorm`` refuses it), and
:class:`SDPAttention` (torch's fused attention) as the core attention.

A hand-built block spec lists only the current pipeline stage's layers, exactly as
``get_gpt_decoder_block_spec`` does; listing all layers would give each stage the whole model and
checkpoint shard offsets would come out wrong.

The ``glm4`` family's sandwich norms swap the layer class for :class:`.sandwich.SandwichNormLayer`
in every layer spec, on both paths.
"""

from __future__ import annotations

import copy

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_block_spec,
    get_gpt_layer_local_spec,
    get_gpt_mtp_block_spec,
)
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from .attention import SDPAttention
from .norm import GLMRMSNorm
from .sandwich import SandwichNormLayer


def use_transformer_engine() -> bool:
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def _local_layer_spec(config: TransformerConfig, moe: bool):
    spec = copy.deepcopy(
        get_gpt_layer_local_spec(
            num_experts=config.num_moe_experts if moe else None,
            moe_grouped_gemm=False,
            qk_layernorm=config.qk_layernorm,
            normalization="RMSNorm",
        )
    )
    sub = spec.submodules
    sub.input_layernorm = GLMRMSNorm
    sub.pre_mlp_layernorm = GLMRMSNorm
    attn = sub.self_attention.submodules
    attn.core_attention = SDPAttention
    if config.qk_layernorm:
        attn.q_layernorm = GLMRMSNorm
        attn.k_layernorm = GLMRMSNorm
    else:
        attn.q_layernorm = IdentityOp
        attn.k_layernorm = IdentityOp
    return spec


def _local_block_spec(config: TransformerConfig, vp_stage: int | None) -> TransformerBlockSubmodules:
    dense, moe = _local_layer_spec(config, False), None
    pattern = config.moe_layer_freq if config.num_moe_experts else [0] * config.num_layers
    if config.num_moe_experts:
        moe = _local_layer_spec(config, True)
    layer_specs = [moe if is_moe else dense for is_moe in pattern]
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(
        layer_specs=layer_specs[offset : offset + count], layer_norm=GLMRMSNorm
    )


def _with_sandwich_norms(block: TransformerBlockSubmodules) -> TransformerBlockSubmodules:
    block = copy.deepcopy(block)
    for layer in block.layer_specs:
        layer.module = SandwichNormLayer
    return block


def glm_block_spec(config: TransformerConfig, vp_stage: int | None = None, *,
                   sandwich_norms: bool = False):
    """The decoder block spec of this pipeline stage (and virtual stage)."""
    if use_transformer_engine():
        block = get_gpt_decoder_block_spec(
            config, use_transformer_engine=True, normalization="RMSNorm", vp_stage=vp_stage
        )
    else:
        block = _local_block_spec(config, vp_stage)
    return _with_sandwich_norms(block) if sandwich_norms else block


def glm_mtp_block_spec(config: TransformerConfig, block_spec, vp_stage: int | None = None):
    """The MTP block spec (None when this stage builds no MTP layer or MTP is off)."""
    if not config.mtp_num_layers:
        return None
    te = use_transformer_engine()
    if not te:
        # The MTP transformer layer is a full MoE decoder layer, whatever this stage holds.
        block_spec = TransformerBlockSubmodules(
            layer_specs=[_local_layer_spec(config, bool(config.num_moe_experts))],
            layer_norm=GLMRMSNorm,
        )
    spec = get_gpt_mtp_block_spec(config, block_spec, use_transformer_engine=te, vp_stage=vp_stage)
    if spec is None or te:
        return spec
    spec = copy.deepcopy(spec)
    for layer in spec.layer_specs:
        layer.submodules.enorm = GLMRMSNorm
        layer.submodules.hnorm = GLMRMSNorm
        layer.submodules.layer_norm = GLMRMSNorm
    return spec
