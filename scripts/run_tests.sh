#!/usr/bin/env bash
# Set up .venv (scripts/setup_env.sh) and run the whole test suite; exits non-zero on failure.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$root/scripts/setup_env.sh" >/dev/null
cd "$root"
exec python -m pytest -q "$@"
