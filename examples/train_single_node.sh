#!/usr/bin/env bash
# One node, N GPUs (or N CPU processes with gloo): torchrun launches navil-pretrain per rank.
# Usage: bash examples/train_single_node.sh NPROC CONFIG.yaml [extra navil-pretrain args]
set -euo pipefail
# Megatron overlaps tensor-parallel communication with compute only with one hardware queue per
# GPU (kernels then start in issue order); navil-pretrain also sets it when TP > 1 and it is unset.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
nproc=${1:?number of processes}; config=${2:?YAML config}; shift 2
exec torchrun --standalone --nproc_per_node "$nproc" --no-python \
  navil-pretrain --config "$config" "$@"
