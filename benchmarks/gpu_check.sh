#!/usr/bin/env bash
# One prepared GPU check (logic and outputs: benchmarks/gpu_check.py; how to run: docs/gpu.md).
#   bash benchmarks/gpu_check.sh [--dry-run] [--out DIR] [--budget S] [--timeout NAME=S] [--sections LIST]
# On the GPU machine after staging it uses /tmp/site (TE, Megatron-Core, DALI). Always exits 0,
# so partial results come back; the summary table is the last thing printed.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root" || exit 0
if [[ -d /tmp/site ]]; then
  export PYTHONPATH="/tmp/site:.${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
fi
export NVTE_FRAMEWORK=pytorch
py=${PYTHON:-$(command -v python || command -v python3)}
"$py" benchmarks/gpu_check.py "$@" || echo "gpu_check: driver exited with status $?" >&2
exit 0
