#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the test suite. CI runs exactly this.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$root/scripts/setup.sh"
cd "$root"
bash benchmarks/gpu_check.sh --dry-run  # the GPU check's plan; tests/test_gpu_check.py checks its budget
if [ $# -eq 0 ]; then
  # The CUDA kernels under the host emulation and the Triton kernels (fused, skinny) under Triton's
  # interpreter first, one line per case (and hypothesis' example counts), so the log shows what ran.
  python -m pytest -v -p no:cacheprovider --hypothesis-show-statistics tests/test_cuda_emulated.py tests/test_fused.py tests/test_skinny.py
  python -m pytest -q -p no:cacheprovider --ignore=tests/test_cuda_emulated.py --ignore=tests/test_fused.py --ignore=tests/test_skinny.py
else
  python -m pytest -q -p no:cacheprovider "$@"
fi
