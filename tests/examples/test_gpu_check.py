"""benchmarks/gpu_check.sh: its plan (--dry-run, which needs no GPU) fits one 8-minute device call,
and a run keeps everything under $OUT (the summary, each step's full log, the results), checked
with stand-ins for python3 and compute-sanitizer so no GPU is needed."""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.sh"
DEVICE_CALL_S = 480  # one call of at most 8 minutes out of 15 minutes of device time
STEPS = ["build", "correctness", "layer", "model", "gpu-tests", "memcheck", "racecheck"]


def test_dry_run_plan_fits_the_device_budget():
    out = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, check=True).stdout
    print(out)
    steps = re.findall(r"^(\S+)\s+(\d+) s  (.*)$", out, flags=re.MULTILINE)
    total = int(re.search(r"^total budget: (\d+) s$", out, flags=re.MULTILINE).group(1))
    assert [name for name, _, _ in steps] == STEPS
    assert sum(int(b) for _, b, _ in steps) == total <= DEVICE_CALL_S
    commands = {name: cmd for name, _, cmd in steps}
    assert "benchmarks/layer.py --warm" in commands["build"]  # the Triton cache warmed in the build step
    assert "benchmarks/model.py" in commands["model"]
    # The sanitizers instrument fastlora's kernels only (the Triton ones are named fastlora_* too).
    assert out.count("--kernel-name kns=fastlora") == 2
    layout = re.search(r"^output under \$OUT: (.*)$", out, flags=re.MULTILINE).group(1).split()
    assert layout == ["gpu_check.txt", "logs/<step>.log", "layer.json", "layer.png", "model_cuda.json"]


# Stand-ins: python3 prints its arguments and writes the files a benchmark given --out writes;
# compute-sanitizer runs the command after its options. FAKE_FAIL names a step script to fail;
# FAKE_NOWRITE makes every step succeed without writing anything.
_PYTHON = """#!/usr/bin/env bash
echo "python3 $*"
case "$*" in
  *"$FAKE_FAIL"*) [ -n "$FAKE_FAIL" ] && exit 3 ;;
esac
[ -n "$FAKE_NOWRITE" ] && exit 0
out=""; prev=""
for a in "$@"; do [ "$prev" = --out ] && out="$a"; prev="$a"; done
case "$*" in
  *benchmarks/layer.py*) [ -n "$out" ] && echo '{}' >"$out/layer.json" && echo png >"$out/layer.png" ;;
  *benchmarks/model.py*) [ -n "$out" ] && echo '{}' >"$out/model_cuda.json" ;;
esac
exit 0
"""
_SANITIZER = """#!/usr/bin/env bash
while [ "${1#-}" != "$1" ]; do case "$1" in --tool|--kernel-name|--error-exitcode) shift 2 ;; *) shift ;; esac; done
exec "$@"
"""


def _run(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, Path]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("python3", _PYTHON), ("compute-sanitizer", _SANITIZER)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    out = tmp_path / "out"
    full = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", OUT=str(out), **{"FAKE_FAIL": "", "FAKE_NOWRITE": "", **env})
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=full, timeout=120), out


def test_a_run_keeps_the_summary_every_log_and_the_results_under_out(tmp_path):
    proc, out = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {p.name for p in (out / "logs").iterdir()} == {f"{s}.log" for s in STEPS}
    assert "benchmarks/layer.py --headline" in (out / "logs" / "layer.log").read_text()
    for name in ("layer.json", "layer.png", "model_cuda.json"):
        assert (out / name).stat().st_size > 0
    summary = (out / "gpu_check.txt").read_text()
    assert all(re.search(rf"^{s}\s+pass \d+s$", summary, flags=re.MULTILINE) for s in STEPS), summary


def test_a_step_that_fails_or_writes_nothing_is_reported(tmp_path):
    proc, out = _run(tmp_path, FAKE_FAIL="benchmarks/model.py")
    assert proc.returncode == 1
    summary = (out / "gpu_check.txt").read_text()
    assert re.search(r"^model\s+FAIL \(rc=3", summary, flags=re.MULTILINE), summary
    assert re.search(r"^racecheck\s+pass", summary, flags=re.MULTILINE)  # the other steps still ran
    proc, out = _run(tmp_path / "again", FAKE_NOWRITE="1")
    summary = (out / "gpu_check.txt").read_text()
    assert proc.returncode == 1
    assert re.search(r"^layer\s+FAIL \(did not write layer.json layer.png", summary, flags=re.MULTILINE), summary
    assert re.search(r"^model\s+FAIL \(did not write model_cuda.json", summary, flags=re.MULTILINE), summary
