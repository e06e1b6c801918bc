#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the test suite. CI runs exactly this.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$root/scripts/setup.sh"
cd "$root"
python -m pytest -q -p no:cacheprovider "$@"
