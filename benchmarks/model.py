"""Whole-model training-step benchmark: fastlora vs PEFT vs plain PyTorch LoRA.

A Llama-style model from a `transformers` config with random weights (no download): ~1B parameters
on a GPU (the configuration of `measured_baselines.md`), a small one on a CPU. All linear layers
but the head adapted with r = 16, alpha = 32. One training step = forward + loss + backward (no
optimizer), median over timed steps after warm-up, with and without gradient checkpointing.
Variants, each on a fresh copy of the same weights and batch:
  frozen          only the embedding trainable (the floor for any adapter method)
  full-ft         every weight trainable
  fastlora        fastlora.inject(all-linear), float32 adapters, layer shapes settled by
                  fastlora.tune (measured dispatch) before timing
  peft            get_peft_model(LoraConfig(...)), PEFT's default (float32 adapters)
  peft-bf16       the same with autocast_adapter_dtype=False (adapters in the model dtype)
  plain           F.linear(x, W) + s * F.linear(F.linear(x, A), B), adapters in the model dtype
Also the cost of a LoRA-GA / GoRA gradient collection (fastlora.collect_gradients, exact mode, over
--calibration-batches batches) relative to one epoch of training steps (--epoch-steps).

    python benchmarks/model.py            # CPU: small model; GPU: ~1B parameters
    python benchmarks/model.py --quick
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PeakMemory, environment, format_table, write_json  # noqa: E402
from gradients import build_model, make_batches  # noqa: E402
from layer_cpu import PlainLoRA  # noqa: E402

import fastlora  # noqa: E402

R, ALPHA = 16, 32


def adapt(model: nn.Module, variant: str) -> nn.Module:
    model = copy.deepcopy(model)
    if variant == "frozen":
        model.requires_grad_(False)
        model.get_input_embeddings().weight.requires_grad_(True)
    elif variant == "full-ft":
        model.requires_grad_(True)
    elif variant == "fastlora":
        fastlora.inject(model, "all-linear", r=R, lora_alpha=ALPHA)
    elif variant in ("peft", "peft-bf16"):
        import peft

        cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear")
        model = peft.get_peft_model(model, cfg, autocast_adapter_dtype=(variant == "peft"))
    elif variant == "plain":
        model.requires_grad_(False)
        for name, module in fastlora.targets.find_linear_targets(model, "all-linear"):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, PlainLoRA(module, R, ALPHA, 0.0))
    else:
        raise ValueError(variant)
    return model


def step_fn(model: nn.Module, batch: dict):
    def step():
        model(**batch).loss.backward()
        for p in model.parameters():
            p.grad = None
    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 10 GPU / 3 CPU)")
    parser.add_argument("--calibration-batches", type=int, default=8)
    parser.add_argument("--epoch-steps", type=int, default=528,
                        help="steps in one training epoch (default: the main job's, 8454 sentences / 16)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    preset = "quick" if args.quick else ("gpu" if device.type == "cuda" else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    steps = args.steps or (10 if device.type == "cuda" else 3)
    base = build_model(preset, device, dtype)
    batch = make_batches(preset, 1, device)[0]
    tokens = batch["input_ids"].numel()
    env = environment(device)
    print(f"# model: {preset} Llama-style, {sum(p.numel() for p in base.parameters()) / 1e6:.1f} M params, "
          f"{tokens} tokens/step, {dtype}, {env['device']}, torch {env['torch']}", flush=True)
    memory = PeakMemory(device)
    variants = ["frozen", "full-ft", "fastlora", "peft", "peft-bf16", "plain"]
    rows = []
    for checkpointing in (False, True):
        models = {}
        for v in variants:
            m = adapt(base, v).train()
            if checkpointing:
                m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                if hasattr(m, "enable_input_require_grads"):
                    m.enable_input_require_grads()
            if v == "fastlora":
                fastlora.tune(m, batch)  # prints "fastlora: chose ... for N layer shapes in ... s"
            models[v] = m
        times = {v: [] for v in variants}
        peaks = {}
        for v, m in models.items():  # warm-up and memory
            step_fn(m, batch)()
            memory.reset()
            step_fn(m, batch)()
            peaks[v] = memory.peak_mib()
        for _ in range(steps):  # alternate variants within each round
            for v, m in models.items():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                step_fn(m, batch)()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[v].append(time.perf_counter() - t0)
        frozen = statistics.median(times["frozen"])
        for v in variants:
            t = statistics.median(times[v])
            rows.append({"checkpointing": checkpointing, "variant": v, "ms/step": 1e3 * t,
                         "tokens/s": tokens / t, "x frozen": t / frozen, "peak MiB": peaks[v]})
        del models
    by = {(r["checkpointing"], r["variant"]): r for r in rows}
    for ckpt in (False, True):
        by[(ckpt, "fastlora")]["x peft"] = by[(ckpt, "peft")]["ms/step"] / by[(ckpt, "fastlora")]["ms/step"]

    # Gradient collection (exact mode) vs one epoch of fastlora training steps.
    calib = make_batches(preset, args.calibration_batches, device)
    model = copy.deepcopy(base)
    fastlora.collect_gradients(model, calib[:1], progress=False)  # warm-up
    t0 = time.perf_counter()
    stats = fastlora.collect_gradients(model, calib, progress=False)
    collect_s = time.perf_counter() - t0
    epoch_s = args.epoch_steps * by[(False, "fastlora")]["ms/step"] / 1e3
    collection = {"calibration_batches": args.calibration_batches, "seconds": collect_s,
                  "epoch_steps": args.epoch_steps, "epoch_seconds": epoch_s, "fraction_of_epoch": collect_s / epoch_s,
                  "accumulator_mib": stats.summary["accumulator_bytes"] / 2**20}
    write_json(Path(args.out) / f"model_{device.type}.json",
               {"environment": env, "preset": preset, "dtype": str(dtype), "tokens_per_step": tokens,
                "rows": rows, "gradient_collection": collection})
    print(format_table(rows, ["checkpointing", "variant", "ms/step", "tokens/s", "x frozen", "x peft", "peak MiB"]))
    print(f"\ngradient collection: {args.calibration_batches} batches in {collect_s:.2f} s = "
          f"{100 * collection['fraction_of_epoch']:.1f}% of an epoch of {args.epoch_steps} fastlora training steps "
          f"({epoch_s:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
