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
  nf4 sharded          QLoRA under FSDP2: the decoder layers' linear layers as bitsandbytes NF4 (packed
                       weights stored as bfloat16, sharded with everything else), AdamW on the adapters
  zero2, zero3         DeepSpeed ZeRO-2 / ZeRO-3 (dense float32 bases), AdamW on the adapters as
                       DeepSpeed's client optimizer (its state partitioned over the ranks; ZeRO-3 also
                       partitions every parameter, small ones included)
  zero2 lora-pro       ZeRO-2 with LoRA-Pro as a gradient transform inside backward
                       (fastlora.optim.lora_pro_gradient_hooks) and AdamW: LoRA-Pro's efficient mode

Each measurement runs in fresh processes, so that peak RSS compares like with like. Reported per
rank (the largest over the ranks): the optimizer state's bytes (the local part of every state
tensor, counted exactly), the accumulator bytes the collection keeps, the process's peak RSS (or
peak device memory), its growth during one forward/backward without an optimizer (what the
layout adds by itself) and during the training steps or the collection, and the median step
time (or the collection's time), and for the NF4 and ZeRO rows the bytes of every parameter this rank
holds (packed 4-bit weights, ZeRO-3's partitions). Everything is float32 (but the NF4 weights); moments
in float32. The ZeRO rows need DeepSpeed (skipped without it). Prints a table, writes
benchmarks/results/distributed.json and .png.

    python benchmarks/distributed.py                 # CPU, gloo, 1 / 2 / 4 processes
    python benchmarks/distributed.py --device cuda --worlds 1 2 4 8
    python benchmarks/distributed.py --parts nf4 zero2 zero3 zero2-lora-pro   # only these rows
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
from _common import PeakMemory, environment, format_table, fully_shard, pyplot, save_figure, write_json  # noqa: E402
from gradients import build_model, make_batches, projection_weights  # noqa: E402

import fastlora  # noqa: E402
from fastlora._distributed import local  # noqa: E402

R, ALPHA = 8, 16
LAYOUTS = ("sharded", "replicated")
PARTS = (*LAYOUTS, "collect", "collect-by-layer", "nf4", "zero2", "zero3", "zero2-lora-pro")
TRAINED = {"nf4": "nf4 sharded", "zero2": "zero2 adamw", "zero3": "zero3 adamw", "zero2-lora-pro": "zero2 lora-pro"}


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of this rank's part of every tensor in the optimizer's state."""
    return sum(local(t).numel() * t.element_size() for s in opt.state.values() for t in s.values()
               if isinstance(t, torch.Tensor))


def _param_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter this rank holds: a DTensor's local shard, a ZeRO-3 partition."""
    total = 0
    for p in model.parameters():
        held = getattr(p, "ds_tensor", None)  # DeepSpeed ZeRO-3 keeps the rank's partition here
        held = local(p) if held is None else held
        total += held.numel() * held.element_size()
    return total


def _quantize(model: torch.nn.Module, device: torch.device) -> None:
    """The decoder layers' linear layers as NF4 (packed weights stored as bfloat16 so FSDP2 shards them)."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for name, module in list(layer.named_modules()):
            if type(module) is torch.nn.Linear:
                quantized = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                              compute_dtype=torch.float32, quant_type="nf4",
                                              quant_storage=torch.bfloat16)
                quantized.weight.data.copy_(module.weight.data)
                parent, _, leaf = name.rpartition(".")
                setattr(layer.get_submodule(parent) if parent else layer, leaf, quantized.to(device))
    model.requires_grad_(False)


def _trained(preset, device, part, batches, warmup) -> dict:
    """AdamW on the adapters under FSDP2 with NF4 bases, or under DeepSpeed ZeRO (optionally with
    LoRA-Pro's gradient transform)."""
    model = build_model(preset, device, torch.float32)
    if part == "nf4":
        _quantize(model, device)
    fastlora.inject(model, target_modules="all-linear", r=R, lora_alpha=ALPHA)
    mem = PeakMemory(device)
    mem.reset()
    start_mib = mem.current_mib()
    if part == "nf4":
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        trainable = [p for p in model.parameters() if p.requires_grad]  # the sharded ones
        run, opt, inner = model, torch.optim.AdamW(trainable, lr=1e-4), None
    else:
        import deepspeed

        deepspeed.init_distributed(dist_backend=dist.get_backend())
        zero = {"stage": int(part[4])}
        if zero["stage"] == 3:
            zero.update(stage3_param_persistence_threshold=0, stage3_model_persistence_threshold=0)
        config = {"train_micro_batch_size_per_gpu": batches[0]["input_ids"].shape[0], "zero_optimization": zero,
                  "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0}
        trainable = [p for p in model.parameters() if p.requires_grad]
        run, inner, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(trainable, lr=1e-4),
                                                config=config)
        opt = getattr(inner, "optimizer", inner)  # the client optimizer on this rank's flat partition
    times = []
    for batch in batches:
        start = time.perf_counter()
        if inner is None:
            run(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
        else:
            if part.endswith("lora-pro"):
                with fastlora.optim.lora_pro_gradient_hooks(model):
                    run.backward(run(**batch).loss)
            else:
                run.backward(run(**batch).loss)
            run.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return {"optimizer_state_bytes": _state_bytes(opt), "param_bytes": _param_bytes(model),
            "peak_mib": mem.peak_mib(), "forward_backward_growth_mib": float("nan"),
            "peak_growth_mib": mem.peak_mib() - start_mib, "step_s": statistics.median(times[warmup:])}


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
    elif args.part in TRAINED:
        result = _trained(args.preset, device, args.part, mine, args.warmup)
    else:
        result = _lora_pro(args.preset, device, args.part, mine, args.warmup)
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    # No teardown of gloo: destroying its process group can abort or deadlock (see tests/distributed/gloo.py).
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
                "vs 1 process": size / max(max(r[size_key] for r in one[part]), 1e-30),
                "params MiB per rank": max(r["param_bytes"] for r in ranks) / 2**20 if "param_bytes" in ranks[0]
                else "-",
                "peak MiB per rank": max(r["peak_mib"] for r in ranks),
                "fwd/bwd growth MiB": "-" if part.startswith("collect") or part in TRAINED
                else max(r["forward_backward_growth_mib"] for r in ranks),
                "growth MiB (steps / collection)": max(r["peak_growth_mib"] for r in ranks),
                "step / collection s": max(r[time_key] for r in ranks)}

    for world in runs:
        have = runs[world]
        for layout in LAYOUTS:
            if layout in have:
                rows.append(row(world, f"lora-pro {layout}", layout, "optimizer_state_bytes", "step_s"))
        if "collect" in have:
            rows.append(row(world, "collect (kept)", "collect", "accumulator_bytes", "time_s"))
            rows.append(row(world, "collect (held at most)", "collect", "accumulator_bytes_peak", "time_s"))
        if "collect-by-layer" in have:
            rows.append(row(world, "collect by layer (held at most)", "collect-by-layer", "accumulator_bytes_peak",
                            "time_s"))
        for part, measure in TRAINED.items():
            if part in have:
                rows.append(row(world, measure, part, "optimizer_state_bytes", "step_s"))
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


# Llama 3 shapes: hidden, intermediate, layers, kv width (8 heads of 128), vocab.
LLAMAS = {"8B": (4096, 14336, 32, 1024, 128256), "70B": (8192, 28672, 80, 1024, 128256)}
GB = 1e9


def _linear_shapes(hidden: int, inter: int, kv: int) -> list[tuple[int, int]]:
    """(out, in) of one decoder layer's q, k, v, o, gate, up, down projections."""
    return [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (inter, hidden), (inter, hidden),
            (hidden, inter)]


def memory_model(gpus: int = 8, r: int = 16, sketch_k: int = 64) -> list[dict]:
    """Per-rank bytes on paper (docs/distributed.md#memory-model), in GB (10^9 bytes), before
    activations: bases in bfloat16 or NF4 (0.5 byte per weight, plus one float32 absmax per 64
    weights that every rank keeps whole: bitsandbytes' quant_state is not a parameter, so FSDP2
    does not shard it), embeddings and head in bfloat16; adapters (r on every projection) in
    float32 with their gradients and AdamW's two moments; LoRA-Pro's full-mode moments (two
    ``out x in`` per layer) in bfloat16; LoRA-GA/GoRA's exact accumulators (float32 ``out x in``)
    and sketches (``(out + 2 in) k`` float32 per layer)."""
    rows = []
    for name, (hidden, inter, layers, kv, vocab) in LLAMAS.items():
        shapes = _linear_shapes(hidden, inter, kv) * layers
        linear = sum(o * i for o, i in shapes)
        embed = 2 * vocab * hidden
        adapters = sum(r * (o + i) for o, i in shapes)
        sketch = sum((o + 2 * i) * sketch_k for o, i in shapes)
        for base in ("bf16", "nf4"):
            base_bytes = (2 if base == "bf16" else 0.5) * linear + 2 * embed
            absmax = 4 * linear / 64 if base == "nf4" else 0
            rows.append({
                "model": f"{name} {base}", "params (B)": (linear + embed) / 1e9,
                "base whole": (base_bytes + absmax) / GB,
                "base FSDP2/ZeRO-3": (base_bytes / gpus + absmax) / GB,
                "LoRA (A, B, grads, AdamW) sharded": 16 * adapters / gpus / GB,
                "LoRA-Pro full moments sharded": 4 * linear / gpus / GB,
                "LoRA-Pro full moments replicated": 4 * linear / GB,
                "LoRA-Pro efficient (replicated)": 8 * adapters / GB,
                "LoRA-GA exact: whole accumulators": 4 * linear / GB,
                "LoRA-GA exact shard=True: kept rows": 4 * linear / gpus / GB,
                f"LoRA-GA sketch k={sketch_k}": 4 * sketch / GB,
            })
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--preset", default="wide", help="benchmarks/gradients.py's model presets")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=6, help="training steps per layout (the first --warmup untimed)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--calibration-batches", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="which measurements")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "distributed.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)
    parser.add_argument("--memory-model", action="store_true",
                        help="print the paper memory model for Llama 8B / 70B on 8 GPUs (docs/distributed.md) and exit")
    args = parser.parse_args(argv)
    if args.memory_model:
        rows = memory_model()
        print(format_table(rows, list(rows[0])))
        return 0
    if args.worker:
        worker(args)
        return 0
    parts = list(args.parts)
    if any(p.startswith("zero") for p in parts):
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            print("DeepSpeed is not installed: leaving out the ZeRO rows", file=sys.stderr)
            parts = [p for p in parts if not p.startswith("zero")]
    runs = {world: {part: _launch(args, world, part) for part in parts} for world in args.worlds}
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
