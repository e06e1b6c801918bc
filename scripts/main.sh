#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the main job. Until the end-to-end fine-tuning job
# exists, that is the CPU layer benchmark (fastlora vs reference vs PEFT vs plain PyTorch).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$root/scripts/setup.sh"
cd "$root"
python benchmarks/layer_cpu.py "$@"
