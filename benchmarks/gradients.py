"""Gradient-engine benchmark: collecting the mean gradient of every projection weight of a
Llama-style model (random weights from a transformers config, no download) over N batches.

Compared in one process, on the same batches:
  frozen       forward+backward of the frozen model (only the embedding trainable): the floor
  full-ft      plain full fine-tuning forward+backward (every weight gets a .grad)
  hooks        the official codes' approach: tensor hooks copy each weight's .grad to host
               memory and sum it there in the weight's dtype
  exact        fastlora.collect_gradients, accumulators on the device
  exact-cpu    the same with offload="cpu" (pinned host accumulators, staging buffer)
  sketch       fastlora.collect_gradients(mode="sketch", sketch_rank=--sketch-rank)
Reported per variant: seconds per batch, peak device memory (GPU) or peak host RSS (CPU), and
the ratios the spec targets (exact vs full-ft, sketch vs frozen). Sketch quality on a real
pretrained model is measured by benchmarks/sketch_quality.py.

    python benchmarks/gradients.py            # CPU: a small model; GPU: ~1B parameters
    python benchmarks/gradients.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PeakMemory, environment, format_table, write_json  # noqa: E402

import fastlora  # noqa: E402

PRESETS = {
    # name: (hidden, intermediate, layers, heads, kv_heads, vocab, batch, seq)
    "cpu": (256, 688, 4, 8, 8, 1000, 2, 256),
    "quick": (128, 344, 2, 4, 4, 500, 2, 64),
    # wider layers, few tokens: per-layer state (out x in) outweighs activations (benchmarks/distributed.py)
    "wide": (512, 1376, 4, 8, 8, 1000, 1, 32),
    "gpu": (2048, 5632, 16, 16, 16, 32000, 4, 2048),
}


def build_model(preset: str, device: torch.device, dtype: torch.dtype):
    import transformers

    hidden, inter, layers, heads, kv, vocab, _, _ = PRESETS[preset]
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                                   max_position_embeddings=4096)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(device=device, dtype=dtype)


def make_batches(preset: str, n: int, device: torch.device) -> list[dict]:
    _, _, _, _, _, vocab, batch, seq = PRESETS[preset]
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
        out.append({"input_ids": ids, "labels": ids})
    return out


def projection_weights(model) -> dict[str, torch.nn.Parameter]:
    return {name: m.weight for name, m in fastlora.targets.find_linear_targets(model, "all-linear")}


def run_plain(model, batches, trainable: str) -> None:
    """Forward+backward per batch with the given parameters trainable; grads freed each step."""
    for p in model.parameters():
        p.requires_grad_(trainable == "all")
    if trainable == "embedding":
        model.get_input_embeddings().weight.requires_grad_(True)
    for batch in batches:
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)


def run_hooks(model, batches) -> dict:
    """The official codes' approach: a hook per target weight copies its gradient to host memory
    and adds it to a host sum in the weight's dtype."""
    weights = projection_weights(model)
    for p in model.parameters():
        p.requires_grad_(False)
    sums = {name: torch.zeros(w.shape, dtype=w.dtype) for name, w in weights.items()}
    handles = []
    for name, w in weights.items():
        w.requires_grad_(True)
        handles.append(w.register_hook(lambda g, name=name: sums[name].add_(g.detach().to("cpu"))))
    try:
        for batch in batches:
            model(**batch).loss.backward()
            model.zero_grad(set_to_none=True)
    finally:
        for h in handles:
            h.remove()
        for w in weights.values():
            w.requires_grad_(False)
    return sums


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny model, for a smoke run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--sketch-rank", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (median)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                        help="default: bfloat16 on a GPU, float32 on a CPU")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    preset = "quick" if args.quick else ("gpu" if device.type == "cuda" else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = build_model(preset, device, dtype)
    batches = make_batches(preset, args.batches, device)
    sketch_rank = min(args.sketch_rank, PRESETS[preset][0])
    tokens = batches[0]["input_ids"].numel()
    weights = projection_weights(model)
    layer_mib = max(w.numel() for w in weights.values()) * 4 / 2**20
    env = environment(device)
    print(f"# gradients: {preset} Llama-style model, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M "
          f"params, {len(weights)} target layers, {args.batches} batches x {tokens} tokens, {dtype}, "
          f"{env['device']}, torch {env['torch']}", flush=True)

    variants = {
        "frozen": lambda: run_plain(model, batches, "embedding"),
        "full-ft": lambda: run_plain(model, batches, "all"),
        "hooks": lambda: run_hooks(model, batches),
        "exact": lambda: fastlora.collect_gradients(model, batches, offload="device", progress=False),
        "exact-cpu": lambda: fastlora.collect_gradients(model, batches, offload="cpu", progress=False),
        "sketch": lambda: fastlora.collect_gradients(model, batches, mode="sketch", sketch_rank=sketch_rank,
                                                     progress=False),
    }
    memory = PeakMemory(device)
    rows = []
    for name, fn in variants.items():  # warm-up and memory, one variant at a time
        fn()
        memory.reset()
        result = fn()
        row = {"variant": name, "peak MiB": memory.peak_mib()}
        if isinstance(result, fastlora.GradientStats):
            row["accumulators MiB"] = result.summary["accumulator_bytes"] / 2**20
            row["staging MiB"] = result.summary["staging_bytes"] / 2**20
        rows.append(row)
        del result
    # Time: the variants alternate within each round, so machine drift hits all alike.
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t0) / args.batches)
    for row in rows:
        row["s/batch"] = statistics.median(times[row["variant"]])
        print(f"{row['variant']:10s} {row['s/batch']:.4f} s/batch, peak {row['peak MiB']:.0f} MiB", flush=True)
    by = {r["variant"]: r for r in rows}
    for r in rows:
        r["x full-ft"] = r["s/batch"] / by["full-ft"]["s/batch"]
        r["x frozen"] = r["s/batch"] / by["frozen"]["s/batch"]
    summary = {
        "exact / full-ft time": by["exact"]["x full-ft"],
        "sketch / frozen time": by["sketch"]["x frozen"],
        "hooks / exact time": by["hooks"]["s/batch"] / by["exact"]["s/batch"],
        "exact-cpu peak - frozen peak (MiB)": by["exact-cpu"]["peak MiB"] - by["frozen"]["peak MiB"],
        "exact-cpu peak - full-ft peak (MiB)": by["exact-cpu"]["peak MiB"] - by["full-ft"]["peak MiB"],
        "one layer's fp32 gradient (MiB)": layer_mib,
    }
    write_json(Path(args.out) / f"gradients_{device.type}.json",
               {"environment": env, "preset": preset, "dtype": str(dtype), "batches": args.batches,
                "tokens_per_batch": tokens, "rows": rows, "summary": summary})
    print()
    print(format_table(rows, ["variant", "s/batch", "x full-ft", "x frozen", "peak MiB", "accumulators MiB",
                              "staging MiB"]))
    print()
    for k, v in summary.items():
        print(f"{k}: {v:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
