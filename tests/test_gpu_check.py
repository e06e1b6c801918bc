"""benchmarks/gpu_check.sh's plan (its --dry-run, which needs no GPU) fits one 8-minute device call."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
DEVICE_CALL_S = 480  # one call of at most 8 minutes out of 15 minutes of device time


def test_dry_run_plan_fits_the_device_budget():
    out = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, check=True).stdout
    print(out)
    steps = re.findall(r"^(\S+)\s+(\d+) s  ", out, flags=re.MULTILINE)
    total = int(re.search(r"^total budget: (\d+) s$", out, flags=re.MULTILINE).group(1))
    assert [name for name, _ in steps] == ["build", "correctness", "layer", "gpu-tests", "memcheck", "racecheck"]
    assert sum(int(b) for _, b in steps) == total <= DEVICE_CALL_S
    # The sanitizers instrument fastlora's kernels only.
    assert out.count("--kernel-name kns=fastlora") == 2
