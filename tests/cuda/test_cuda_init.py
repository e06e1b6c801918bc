"""LoRA-GA, GoRA and adapter I/O on CUDA models (skipped without CUDA)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastlora

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(40, 64), nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 40)).cuda()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 40, (4, 16), generator=g).cuda(), torch.randint(0, 40, (4, 16), generator=g).cuda())
               for _ in range(2)]

    def loss_fn(m, b):
        return nn.functional.cross_entropy(m(b[0]).reshape(-1, 40), b[1].reshape(-1))

    return model, batches, loss_fn


@pytest.mark.parametrize("init", ["lora_ga", "gora"])
def test_gradient_inits_on_cuda(init, tmp_path):
    model, batches, loss_fn = _problem()
    base = copy.deepcopy(model)
    stats = fastlora.collect_gradients(model, batches, ["1", "3"], loss_fn=loss_fn, progress=False)
    fastlora.inject(model, ["1", "3"], r=4, lora_alpha=8, init=init, gradients=stats)
    ids = batches[0][0]
    if init == "lora_ga":
        torch.testing.assert_close(model(ids), base(ids), rtol=1e-5, atol=1e-5)
    assert all(layer.lora_A.is_cuda for layer in fastlora.lora_layers(model).values())
    fastlora.save_adapter(model, tmp_path / "a")
    restored = fastlora.load_adapter(copy.deepcopy(base), tmp_path / "a")
    torch.testing.assert_close(restored(ids), model(ids), rtol=1e-5, atol=1e-5)
