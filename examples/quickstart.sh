#!/usr/bin/env bash
# Quickstart: set up .venv and run the debug NaViL model end to end on this machine.
# Usage: bash examples/quickstart.sh [WORKDIR]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
workdir=${1:-$root/workdir}
source "$root/scripts/setup_env.sh" >/dev/null
mkdir -p "$workdir"
navil-demo --flavor debug-internlm2 --steps 10 2>&1 | tee "$workdir/demo.log"
