"""One rank of the 2-process gloo test in test_gradients.py (run as a script)."""

import sys

import torch
import torch.distributed as dist

import fastlora
from gloo import exit_rank
from helpers import make_mlp_problem

if __name__ == "__main__":
    rank, world, init_file, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model, batches, loss_fn = make_mlp_problem()
    shard = batches[rank::world]
    exact = fastlora.collect_gradients(model, shard, loss_fn=loss_fn, progress=False)
    sketch = fastlora.collect_gradients(model, shard, loss_fn=loss_fn, progress=False, mode="sketch", sketch_rank=4)
    torch.save({
        "exact": {n: (g.mean, g.count) for n, g in exact.items()},
        "sketch": {n: (g.sketch.range, g.sketch.corange, g.count) for n, g in sketch.items()},
        "loss": exact.summary["mean_loss"],
    }, out)
    dist.barrier()
    exit_rank(True)  # no interpreter teardown of gloo (see gloo.py)
