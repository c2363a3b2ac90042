#!/usr/bin/env bash
# Set up .venv (scripts/setup_env.sh) and run the test suite; exits non-zero on failure.
#   bash scripts/run_tests.sh            the whole suite (what CI runs)
#   bash scripts/run_tests.sh --fast     the edit-test loop: leaves out tests marked
#                                        distributed/processes/slow/gpu (pytest.ini), ~100 s on 2 cores
# Any other arguments go to pytest (e.g. a path, -k NAME, -m "not slow").
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$root/scripts/setup_env.sh" >/dev/null
cd "$root"
args=()
for a in "$@"; do
  if [[ $a == --fast ]]; then
    args+=(-m "not distributed and not processes and not slow and not gpu" --durations=5)
  else
    args+=("$a")
  fi
done
exec python -m pytest -q ${args[@]+"${args[@]}"}
