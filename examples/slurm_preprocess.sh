#!/bin/bash
# Preprocess one corpus over many machines with a SLURM job array: one partition per task.
#
#   NUM_PARTITIONS=64 sbatch --array=0-63 examples/slurm_preprocess.sh
#
# Every task runs the same command with its own --partition-index; all write into one output
# directory (shard names carry the partition). The last task to finish writes report.json,
# rejected.jsonl and manifest.json. Re-submitting the array (or a single failed index, e.g.
# `sbatch --array=17 ...`) resumes: finished shards are kept. Keep every flag identical between
# submissions (a changed flag is refused) and NUM_PARTITIONS equal to the full array size, also
# when re-submitting only some indexes.
#SBATCH --job-name=navil-preprocess
#SBATCH --cpus-per-task=32
#SBATCH --mem=64G
#SBATCH --time=12:00:00
#SBATCH --output=logs/preprocess-%A_%a.log
set -euo pipefail

INPUT=${INPUT:-"/data/raw/captions-*.jsonl"}   # quoted: navil-preprocess expands the glob itself
IMAGE_ROOT=${IMAGE_ROOT:-/data/raw/images}
OUTPUT=${OUTPUT:-/data/shards/pretrain-v1}
TOKENIZER=${TOKENIZER:-/data/tokenizers/navil-2b}
NUM_PARTITIONS=${NUM_PARTITIONS:?set NUM_PARTITIONS to the size of the whole array, e.g. 64}
: "${SLURM_ARRAY_TASK_ID:?run as a SLURM array: NUM_PARTITIONS=64 sbatch --array=0-63 $0}"

mkdir -p logs
navil-preprocess \
    --input "$INPUT" \
    --image-root "$IMAGE_ROOT" \
    --output "$OUTPUT" \
    --tokenizer "$TOKENIZER" \
    --num-workers "${SLURM_CPUS_PER_TASK:-8}" \
    --num-partitions "$NUM_PARTITIONS" \
    --partition-index "$SLURM_ARRAY_TASK_ID" \
    --samples-per-shard 2000 \
    --max-shard-bytes 2147483648 \
    --dedup \
    --log-every 60
