#!/usr/bin/env bash
# Create/refresh the project's virtual environment (.venv) with the exact tested versions.
# Idempotent and quiet when everything is installed. Usage: source scripts/setup_env.sh
# (or bash it; it prints the venv's python path last).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${NAVIL_VENV:-$root/.venv}
python=${PYTHON:-python3}
if [[ ! -x $venv/bin/python ]]; then
  echo "[setup] creating $venv"
  "$python" -m venv "$venv"
fi
stamp=$venv/.navil-installed
want=$(cat "$root/setup.py" "$root/constraints.txt" | sha256sum | cut -c1-16)
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
  echo "[setup] installing megatron-navil and pinned dependencies into $venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  # torch first and exactly pinned: a looser requirement must never pull a CUDA build into CI.
  "$venv/bin/python" -m pip install -q -c "$root/constraints.txt" torch
  "$venv/bin/python" -m pip install -q -c "$root/constraints.txt" -e "$root[test]"
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
echo "$venv/bin/python"
