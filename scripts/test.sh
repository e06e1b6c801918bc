#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the test suite. CI runs exactly this.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$root/scripts/setup.sh"
cd "$root"
bash benchmarks/gpu_check.sh --dry-run  # the GPU check's plan; tests/examples/test_gpu_check.py checks its budget
if [ $# -eq 0 ]; then
  # The tests marked slow first, one line per case (and hypothesis' example counts), so the log shows
  # what ran: the CUDA kernels under the host emulation, the Triton kernels (fused, skinny) under
  # Triton's interpreter, the multi-process (gloo, torchrun, FSDP, DeepSpeed) and Trainer/TRL tests.
  # Then everything else: the two runs together are the whole suite.
  python -m pytest -v -p no:cacheprovider --hypothesis-show-statistics -m slow
  python -m pytest -q -p no:cacheprovider -m "not slow"
else
  python -m pytest -q -p no:cacheprovider "$@"
fi
