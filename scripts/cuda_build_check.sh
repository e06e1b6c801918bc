#!/usr/bin/env bash
# The CUDA-torch build, proven without a GPU. Every change to CUDA code (csrc/kernels/cuda,
# csrc/ops/cuda.cpp, the CUDA part of CMakeLists.txt) runs this before it lands; CI does not (a
# CUDA torch is ~5.5 GB and the build at one compile job takes longer than CI can spare).
#   1. a separate venv with the CUDA build of torch (FASTLORA_CUDA_TORCH, default torch==2.14.1);
#   2. fastlora configured and compiled with its CUDA kernels for sm_80 and sm_90a by the
#      installed nvcc, ptxas reporting every kernel's registers and spills (-Xptxas=-v);
#   3. imported without a GPU, and every op checked for a CUDA kernel registration
#      (torch._C._dispatch_has_kernel_for_dispatch_key).
# Fails if any step fails, if ptxas reports a spill, or if an op lacks a CUDA kernel. Prints a
# summary (also written to $OUT/cuda_build_check.txt, default benchmarks/results).
#   FASTLORA_CUDA_VENV        the venv (default .venv-cuda)
#   FASTLORA_CUDA_ARCHS       architectures (default "80;90a")
#   CMAKE_BUILD_PARALLEL_LEVEL  compile jobs (default 1: a 2-core machine shared with others)
#   CUDA_HOME                 the CUDA toolkit (default /usr/local/cuda)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${FASTLORA_CUDA_VENV:-$root/.venv-cuda}"
out="${OUT:-$root/benchmarks/results}"
mkdir -p "$out"
log="$venv/fastlora-cuda-build.log"
export FASTLORA_CUDA_ARCHS="${FASTLORA_CUDA_ARCHS:-80;90a}" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-1}"
# The toolkit's root: torch's CMake config (FindCUDA) would otherwise take it from the nvcc on
# PATH, which here is a wrapper in /usr/local/bin.
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export CUDA_PATH="$CUDA_HOME" CUDACXX="$CUDA_HOME/bin/nvcc"

python3 -m venv "$venv"
py="$venv/bin/python"
if ! "$py" -c "import torch" >/dev/null 2>&1; then
  "$py" -m pip install -q "${FASTLORA_CUDA_TORCH:-torch==2.14.1}" numpy
fi
"$py" -m pip install -q "scikit-build-core>=0.10" ninja
torch_info="$("$py" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')"
if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)'; then
  echo "cuda_build_check: $torch_info is not a CUDA build of torch" >&2
  exit 1
fi
echo "cuda_build_check: $torch_info, $(nvcc --version | tail -n 1), archs $FASTLORA_CUDA_ARCHS," \
  "$CMAKE_BUILD_PARALLEL_LEVEL compile job(s); build log: $log"

start=$SECONDS
# Its own build directory: the CPU venv's build tree is configured against another torch. The
# kernels' objects are removed so that ptxas reports on every kernel, not only on changed ones.
rm -rf build/cuda-torch/CMakeFiles/_C.dir/csrc/kernels
if ! CMAKE_ARGS="-DCMAKE_CUDA_FLAGS=-Xptxas=-v" "$py" -m pip install -v --no-build-isolation --no-deps \
  --config-settings=build-dir=build/cuda-torch . >"$log" 2>&1; then
  tail -n 60 "$log"
  echo "cuda_build_check: the build failed; full log in $log" >&2
  exit 1
fi
build_s=$((SECONDS - start))

ptxas_report="$("$py" - "$log" <<'EOF'
# ptxas -v prints, per function and architecture: "Compiling entry function 'NAME' for 'sm_XX'",
# "Function properties for NAME" then "N bytes stack frame, N bytes spill stores, N bytes spill
# loads", and "Used N registers".
import re, subprocess, sys
kernels, spills, entry, arch, func = {}, {}, None, None, None
for line in open(sys.argv[1], errors="replace"):
    if m := re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line):
        entry, arch = m.groups()
    elif m := re.search(r"Function properties for (\S+)", line):
        func = m.group(1)
    elif (m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)) and func:
        if int(m.group(1)) + int(m.group(2)):
            spills[(func, arch)] = f"{m.group(1)}/{m.group(2)} bytes stored/loaded"
    elif (m := re.search(r"Used (\d+) registers", line)) and entry:
        kernels[(entry, arch)] = int(m.group(1))
names = sorted({n for n, _ in kernels} | {n for n, _ in spills})
demangled = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
short = {n: d.replace("(anonymous namespace)::", "").removeprefix("void ").split("(")[0] for n, d in zip(names, demangled)}
print(f"ptxas: {len(kernels)} kernel builds ({len({n for n, _ in kernels})} kernels x archs), {len(spills)} with spills")
by_base = {}
for (n, arch), regs in kernels.items():
    by_base.setdefault((short[n].split("<")[0].split("::")[-1], arch), []).append(regs)
for (base, arch), regs in sorted(by_base.items()):
    print(f"  {base:<24} {arch:<7} registers {min(regs)}-{max(regs)} ({len(regs)} instantiations)")
for (n, arch), what in sorted(spills.items()):
    print(f"  SPILL {short[n].replace('fastlora::cuda::', '')} {arch}: {what}")
sys.exit(1 if spills or not kernels else 0)
EOF
)" && spills_ok=1 || spills_ok=0

registrations="$(FASTLORA_REQUIRE_EXTENSION=1 CUDA_VISIBLE_DEVICES="" "$py" - <<'EOF'
import sys
import torch
import fastlora
from fastlora import _extension

assert fastlora.extension_available(), fastlora.extension_error()
has = torch._C._dispatch_has_kernel_for_dispatch_key
missing = [op for op in _extension.OPS if not has(f"fastlora::{op}", "CUDA")]
print(f"imported without a GPU (cuda available: {torch.cuda.is_available()}); "
      f"CUDA kernels registered for {len(_extension.OPS) - len(missing)}/{len(_extension.OPS)} ops: "
      + ", ".join(op for op in _extension.OPS if op not in missing))
if missing:
    print("missing CUDA kernels: " + ", ".join(missing))
sys.exit(1 if missing else 0)
EOF
)" && ops_ok=1 || ops_ok=0

{
  echo "cuda_build_check $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo "$torch_info; $(nvcc --version | tail -n 1); archs $FASTLORA_CUDA_ARCHS; build ${build_s}s at $CMAKE_BUILD_PARALLEL_LEVEL job(s)"
  echo "$ptxas_report"
  echo "$registrations"
} | tee "$out/cuda_build_check.txt"
if ((spills_ok && ops_ok)); then echo "cuda_build_check: ok"; else echo "cuda_build_check: FAILED" >&2; exit 1; fi
