#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the test suite. CI runs exactly this.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$root/scripts/setup.sh"
cd "$root"
bash benchmarks/gpu_check.sh --dry-run  # the GPU check's plan; tests/test_gpu_check.py checks its budget
python -m pytest -q -p no:cacheprovider "$@"
