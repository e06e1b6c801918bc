"""GPU tests of the gradient engine (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastlora

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _problem(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 256), nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256),
                          nn.Linear(256, 50)).to("cuda", dtype)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 50, (4, 64), generator=g).cuda(), torch.randint(0, 50, (4, 64), generator=g).cuda())
               for _ in range(3)]

    def loss_fn(m, batch):
        return nn.functional.cross_entropy(m(batch[0]).float().reshape(-1, 50), batch[1].reshape(-1))

    return model, batches, loss_fn


def _mean_grads(model, batches, loss_fn, names):
    ws = {n: model.get_submodule(n).weight for n in names}
    sums = {n: torch.zeros(w.shape, dtype=torch.float32, device="cuda") for n, w in ws.items()}
    for b in batches:
        model.zero_grad(set_to_none=True)
        loss_fn(model, b).backward()
        for n, w in ws.items():
            sums[n] += w.grad.float()
    model.zero_grad(set_to_none=True)
    return {n: s / len(batches) for n, s in sums.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offload", ["device", "cpu"])
def test_exact_mode_on_cuda(dtype, offload):
    model, batches, loss_fn = _problem(dtype)
    names = ["1", "3", "4"]
    want = _mean_grads(model, batches, loss_fn, names)
    stats = fastlora.collect_gradients(model, batches, names, loss_fn=loss_fn, offload=offload, progress=False)
    for n in names:
        got = stats[n].mean
        assert got.dtype == torch.float32 and got.device.type == ("cuda" if offload == "device" else "cpu")
        if offload == "cpu":
            assert got.is_pinned()
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got.cuda(), want[n], rtol=tol, atol=tol * want[n].abs().max().item())
    assert all(p.grad is None for p in model.parameters())


def test_cpu_offload_uses_less_device_memory_than_full_fine_tuning():
    model, batches, loss_fn = _problem(torch.bfloat16)
    for p in model.parameters():
        p.requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    for b in batches:
        loss_fn(model, b).backward()
    full = torch.cuda.max_memory_allocated() - base
    model.zero_grad(set_to_none=True)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    stats = fastlora.collect_gradients(model, batches, loss_fn=loss_fn, offload="cpu", progress=False)
    engine = torch.cuda.max_memory_allocated() - base
    largest = max(g.out_features * g.in_features for g in stats.values()) * 4
    print(f"peak above baseline: full fine-tuning {full / 2**20:.2f} MiB, exact offload=cpu {engine / 2**20:.2f} MiB, "
          f"staging {stats.summary['staging_bytes'] / 2**20:.2f} MiB, largest layer gradient {largest / 2**20:.2f} MiB")
    assert stats.summary["staging_bytes"] <= largest / 2
    assert engine < full


def test_sketch_mode_on_cuda_matches_exact_products():
    model, batches, loss_fn = _problem(torch.float32)
    m = torch.randn(512, 6, device="cuda")
    exact = fastlora.collect_gradients(model, batches, ["3"], loss_fn=loss_fn, progress=False)
    sketch = fastlora.collect_gradients(model, batches, ["3"], loss_fn=loss_fn, mode="sketch", sketch_rank=16,
                                        products={"3": m}, progress=False)
    torch.testing.assert_close(sketch["3"].products["3"], exact["3"].mean @ m, rtol=1e-4, atol=1e-6)
    sk = sketch["3"].sketch
    torch.testing.assert_close(sk.range, exact["3"].mean @ sk.omega, rtol=1e-4, atol=1e-6)
