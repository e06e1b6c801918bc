"""docs/distributed.md's multi-node command proven on one machine: two torchrun "nodes" of 2 CPU
processes each (gloo), meeting at a c10d rendezvous on 127.0.0.1, run the FSDP2 example end to
end, launched as a user would: LoRA-GA from gradients collected sharded over the 4 ranks,
LoRA-Pro, and a sharded checkpoint."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fsdp_helpers import needs_fsdp2

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fsdp.py"  # launched as a script, as users do

pytestmark = [needs_fsdp2, pytest.mark.slow]  # multi-process (gloo)


def test_torchrun_two_nodes_run_the_fsdp_example_with_lora_ga_and_lora_pro(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "2",
             "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "fastlora-test",
             "--local_addr", "127.0.0.1",
             str(EXAMPLE), "--init", "lora-ga", "--optimizer", "lora-pro", "--steps", "6",
             "--save", str(tmp_path / "ckpt")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for _ in range(2)
    ]
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=240))
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    stdout = "".join(out for out, _ in outputs)  # rank 0 prints; it is on whichever node got it
    kept, whole = re.search(r"kept per rank ([\d.]+) MiB of ([\d.]+) MiB", stdout).groups()
    assert kept == f"{float(whole) / 4:.2f}"  # 256 and 64 rows: quarters (printed to 2 decimals)
    losses = [float(v) for v in re.findall(r"rank-0 loss ([\d.]+)", stdout)]
    assert len(losses) == 2 and losses[-1] < losses[0]
    assert "saved a sharded checkpoint" in stdout and (tmp_path / "ckpt" / ".metadata").exists()
