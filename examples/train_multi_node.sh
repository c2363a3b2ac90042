#!/usr/bin/env bash
# Multi-node with plain torchrun: run this on every node with the same MASTER_ADDR/PORT.
# Usage: NNODES=4 NODE_RANK=0 MASTER_ADDR=host0 bash examples/train_multi_node.sh CONFIG.yaml [args]
set -euo pipefail
# Megatron overlaps tensor-parallel communication with compute only with one hardware queue per
# GPU (kernels then start in issue order); navil-pretrain also sets it when TP > 1 and it is unset.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
config=${1:?YAML config}; shift
exec torchrun --nnodes "${NNODES:?}" --node_rank "${NODE_RANK:?}" --nproc_per_node "${GPUS_PER_NODE:-8}" \
  --rdzv_backend c10d --rdzv_endpoint "${MASTER_ADDR:?}:${MASTER_PORT:-29500}" --no-python \
  navil-pretrain --config "$config" "$@"
