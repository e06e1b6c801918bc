"""A launcher for tests that run a function on several CPU processes over gloo.

Each rank ends with ``os._exit``: it skips the interpreter's teardown, where destroying a gloo
process group (or a DDP reducer that holds one) can deadlock on the GIL against gloo's own worker
thread (seen here: the main thread joins the worker while holding the GIL, the worker needs the GIL
to free a finished work item), which would hang the test run instead of failing it."""

from __future__ import annotations

import os
import socket
import sys
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def exit_rank(ok: bool) -> None:
    """Ends this rank's process at once (flushing output first), with status 0 or 1."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if ok else 1)


def _entry(rank: int, world: int, port: int, out_dir: str, fn, args) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    ok = False
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        torch.set_num_threads(1)
        result = fn(rank, world, out_dir, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank leaves while another still talks to it
        ok = True
    except BaseException:
        traceback.print_exc()
    exit_rank(ok)


def spawn(fn, out_dir, *args, world: int = 2) -> list:
    """Runs ``fn(rank, world, out_dir, *args)`` on ``world`` gloo processes; returns what each
    returned (a rank that raises prints its traceback and fails the spawn)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_entry, args=(world, port, str(out_dir), fn, args), nprocs=world, join=True)
    return [torch.load(os.path.join(str(out_dir), f"rank{r}.pt"), weights_only=False) for r in range(world)]
