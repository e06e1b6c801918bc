#!/usr/bin/env bash
# The GPU check: one call of at most 8 minutes on a machine with a CUDA GPU and a CUDA torch
# (device time is 15 minutes in all, start-up included). Steps, most valuable first:
#   build        fastlora with its CUDA kernels for this card's architecture only
#   correctness  every op and both layer paths at the headline size (T = 8192, 4096^2, r = 16,
#                bf16, p = 0 and 0.05) and at odd sizes, against the float32 reference
#   layer        the headline benchmark: frozen nn.Linear, PEFT, reference, composed path, the
#                layer kernels (fwd, fwd+bwd, memory held after forward), in one process
#   gpu-tests    the quick GPU tests (tests/cuda, FASTLORA_QUICK_TESTS=1)
#   memcheck     compute-sanitizer memcheck on fastlora's kernels only, three tiny cases
#   racecheck    compute-sanitizer racecheck, the same
# A step that the time left cannot fit is SKIPPED (reported, not a failure), as are the steps
# after a failed build. Prints the plan, each step's tail and a summary table; writes everything
# into one file, $OUT/gpu_check.txt. Exit status 1 only if a step FAILED. Needs no network.
#   --dry-run          print the plan and its per-step budgets, run nothing (no GPU needed)
#   OUT                where the summary goes (default benchmarks/results/gpu)
#   GPU_CHECK_BUDGET   seconds for the whole call (default 480)
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

# name, budget in seconds, command; the budgets sum to at most GPU_CHECK_BUDGET's default.
tiny="--odd-only --tiny"
plan=(
  "build|140|python3 -m pip install -q --no-build-isolation --no-deps --no-index ."
  "correctness|60|python3 benchmarks/gpu_correctness.py"
  "layer|90|python3 benchmarks/layer.py --headline --repeat 30 --out \$work"
  "gpu-tests|90|env FASTLORA_QUICK_TESTS=1 python3 -m pytest -q -x -p no:cacheprovider tests/cuda"
  "memcheck|40|env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --kernel-name kns=fastlora --error-exitcode 1 python3 benchmarks/gpu_correctness.py $tiny"
  "racecheck|40|compute-sanitizer --tool racecheck --kernel-name kns=fastlora --error-exitcode 1 python3 benchmarks/gpu_correctness.py $tiny"
)

print_plan() {
  local total=0 entry name budget cmd
  printf '%-12s %7s  %s\n' step budget command
  for entry in "${plan[@]}"; do
    IFS='|' read -r name budget cmd <<<"$entry"
    printf '%-12s %5s s  %s\n' "$name" "$budget" "$cmd"
    total=$((total + budget))
  done
  echo "total budget: $total s"
}

if [ "${1:-}" = "--dry-run" ]; then
  echo "gpu_check plan (dry run; FASTLORA_CUDA_ARCHS is this card's architecture, e.g. 90a on an H100)"
  print_plan
  exit 0
fi

out="${OUT:-$root/benchmarks/results/gpu}"
mkdir -p "$out"
summary="$out/gpu_check.txt"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
budget="${GPU_CHECK_BUDGET:-480}"
# Everything printed from here on also goes into the summary file.
exec > >(tee "$summary") 2>&1

arch="$(python3 -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}{n}" + ("a" if m == 9 else ""))' 2>/dev/null)" ||
  arch=""
export FASTLORA_CUDA_ARCHS="${FASTLORA_CUDA_ARCHS:-$arch}" PYTHONUNBUFFERED=1 FASTLORA_REQUIRE_EXTENSION=1
export FASTLORA_CUDA_LAYER=1 CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
echo "gpu_check: $(python3 -c 'import torch; print(torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)' 2>&1 | tail -n 1)"
echo "arch $FASTLORA_CUDA_ARCHS, budget ${budget}s, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
print_plan

declare -a names=() results=()
failed=0 build_ok=1
for entry in "${plan[@]}"; do
  IFS='|' read -r name limit cmd <<<"$entry"
  cmd="${cmd//\$work/$work}"
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
  # shellcheck disable=SC2086  # the plan's commands are word-split on purpose
  timeout "$limit" $cmd >"$work/$name.log" 2>&1
  rc=$?
  took=$((SECONDS - start))
  tail -n 60 "$work/$name.log"
  if ((rc == 0)); then
    status="pass ${took}s"
  elif ((rc == 124 && trimmed)); then
    status="SKIPPED (cut by the time guard after ${took}s)"
  else
    status="FAIL ($( ((rc == 124)) && echo "timeout" || echo "rc=$rc") after ${took}s)"
    failed=1
    [ "$name" = build ] && build_ok=0
  fi
  names+=("$name"); results+=("$status")
done

echo
echo "gpu_check summary (${SECONDS}s of ${budget}s; full output in $summary)"
printf '%-12s %s\n' step result
for i in "${!names[@]}"; do printf '%-12s %s\n' "${names[$i]}" "${results[$i]}"; done
exit "$failed"
