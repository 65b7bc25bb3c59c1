#!/usr/bin/env bash
# Multi-node SFT with torchrun's c10d rendezvous. Run this same script on every node:
#
#   NNODES=64 MASTER_ADDR=node001 ./examples/launch/torchrun_multinode.sh examples/glm46_355b_sft.yaml [key=value ...]
#   ./examples/launch/torchrun_multinode.sh examples/glm4_9b_sft.yaml    # GLM-4-9B: one node (NNODES=1)
#
# NODE_RANK is not needed with the c10d rendezvous (torchrun assigns ranks). SIGTERM / SIGUSR1
# to torchrun are forwarded to the workers, which save a checkpoint and exit 0; restart the
# same command with --resume auto to continue.
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG.yaml [dotted.key=value ...]}
shift
NNODES=${NNODES:-1}
NPROC_PER_NODE=${NPROC_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-glm-sft}

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export CUDA_DEVICE_MAX_CONNECTIONS=1   # Megatron: overlap of TP communication with compute
export NCCL_ASYNC_ERROR_HANDLING=1     # a dead rank fails the job instead of hanging it
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1

exec torchrun \
    --nnodes="${NNODES}" --nproc-per-node="${NPROC_PER_NODE}" \
    --rdzv-backend=c10d --rdzv-endpoint="${MASTER_ADDR}:${MASTER_PORT}" --rdzv-id="${RDZV_ID}" \
    --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
    -m glm_megatron sft --config "${CONFIG}" --resume auto "$@"
