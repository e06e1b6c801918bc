"""docs/distributed.md's torchrun command on two CPU processes (gloo): the FSDP2 example with a
LoRA-GA initialisation from gradients collected sharded over the ranks, LoRA-Pro, and a sharded
checkpoint, launched as a user would."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from fsdp_helpers import needs_fsdp2

pytestmark = needs_fsdp2


def test_torchrun_runs_the_fsdp_example_with_lora_ga_and_lora_pro(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fastlora.examples.fsdp", "--init", "lora-ga", "--optimizer", "lora-pro", "--steps", "6",
           "--save", str(tmp_path / "ckpt")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    kept, whole = map(float, re.search(r"kept per rank ([\d.]+) MiB of ([\d.]+) MiB", run.stdout).groups())
    assert kept == whole / 2  # 256 and 64 rows: halves
    losses = [float(v) for v in re.findall(r"rank-0 loss ([\d.]+)", run.stdout)]
    assert len(losses) == 2 and losses[-1] < losses[0]
    assert "saved a sharded checkpoint" in run.stdout and (tmp_path / "ckpt" / ".metadata").exists()
