"""GLMConfig + ParallelLayout -> Megatron-Core ``TransformerConfig`` (docs/ARCHITECTURE.md §6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from ..parallel.layout import ParallelLayout
from .config import GLMConfig


def to_transformer_config(
    cfg: GLMConfig,
    layout: ParallelLayout,
    *,
    params_dtype: torch.dtype = torch.float32,
    use_cpu_initialization: bool | None = None,
    build_mtp: bool = False,
    hidden_dropout: float = 0.0,
    attention_dropout: float = 0.0,
    recompute_granularity: str | None = None,
    **overrides,
) -> TransformerConfig:
    """Translate the HF-named GLM config into Megatron's TransformerConfig for ``layout``.

    Dropouts default to 0.0 (the seeds' SFT setting, and what GLM was trained with); Megatron's
    own default of 0.1 would also cost ~30 % throughput on CPU (docs/ARCHITECTURE.md §8).
    """
    cuda = torch.cuda.is_available()
    if use_cpu_initialization is None:
        use_cpu_initialization = not cuda
    moe = {}
    if cfg.is_moe:
        moe = dict(
            num_moe_experts=cfg.n_routed_experts,
            moe_ffn_hidden_size=cfg.moe_intermediate_size,
            moe_router_topk=cfg.num_experts_per_tok,
            moe_layer_freq=cfg.moe_layer_pattern,
            moe_shared_expert_intermediate_size=cfg.moe_intermediate_size * cfg.n_shared_experts,
            # GLM: sigmoid scores; the fp32 expert bias only chooses experts; weights are the
            # unbiased scores normalised over the top-k, times the scaling factor.
            moe_router_score_function="sigmoid",
            moe_router_enable_expert_bias=True,
            # Post-training keeps the pretrained bias frozen and uses no auxiliary loss.
            moe_router_bias_update_rate=0.0,
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
            moe_router_topk_scaling_factor=cfg.routed_scaling_factor,
            moe_router_dtype="fp32",
            # The alltoall dispatcher creates CUDA streams at construction; allgather is the
            # one that runs on gloo.
            moe_token_dispatcher_type="alltoall" if cuda else "allgather",
            moe_grouped_gemm=False,
        )
    pp = layout.pp
    config = TransformerConfig(
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_key_value_heads,
        kv_channels=cfg.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=cfg.attention_bias,
        qk_layernorm=cfg.use_qk_norm,
        # Dense GLM-4 rotates adjacent channel pairs; GLM-4.5/4.6 the two rotary halves.
        rotary_interleaved=cfg.family.rotary_interleaved,
        hidden_dropout=hidden_dropout,
        attention_dropout=attention_dropout,
        init_method_std=cfg.initializer_range,
        # Parallelism.
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline_model_parallel_size,
        context_parallel_size=layout.cp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
        sequence_parallel=layout.sequence_parallel,
        num_layers_in_first_pipeline_stage=layout.num_layers_in_first_pipeline_stage,
        num_layers_in_last_pipeline_stage=layout.num_layers_in_last_pipeline_stage,
        pipeline_dtype=params_dtype if pp > 1 else None,
        # Precision and devices.
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        use_cpu_initialization=use_cpu_initialization,
        # Fusions that need Apex / TE / CUDA stay off unless running on GPU with TE.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        bias_dropout_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        recompute_granularity=recompute_granularity,
        recompute_method="uniform" if recompute_granularity == "full" else None,
        recompute_num_layers=1 if recompute_granularity == "full" else None,
        mtp_num_layers=(cfg.num_nextn_predict_layers or None) if build_mtp else None,
        **moe,
        **overrides,
    )
    return config
