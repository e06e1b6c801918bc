#!/usr/bin/env bash
# The GPU check: one call of at most 8 minutes on a machine with a CUDA GPU and a CUDA torch
# (device time is 15 minutes in all, start-up included). Steps, most valuable first:
#   build        fastlora with its CUDA kernels for this card's architecture only, then the Triton
#                kernels compiled and autotuned once at the headline shapes (Triton's cache warm)
#   correctness  every op and every layer path (kernels, composed, fused, what "auto" chooses) at
#                the headline size (T = 8192, 4096^2, r = 16, bf16, p = 0 and 0.05) and odd sizes
#   layer        the headline: measured dispatch's choice and every candidate's time per shape,
#                then frozen nn.Linear, PEFT, the composed, fused and kernel paths (fwd, fwd+bwd,
#                memory held after forward) in one process
#   model        a ~1B Llama-style training step: tokens/s and peak memory, fastlora vs PEFT vs frozen
#   gpu-tests    the quick GPU tests (tests/cuda, FASTLORA_QUICK_TESTS=1), among them the dropout
#                mask's CUDA twin, the Triton op under Inductor and under CUDA graphs after tune()
#   memcheck     compute-sanitizer memcheck on fastlora's kernels only (CUDA C++ and the Triton
#                kernels, named fastlora_*), three tiny cases
#   racecheck    compute-sanitizer racecheck, the same
# A step that the time left cannot fit is SKIPPED (reported, not a failure), as are the steps
# after a failed build; a step that exits 0 but leaves out a file it must write FAILS. Prints
# the plan, each step's tail and a summary table. Everything stays under $OUT:
#   gpu_check.txt          all that was printed (plan, tails, summary)
#   logs/<step>.log        each step's full output
#   layer.json, layer.png  the layer benchmark (dispatch table included)
#   model_cuda.json        the model benchmark
# Exit status 1 only if a step FAILED. Needs no network.
#   --dry-run          print the plan, its per-step budgets and the output layout; run nothing
#   OUT                the output folder (default benchmarks/results/gpu)
#   GPU_CHECK_BUDGET   seconds for the whole call (default 480)
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

# name | budget in seconds | command (run by bash -c; $OUT is the output folder) | files it writes
# under $OUT. The budgets sum to at most GPU_CHECK_BUDGET's default.
tiny="--odd-only --tiny"
sanitize="compute-sanitizer --kernel-name kns=fastlora --error-exitcode 1"
plan=(
  "build|135|python3 -m pip install -q --no-build-isolation --no-deps --no-index . && python3 benchmarks/layer.py --warm|"
  "correctness|45|python3 benchmarks/gpu_correctness.py|"
  "layer|85|python3 benchmarks/layer.py --headline --repeat 30 --out \$OUT|layer.json layer.png"
  "model|70|python3 benchmarks/model.py --steps 5 --calibration-batches 2 --out \$OUT|model_cuda.json"
  "gpu-tests|65|env FASTLORA_QUICK_TESTS=1 FASTLORA_CUDA_LAYER=1 python3 -m pytest -q -x -p no:cacheprovider tests/cuda|"
  "memcheck|40|env PYTORCH_NO_CUDA_MEMORY_CACHING=1 $sanitize --tool memcheck python3 benchmarks/gpu_correctness.py $tiny|"
  "racecheck|40|$sanitize --tool racecheck python3 benchmarks/gpu_correctness.py $tiny|"
)

print_plan() {
  local total=0 entry name budget cmd files
  printf '%-12s %7s  %s\n' step budget command
  for entry in "${plan[@]}"; do
    IFS='|' read -r name budget cmd files <<<"$entry"
    printf '%-12s %5s s  %s\n' "$name" "$budget" "$cmd"
    total=$((total + budget))
  done
  echo "total budget: $total s"
  echo "output under \$OUT: gpu_check.txt logs/<step>.log$(for entry in "${plan[@]}"; do
    IFS='|' read -r _ _ _ files <<<"$entry"; [ -n "$files" ] && printf ' %s' "$files"; done)"
}

if [ "${1:-}" = "--dry-run" ]; then
  echo "gpu_check plan (dry run; FASTLORA_CUDA_ARCHS is this card's architecture, e.g. 90a on an H100)"
  print_plan
  exit 0
fi

OUT="$(mkdir -p "${OUT:-$root/benchmarks/results/gpu}" && cd "${OUT:-$root/benchmarks/results/gpu}" && pwd)"
export OUT
mkdir -p "$OUT/logs"
summary="$OUT/gpu_check.txt"
budget="${GPU_CHECK_BUDGET:-480}"
# Everything printed from here on also goes into the summary file.
exec > >(tee "$summary") 2>&1

arch="$(python3 -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}{n}" + ("a" if m == 9 else ""))' 2>/dev/null)" ||
  arch=""
# Measured dispatch's choices go to a cache inside $OUT (kept with the results, never stale).
export FASTLORA_CUDA_ARCHS="${FASTLORA_CUDA_ARCHS:-$arch}" PYTHONUNBUFFERED=1 FASTLORA_REQUIRE_EXTENSION=1
export FASTLORA_CACHE_DIR="$OUT/dispatch_cache" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
echo "gpu_check: $(python3 -c 'import torch; print(torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)' 2>&1 | tail -n 1)"
echo "arch $FASTLORA_CUDA_ARCHS, budget ${budget}s, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
print_plan

declare -a names=() results=()
failed=0 build_ok=1
for entry in "${plan[@]}"; do
  IFS='|' read -r name limit cmd files <<<"$entry"
  left=$((budget - SECONDS))
  if ((build_ok == 0)); then
    names+=("$name"); results+=("SKIPPED (build failed)"); continue
  fi
  if ((left < limit / 2 || left < 10)); then
    names+=("$name"); results+=("SKIPPED (${left}s left of the budget, step needs ${limit}s)"); continue
  fi
  trimmed=0
  ((left < limit)) && limit=$left trimmed=1
  echo
  echo "== $name (limit ${limit}s): $cmd"
  start=$SECONDS
  log="$OUT/logs/$name.log"
  timeout "$limit" bash -c "$cmd" >"$log" 2>&1
  rc=$?
  took=$((SECONDS - start))
  tail -n 60 "$log"
  missing=""
  for f in $files; do [ -s "$OUT/$f" ] || missing+=" $f"; done
  if ((rc == 0)) && [ -z "$missing" ]; then
    status="pass ${took}s"
  elif ((rc == 0)); then
    status="FAIL (did not write$missing after ${took}s)"
    failed=1
  elif ((rc == 124 && trimmed)); then
    status="SKIPPED (cut by the time guard after ${took}s)"
  else
    status="FAIL ($( ((rc == 124)) && echo "timeout" || echo "rc=$rc") after ${took}s)"
    failed=1
  fi
  [ "$name" = build ] && [ "${status%% *}" = FAIL ] && build_ok=0
  names+=("$name"); results+=("$status")
done

echo
echo "gpu_check summary (${SECONDS}s of ${budget}s; everything in $OUT: gpu_check.txt, logs/, results)"
printf '%-12s %s\n' step result
for i in "${!names[@]}"; do printf '%-12s %s\n' "${names[$i]}" "${results[$i]}"; done
exit "$failed"
