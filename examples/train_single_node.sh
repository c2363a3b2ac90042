#!/usr/bin/env bash
# One node, N GPUs (or N CPU processes with gloo): torchrun launches navil-pretrain per rank.
# Usage: bash examples/train_single_node.sh NPROC CONFIG.yaml [extra navil-pretrain args]
set -euo pipefail
nproc=${1:?number of processes}; config=${2:?YAML config}; shift 2
exec torchrun --standalone --nproc_per_node "$nproc" --no-python \
  navil-pretrain --config "$config" "$@"
