#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the main job: all-MiniLM-L6-v2 fine-tuned on the
# vaderSentiment movie-review sentences with every method (examples/sentiment.py), printing the
# table last. Extra arguments go to the job (e.g. --quick, --device cuda, --seeds 5).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$root/scripts/setup.sh"
cd "$root"
python "$root/examples/sentiment.py" --data-dir "$root/data" --out "$root/results/sentiment" "$@"
