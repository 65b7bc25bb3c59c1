"""Build a GLM model as Megatron-Core's ``GPTModel`` for this rank's place in the layout."""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from .config import GLMConfig
from .specs import glm_block_spec, glm_mtp_block_spec


def build_gpt_model(
    cfg: GLMConfig,
    tconfig: TransformerConfig,
    *,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    vp_stage: int | None = None,
    parallel_output: bool = True,
) -> GPTModel:
    """One model chunk. ``pre_process``/``post_process`` default to this rank's pipeline stage."""
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    block_spec = glm_block_spec(tconfig, vp_stage=vp_stage,
                                sandwich_norms=cfg.family.sandwich_norms)
    mtp_spec = glm_mtp_block_spec(tconfig, block_spec, vp_stage=vp_stage)
    model = GPTModel(
        config=tconfig,
        transformer_layer_spec=block_spec,
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=cfg.partial_rotary_factor,
        rotary_base=int(cfg.rope_theta),
        mtp_block_spec=mtp_spec,
        vp_stage=vp_stage,
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model


def build_model_chunks(cfg: GLMConfig, tconfig: TransformerConfig, **kwargs) -> list[GPTModel]:
    """All model chunks of this rank: one, or ``vpp`` of them with virtual pipelining."""
    vpp = tconfig.virtual_pipeline_model_parallel_size
    if not vpp:
        return [build_gpt_model(cfg, tconfig, **kwargs)]
    return [build_gpt_model(cfg, tconfig, vp_stage=i, **kwargs) for i in range(vpp)]
