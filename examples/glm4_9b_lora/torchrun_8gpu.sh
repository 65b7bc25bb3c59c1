#!/usr/bin/env bash
# GLM-4-9B LoRA SFT (the ChatGLM4 tutorial, examples/glm4_9b_lora/sft_lora.yaml) on one node of
# 8 GPUs: TP1 x DP8, 2 rows per GPU = the tutorial's global batch of 16 on its 8-GPU accelerate run.
#
#   examples/glm4_9b_lora/torchrun_8gpu.sh [dotted.key=value ...]
#   CONFIG=my.yaml NPROC_PER_NODE=4 examples/glm4_9b_lora/torchrun_8gpu.sh training.learning_rate=3e-4
#
# SIGTERM / SIGUSR1 to torchrun are forwarded to the workers, which save a checkpoint (adapters,
# optimizer, data position) and exit 0; run the same command again to continue (--resume auto).
set -euo pipefail
CONFIG=${CONFIG:-examples/glm4_9b_lora/sft_lora.yaml}
NPROC_PER_NODE=${NPROC_PER_NODE:-8}

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export CUDA_DEVICE_MAX_CONNECTIONS=1   # Megatron: overlap of TP communication with compute
export NCCL_ASYNC_ERROR_HANDLING=1     # a dead rank fails the job instead of hanging it
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1

exec torchrun --standalone --nproc-per-node="${NPROC_PER_NODE}" \
    --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
    -m glm_megatron sft --config "${CONFIG}" --resume auto "$@"
