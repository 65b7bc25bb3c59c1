"""Megatron DDP wrapping, parameter freezing and the (distributed) AdamW optimizer.

Gradients are reduced in fp32 and, with ``calculate_per_token_loss`` on the model config, summed
(not averaged) over data-parallel ranks and divided once by the global number of loss tokens in
``finalize_model_grads``: the update is the gradient of the mean loss over every supervised token
of the global batch, whatever the layout. That is what makes TP/EP/PP runs equal a TP=1 run.
"""

from __future__ import annotations

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

from .config import OptimConfig


def freeze_parameters(modules: list[torch.nn.Module], freeze_embeddings: bool,
                      freeze_encoder_layers: int) -> int:
    """Turn off gradients of the embedding and/or the bottom N decoder layers; returns how many
    parameters of this rank were frozen. Must run before DDP wrapping (DDP buffers only
    trainable parameters)."""
    frozen = 0
    for module in modules:
        if freeze_embeddings and getattr(module, "pre_process", False):
            for p in module.embedding.parameters():
                p.requires_grad_(False)
                frozen += 1
        if freeze_encoder_layers:
            for layer in module.decoder.layers:
                # layer_number is global and 1-based, so this is right at every PP stage.
                if layer.layer_number <= freeze_encoder_layers:
                    for p in layer.parameters():
                        p.requires_grad_(False)
                        frozen += 1
    return frozen


def wrap_ddp(modules: list[torch.nn.Module], tconfig, t: OptimConfig) -> list:
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=t.use_distributed_optimizer,
        average_in_collective=False,
        check_for_nan_in_grad=False,
    )
    return [
        DistributedDataParallel(
            config=tconfig, ddp_config=ddp_config, module=m,
            # Megatron: only the first virtual chunk uses bucketing for overlap.
            disable_bucketing=i > 0,
        )
        for i, m in enumerate(modules)
    ]


def build_optimizer(ddp_chunks: list, t: OptimConfig, bf16: bool):
    config = OptimizerConfig(
        optimizer="adam",  # Megatron's Adam with decoupled weight decay = AdamW
        lr=t.learning_rate,
        min_lr=t.min_learning_rate,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        decoupled_weight_decay=True,
        clip_grad=t.gradient_clipping,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=t.use_distributed_optimizer,
    )
    # Megatron's gloo side groups exist only on NCCL jobs (see parallel.state).
    return get_megatron_optimizer(config, ddp_chunks,
                                  use_gloo_process_groups=torch.cuda.is_available())
