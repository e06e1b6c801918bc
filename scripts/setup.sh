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
quiet_pip() {  # pip without this machine's harmless "find-links location ignored" warnings
  python -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
quiet_pip install -q --upgrade pip
if ! python -c "import torch" >/dev/null 2>&1; then
  quiet_pip install -q "${FASTLORA_TORCH:-torch==2.13.0}" numpy
fi
quiet_pip install -q "scikit-build-core>=0.10" ninja
log="$venv/fastlora-build.log"
echo "building fastlora against torch $(python -c 'import torch; print(torch.__version__)') (log: $log)"
if ! python -m pip install -v "$root[test,bench,examples]" >"$log" 2>&1; then  # isolated: docs/building.md
  tail -n 60 "$log"
  echo "fastlora build failed; full log in $log" >&2
  exit 1
fi
grep -E "^ *-- fastlora:|Building CUDA object|cuda_glue_check|tile_host_test" "$log" | sed 's/^ *//' || true
# The main job's data: vaderSentiment 3.3.2's source distribution (its movie-review snippets).
if [ ! -f "$root/data/vaderSentiment-3.3.2.tar.gz" ]; then
  quiet_pip download -q --no-deps --no-binary :all: vaderSentiment==3.3.2 -d "$root/data"
fi
