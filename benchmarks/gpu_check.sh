#!/usr/bin/env bash
# One command for a machine with a CUDA GPU and a CUDA torch (the project's H100 image): builds
# fastlora there and, with the experimental CUDA layer kernels switched on
# (FASTLORA_CUDA_LAYER=1), runs the GPU tests, the layer benchmark, a quick subset of the GPU
# tests under compute-sanitizer memcheck (caching allocator off, so every tensor is its own
# allocation) and racecheck (shared-memory hazards), the gradient, optimizer and whole-model
# benchmarks and the CPU tests.
# Prints a pass/fail table and the layer benchmark's acceptance table last. Needs no network.
# Every step has a time limit, so the run ends within GPU_CHECK_BUDGET seconds with its summary.
#   FASTLORA_CUDA_ARCHS  architectures to build (default 90a: quick, H100/H200 only)
#   OUT                  where logs and results go (default benchmarks/results/gpu)
#   GPU_CHECK_BUDGET     seconds for the whole run (default 570)
#   LAYER_ARGS           arguments of benchmarks/layer.py (default --quick; "" runs issue 3's grid)
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${OUT:-$root/benchmarks/results/gpu}"
mkdir -p "$out"
export FASTLORA_CUDA_ARCHS="${FASTLORA_CUDA_ARCHS:-90a}" PYTHONUNBUFFERED=1 FASTLORA_REQUIRE_EXTENSION=1
export FASTLORA_CUDA_LAYER=1
budget="${GPU_CHECK_BUDGET:-570}"
declare -a names=() results=()
step() {  # step NAME LIMIT COMMAND...: runs it within min(LIMIT, budget left), logs to $out/NAME.log
  local name=$1 limit=$2; shift 2
  local left=$((budget - SECONDS)) start=$SECONDS status
  ((left < limit)) && limit=$left
  if ((limit < 15)); then
    names+=("$name"); results+=("SKIPPED (time budget spent)"); return
  fi
  echo "== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  if ((rc == 0)); then status=pass; elif ((rc == 124)); then status="FAIL(timeout)"; else status="FAIL(rc=$rc)"; fi
  tail -n 15 "$out/$name.log"
  names+=("$name"); results+=("$status $((SECONDS - start))s")
}
pytest_cuda=(python3 -m pytest -q -p no:cacheprovider)
layer_args="${LAYER_ARGS---quick}"  # unset: --quick; set (even empty): as given

python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
step build 300 python3 -m pip install -v --no-build-isolation --no-deps --no-index .
step gpu-tests 240 "${pytest_cuda[@]}" tests/cuda
# shellcheck disable=SC2086
step layer 150 python3 benchmarks/layer.py $layer_args --out "$out"
step memcheck 150 env FASTLORA_QUICK_TESTS=1 PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
  --error-exitcode 1 "${pytest_cuda[@]}" -x tests/cuda/test_cuda_layer.py tests/cuda/test_cuda_dropout.py \
  -k "not compile and not graph"
# Shapes that reach every kernel and path (fused and two-pass dy products, 1-8 rank tiles, row groups).
step racecheck 90 env FASTLORA_QUICK_TESTS=1 compute-sanitizer --tool racecheck --error-exitcode 1 \
  "${pytest_cuda[@]}" -x tests/cuda/test_cuda_layer.py -k "test_ops_match_reference and (T33- or T257- or T100- or T2000-)"
step gradients 90 python3 benchmarks/gradients.py --out "$out"
step optim 90 python3 benchmarks/optim.py --out "$out"
# Issue 8: ~1B-parameter Llama-style training step, fastlora vs PEFT (default and bf16) vs plain.
step model 120 python3 benchmarks/model.py --out "$out"
step cpu-tests 200 "${pytest_cuda[@]}" tests -x --ignore=tests/cuda

echo
device="$(python3 -c 'import torch; print(torch.cuda.get_device_name(0), "torch", torch.__version__)')"
echo "gpu_check summary ($device)"
printf '%-10s %s\n' step result
for i in "${!names[@]}"; do printf '%-10s %s\n' "${names[$i]}" "${results[$i]}"; done
if [ -f "$out/model.log" ]; then
  echo
  tail -n 18 "$out/model.log"
fi
if [ -f "$out/layer.log" ]; then
  echo
  sed -n '/^issue 3 acceptance/,$p' "$out/layer.log"
fi
! printf '%s\n' "${results[@]}" | grep -q -e FAIL -e SKIPPED
