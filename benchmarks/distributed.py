"""Per-rank memory and step time of LoRA-Pro and of the gradient engine on 1, 2 and 4 processes.

A Llama-style model (random weights from a transformers config, benchmarks/gradients.py's
builder; by default its "wide" preset: 4 layers of width 512, 32-token sequences, so that the
out x in state outweighs the activations), adapters (r = 8) on every linear layer but the head,
each rank its own batches.
For each number of processes, launched with torchrun (gloo on CPUs, nccl with --device cuda):

  lora-pro sharded     FSDP2 (fully_shard per decoder layer and on the root), fastlora.optim.LoRAPro
                       in full mode: the out x in moments are row-sharded DTensors (docs/distributed.md)
  lora-pro replicated  the official LoRA-Pro's ZeRO-2 layout, where every rank keeps the whole moments:
                       emulated by DistributedDataParallel with the same optimizer (unsharded moments)
  collect              fastlora.collect_gradients(exact, shard=True) over the rank's batches: the
                       accumulator bytes kept afterwards, and the most held at once (all whole, in one pass)
  collect by layer     the same with offload="passes" and a budget of the largest layer: one layer per
                       pass, each reduced to its rows as soon as its pass is done

Each measurement runs in fresh processes, so that peak RSS compares like with like. Reported per
rank (the largest over the ranks): the optimizer state's bytes (the local part of every state
tensor, counted exactly), the accumulator bytes the collection keeps, the process's peak RSS (or
peak device memory), its growth during one forward/backward without an optimizer (what the
layout adds by itself) and during the training steps or the collection, and the median step
time (or the collection's time). Everything is float32; moments in float32 for both layouts. Prints a table,
writes benchmarks/results/distributed.json and .png.

    python benchmarks/distributed.py                 # CPU, gloo, 1 / 2 / 4 processes
    python benchmarks/distributed.py --device cuda --worlds 1 2 4 8
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, format_table, pyplot, save_figure, write_json  # noqa: E402
from gradients import build_model, make_batches, projection_weights  # noqa: E402

import fastlora  # noqa: E402
from fastlora._distributed import local  # noqa: E402
from fastlora.examples.fsdp import fully_shard  # noqa: E402
from fastlora.examples.memory import PeakMemory  # noqa: E402

R, ALPHA = 8, 16
LAYOUTS = ("sharded", "replicated")
PARTS = (*LAYOUTS, "collect", "collect-by-layer")


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of this rank's part of every tensor in the optimizer's state."""
    return sum(local(t).numel() * t.element_size() for s in opt.state.values() for t in s.values()
               if isinstance(t, torch.Tensor))


def _model(preset: str, device: torch.device, layout: str | None) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(what to call, what the optimizer sees): the adapted model, sharded or DDP-wrapped."""
    model = build_model(preset, device, torch.float32)
    fastlora.inject(model, target_modules="all-linear", r=R, lora_alpha=ALPHA)
    if layout == "sharded":
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    elif layout == "replicated" and dist.get_world_size() > 1:
        return torch.nn.parallel.DistributedDataParallel(model), model
    return model, model


def _lora_pro(preset, device, layout, batches, warmup) -> dict:
    run, model = _model(preset, device, layout)
    mem = PeakMemory(device)
    # First one forward/backward without an optimizer: what the layout itself adds (FSDP's
    # gathered parameters and communication buffers), apart from the optimizer's part.
    mem.reset()
    start_mib = mem.current_mib()
    run(**batches[0]).loss.backward()
    model.zero_grad(set_to_none=True)
    forward_backward_growth = mem.peak_mib() - start_mib
    mem.reset()
    start_mib = mem.current_mib()
    opt = fastlora.optim.LoRAPro(model, lr=1e-4, mode="full", moment_dtype=torch.float32)
    times = []
    for batch in batches:
        start = time.perf_counter()
        run(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return {"optimizer_state_bytes": _state_bytes(opt), "peak_mib": mem.peak_mib(),
            "forward_backward_growth_mib": forward_backward_growth, "peak_growth_mib": mem.peak_mib() - start_mib,
            "step_s": statistics.median(times[warmup:])}


def _collect(preset, device, batches, by_layer: bool) -> dict:
    model = build_model(preset, device, torch.float32)
    options = {}
    if by_layer:
        largest = max(w.numel() * w.element_size() for w in projection_weights(model).values())
        options = {"offload": "passes", "memory_budget": largest}
    mem = PeakMemory(device)
    mem.reset()
    start_mib = mem.current_mib()
    stats = fastlora.collect_gradients(model, batches, shard=True, progress=False, **options)
    s = stats.summary
    return {"accumulator_bytes": s["accumulator_bytes"], "accumulator_bytes_whole": s["accumulator_bytes_whole"],
            "accumulator_bytes_peak": s["accumulator_bytes_peak"], "passes": s["passes"],
            "peak_mib": mem.peak_mib(), "peak_growth_mib": mem.peak_mib() - start_mib, "time_s": s["time_s"]}


def worker(args) -> None:
    """One rank (started by torchrun): the measurement ``args.part``, written to ``args.out/rank{r}.json``."""
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        device = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.set_num_threads(args.threads)
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = make_batches(args.preset, world * args.steps, device)[rank::world]  # each rank its own batches
    if args.part.startswith("collect"):
        result = _collect(args.preset, device, mine[: args.calibration_batches], args.part == "collect-by-layer")
    else:
        result = _lora_pro(args.preset, device, args.part, mine, args.warmup)
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    # No teardown of gloo: destroying its process group can abort or deadlock (see tests/gloo.py).
    sys.stdout.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args, world: int, part: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), __file__, "--worker", "--out", out,
               "--part", part,
               "--preset", args.preset, "--device", args.device, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--calibration-batches", str(args.calibration_batches),
               "--threads", str(args.threads)]
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]


def _rows(runs: dict[int, dict[str, list[dict]]]) -> list[dict]:
    """One row per (world, measurement): the largest value over the ranks, and its ratio to the
    one-process value."""
    rows = []
    one = runs[min(runs)]

    def row(world, measure, part, size_key, time_key):
        ranks = runs[world][part]
        size = max(r[size_key] for r in ranks)
        return {"processes": world, "measure": measure, "state/acc MiB per rank": size / 2**20,
                "vs 1 process": size / max(r[size_key] for r in one[part]),
                "peak MiB per rank": max(r["peak_mib"] for r in ranks),
                "fwd/bwd growth MiB": "-" if part.startswith("collect")
                else max(r["forward_backward_growth_mib"] for r in ranks),
                "growth MiB (steps / collection)": max(r["peak_growth_mib"] for r in ranks),
                "step / collection s": max(r[time_key] for r in ranks)}

    for world in runs:
        for layout in LAYOUTS:
            rows.append(row(world, f"lora-pro {layout}", layout, "optimizer_state_bytes", "step_s"))
        rows.append(row(world, "collect (kept)", "collect", "accumulator_bytes", "time_s"))
        rows.append(row(world, "collect (held at most)", "collect", "accumulator_bytes_peak", "time_s"))
        rows.append(row(world, "collect by layer (held at most)", "collect-by-layer", "accumulator_bytes_peak",
                        "time_s"))
    return rows


def _plot(path: Path, rows: list[dict]) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for measure in dict.fromkeys(r["measure"] for r in rows):
        mine = [r for r in rows if r["measure"] == measure]
        ax.plot([r["processes"] for r in mine], [r["state/acc MiB per rank"] for r in mine], marker="o", label=measure)
    ax.set_xlabel("processes")
    ax.set_ylabel("MiB per rank (optimizer state / accumulators)")
    ax.set_xticks(sorted({r["processes"] for r in rows}))
    ax.legend(loc="center right", fontsize=8)
    ax.set_title("Per-rank optimizer state and gradient accumulators")
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--preset", default="wide", help="benchmarks/gradients.py's model presets")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=6, help="training steps per layout (the first --warmup untimed)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--calibration-batches", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "distributed.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    runs = {world: {part: _launch(args, world, part) for part in PARTS} for world in args.worlds}
    rows = _rows(runs)
    print(f"# distributed: {args.preset} Llama-style model, r = {R}, LoRA-Pro full mode (float32 moments), "
          f"{args.device}, {args.threads} thread(s) per process, torch {torch.__version__}")
    print(format_table(rows, list(rows[0])))
    out = Path(args.out)
    write_json(out, {"environment": environment(args.device), "args": vars(args), "rows": rows, "ranks": runs})
    png = _plot(out.with_suffix(".png"), rows)
    print(f"wrote {out}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
