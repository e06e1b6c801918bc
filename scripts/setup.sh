#!/usr/bin/env bash
# Creates (or reuses) .venv, installs torch and fastlora's build and test dependencies, and
# builds fastlora against that torch. Sourced by scripts/test.sh and scripts/main.sh.
#   FASTLORA_TORCH   torch requirement to install if the venv has none (default torch==2.13.0)
#   FASTLORA_VENV    where the virtual environment lives (default .venv)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${FASTLORA_VENV:-$root/.venv}"
python3 -m venv "$venv"
# shellcheck disable=SC1091
source "$venv/bin/activate"
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "${FASTLORA_TORCH:-torch==2.13.0}"
fi
python -m pip install -q "scikit-build-core>=0.10" ninja
log="$venv/fastlora-build.log"
echo "building fastlora against torch $(python -c 'import torch; print(torch.__version__)') (log: $log)"
if ! python -m pip install -v --no-build-isolation "$root[test,bench]" >"$log" 2>&1; then
  tail -n 60 "$log"
  echo "fastlora build failed; full log in $log" >&2
  exit 1
fi
grep -E "^ *-- fastlora:|Building CUDA object" "$log" | sed 's/^ *//' || true
