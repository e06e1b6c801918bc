"""QLoRA on CPU: fastlora vs PEFT on the same 4-bit (NF4) base loaded by transformers.

A Llama-style model with random weights is saved once and loaded with
``BitsAndBytesConfig(load_in_4bit=True)`` (NF4, double quantization, float32 compute); every
linear layer but the head gets an r = 16, alpha = 32 adapter. Each variant runs in its own
process (both import fastlora, PEFT and transformers, so imports cost them alike): peak RSS over
the training steps (the kernel's high-water mark, reset after loading and three warm-up steps) and
the median time of a training step (forward, loss, backward, AdamW). The variants alternate
over ``--rounds``; times are those of each variant's least disturbed round (the lowest median:
other jobs on a shared machine only slow steps down), memory and errors medians over rounds.

fastlora's worker also times ``collect_gradients`` (exact mode, one batch) against its step, and
measures what LoRA-GA's offset would cost if it were written into the 4-bit weight (as on a
float base) instead of being kept as the exact term ``-s·B0 A0 x``: the re-quantisation error
relative to the offset, and the change of the logits at initialisation.

    python benchmarks/qlora.py            # writes benchmarks/results/qlora.json and docs/img/qlora.png
    python benchmarks/qlora.py --quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, format_table, pyplot, save_figure, write_json  # noqa: E402

VARIANTS = ("fastlora", "peft")
RESULTS = Path(__file__).resolve().parent / "results"
IMAGE = Path(__file__).resolve().parents[1] / "docs" / "img" / "qlora.png"


def model_config(quick: bool):
    import transformers

    size = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2) if quick else \
        dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4)
    return transformers.LlamaConfig(vocab_size=1000, num_attention_heads=4, num_key_value_heads=4,
                                    max_position_embeddings=512, pad_token_id=0, **size)


def peak_rss_reset() -> None:
    """Resets the kernel's peak-RSS mark (VmHWM) of this process (Linux)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def load_quantized(path: str):
    import transformers

    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    return transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu",
                                                             dtype=torch.float32)


def worker(variant: str, path: str, steps: int, tokens: int, batch: int) -> dict:
    import fastlora
    import peft

    torch.manual_seed(0)
    model = load_quantized(path)
    ids = torch.randint(1, 1000, (batch, tokens), generator=torch.Generator().manual_seed(1))
    data = {"input_ids": ids, "labels": ids}
    result: dict = {"variant": variant}
    if variant == "fastlora":
        model = fastlora.inject(model, "all-linear", r=16, lora_alpha=32)
    else:
        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    result["trainable"] = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = model(**data).loss
        loss.backward()
        opt.step()
        return loss.item()

    for _ in range(3):  # warm-up: the first steps of either variant can be ten times slower
        step()
    peak_rss_reset()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    result["peak_rss_mib"] = peak_rss_mib()
    result["step_ms"] = 1e3 * statistics.median(times)
    result["step_ms_all"] = [round(1e3 * t, 2) for t in times]
    if variant == "fastlora":
        result.update(gradient_costs(model, path, data, result["step_ms"]))
    return result


def gradient_costs(model, path: str, data: dict, step_ms: float) -> dict:
    """collect_gradients' time against a training step, and what writing LoRA-GA's offset into the
    4-bit weight would cost (re-quantisation error, change of the logits at initialisation)."""
    import fastlora
    from fastlora.quantized import dense_weight, requantize, swap_weight

    base = load_quantized(path)
    t0 = time.perf_counter()
    stats = fastlora.collect_gradients(base, [data], progress=False)
    collect_ms = 1e3 * (time.perf_counter() - t0)
    fastlora.inject(base, "all-linear", r=16, lora_alpha=32, init="lora_ga", gradients=stats)
    base.eval()
    with torch.no_grad():
        exact = base(input_ids=data["input_ids"]).logits
        offset_errors, weight_errors = [], []
        for layer in fastlora.lora_layers(base).values():
            offset = layer.delta_weight(*layer.base_offset)
            target = dense_weight(layer.base_layer) - offset
            swap_weight(layer.base_layer, requantize(layer.base_layer, target))
            error = dense_weight(layer.base_layer) - target
            offset_errors.append((error.norm() / offset.norm()).item())
            weight_errors.append((error.norm() / target.norm()).item())
            # the offset now lives in the weight: the layer computes Q(W - s·B0 A0) x + s·B0 A0 x
            layer.set_adapter(layer.lora_A, layer.lora_B, layer.config)
        written = base(input_ids=data["input_ids"]).logits
    return {
        "collect_ms": collect_ms,
        "collect_over_step": collect_ms / step_ms,
        "offset_requant_error_over_offset_median": statistics.median(offset_errors),
        "offset_requant_error_over_weight_median": statistics.median(weight_errors),
        "logits_change_if_written_max": (written - exact).abs().max().item(),
        "logits_max": exact.abs().max().item(),
    }


def plot(rows: list[dict]) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.5))
    for ax, key, label in zip(axes, ("step_ms", "peak_rss_mib"), ("ms / training step", "peak RSS over steps, MiB")):
        ax.bar([r["variant"] for r in rows], [r[key] for r in rows], color=["tab:blue", "tab:orange"])
        ax.set_ylabel(label)
    fig.suptitle("QLoRA (NF4 base) on CPU, r = 16, all linear layers")
    return save_figure(fig, IMAGE, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smaller model, fewer steps")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    steps = args.steps or (4 if args.quick else 10)
    if args.worker:
        print(json.dumps(worker(args.worker, args.path, steps, args.tokens, args.batch)))
        return

    import transformers

    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(model_config(args.quick)).save_pretrained(tmp)
        for _ in range(args.rounds):
            for variant in VARIANTS:
                cmd = [sys.executable, __file__, "--worker", variant, "--path", tmp, "--steps", str(steps),
                       "--tokens", str(args.tokens), "--batch", str(args.batch)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                runs[variant].append(json.loads(out.strip().splitlines()[-1]))
    rows = []
    for variant, results in runs.items():
        # Times: the least disturbed round (others' jobs share the cores); the rest: medians.
        row = {k: (min if k.endswith("_ms") else statistics.median)(r[k] for r in results)
               for k, v in results[0].items() if isinstance(v, float)}
        row = {"variant": variant, "trainable": results[0]["trainable"], **row}
        row["collect_over_step"] = row["collect_ms"] / row["step_ms"] if "collect_ms" in row else None
        rows.append(row)
    rows[0]["x_peft_time"] = rows[0]["step_ms"] / rows[1]["step_ms"]
    rows[0]["x_peft_rss"] = rows[0]["peak_rss_mib"] / rows[1]["peak_rss_mib"]
    print(format_table(rows, ["variant", "trainable", "step_ms", "peak_rss_mib", "x_peft_time", "x_peft_rss"]))
    extra = {k: v for k, v in rows[0].items() if k.startswith(("collect", "offset", "logits"))}
    print(json.dumps(extra, indent=2))
    payload = {"environment": environment(), "settings": vars(args) | {"steps": steps}, "rows": rows, "runs": runs}
    print("wrote", write_json(RESULTS / "qlora.json", payload), plot(rows))


if __name__ == "__main__":
    main()
