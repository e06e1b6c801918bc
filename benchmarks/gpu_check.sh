#!/usr/bin/env bash
# One command for a machine with a CUDA GPU and a CUDA torch (the project's H100 image):
# builds fastlora there, runs the GPU tests, runs them once more under compute-sanitizer, runs
# the GPU benchmarks that exist, and prints a short table last. Needs no network.
#   FASTLORA_CUDA_ARCHS  architectures to build (default 90a: quick, H100/H200 only)
#   OUT                  where logs and results go (default benchmarks/results/gpu)
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${OUT:-$root/benchmarks/results/gpu}"
mkdir -p "$out"
export FASTLORA_CUDA_ARCHS="${FASTLORA_CUDA_ARCHS:-90a}" PYTHONUNBUFFERED=1 FASTLORA_REQUIRE_EXTENSION=1
declare -a names=() results=()
step() {  # step NAME COMMAND...: runs it, logs to $out/NAME.log, records pass/fail and seconds
  local name=$1; shift
  local start=$SECONDS
  echo "== $name: $*"
  if "$@" >"$out/$name.log" 2>&1; then status=pass; else status="FAIL(rc=$?)"; fi
  tail -n 15 "$out/$name.log"
  names+=("$name"); results+=("$status $((SECONDS - start))s")
}

python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
step build python3 -m pip install -v --no-build-isolation --no-deps --no-index .
step gpu-tests python3 -m pytest -q -p no:cacheprovider tests/cuda
step sanitizer compute-sanitizer --tool memcheck --error-exitcode 1 python3 -m pytest -q -p no:cacheprovider -x tests/cuda
step cpu-tests python3 -m pytest -q -p no:cacheprovider tests -x --ignore=tests/cuda
for bench in benchmarks/layer.py benchmarks/gradients.py benchmarks/optim.py; do
  [ -f "$bench" ] && step "$(basename "$bench" .py)" python3 "$bench" --out "$out"
done

echo
echo "gpu_check summary ($(python3 -c 'import torch; print(torch.cuda.get_device_name(0), "torch", torch.__version__)'))"
printf '%-12s %s\n' step result
for i in "${!names[@]}"; do printf '%-12s %s\n' "${names[$i]}" "${results[$i]}"; done
! printf '%s\n' "${results[@]}" | grep -q FAIL
