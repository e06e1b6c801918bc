"""Adapter files written by fastlora 0.1 before the package layout changed (commit 77f5364, by
the script in this file's docstring history: a tiny four-layer model, LoRA with rsLoRA, dropout,
rank/alpha patterns and a trained head, the same adapters with folded scales, and a LoRA-GA
adapter) still load, in both formats, to the outputs that version computed."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import fastlora

FILES = Path(__file__).parents[1] / "data" / "files_0_1"
EPS32 = torch.finfo(torch.float32).eps


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(12, 10)
        self.v_proj = nn.Linear(10, 12, bias=False)
        self.up = nn.Linear(12, 7)
        self.score = nn.Linear(7, 3)

    def forward(self, x):
        return self.score(torch.relu(self.up(self.v_proj(torch.tanh(self.q_proj(x))))))


def _base() -> Tiny:
    model = Tiny()
    model.load_state_dict(load_file(str(FILES / "base.safetensors")))
    return model


def _check(model: nn.Module, expected: str) -> None:
    x = load_file(str(FILES / "input.safetensors"))["x"]
    want = load_file(str(FILES / "expected.safetensors"))[expected]
    got = model.eval()(x).detach()
    # four float32 layers of at most 12-term sums, evaluated in another order (folded scales, merged
    # offsets): a few dozen roundings of the largest intermediate values (|.| < 10) at most
    torch.testing.assert_close(got, want, rtol=0, atol=64 * EPS32 * 10)
    assert not torch.equal(got, _base().eval()(x)), "the adapters must change the output"


@pytest.mark.parametrize(("folder", "expected"), [("peft_patterns_head", "patterns_head"),
                                                  ("peft_folded", "patterns_head"),
                                                  ("peft_lora_ga", "lora_ga")])
def test_peft_files_from_0_1_import(folder, expected):
    model = fastlora.import_peft(_base(), FILES / folder)
    _check(model, expected)


@pytest.mark.parametrize(("folder", "expected"), [("native_patterns_head", "patterns_head"),
                                                  ("native_lora_ga", "lora_ga")])
def test_native_files_from_0_1_load(folder, expected):
    model = fastlora.load_adapter(_base(), FILES / folder)
    _check(model, expected)
    assert {"q_proj", "up"} <= set(fastlora.lora_layers(model))
