"""GPU tests (skipped without CUDA): the CUDA dropout mask and the layer on CUDA tensors."""

from __future__ import annotations

import pytest
import torch

import fastlora
from fastlora.testing import reference
from fastlora._extension import compiled_kernel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.skipif(not compiled_kernel("dropout_mask", "cuda"), reason="extension built without CUDA")
@pytest.mark.parametrize("rows,cols,p", [(1, 1, 0.5), (3, 7, 0.1), (129, 257, 0.05), (1000, 1000, 0.9), (5, 5, 0.0)])
def test_cuda_mask_equals_cpu_mask(rows, cols, p):
    seed = torch.tensor([123456789], dtype=torch.int64)
    cpu = torch.ops.fastlora.dropout_mask(seed, rows, cols, p)
    cuda = torch.ops.fastlora.dropout_mask(seed.cuda(), rows, cols, p)
    assert torch.equal(cuda.cpu(), cpu)
    assert torch.equal(cpu, reference.dropout_mask(seed, rows, cols, p))


@pytest.mark.skipif(not compiled_kernel("dropout_mask", "cuda"), reason="extension built without CUDA")
def test_cuda_graph_replay_reads_the_seed_on_the_device():
    seed = torch.tensor([1], dtype=torch.int64, device="cuda")
    torch.ops.fastlora.dropout_mask(seed, 64, 64, 0.5)  # warm up outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        mask = torch.ops.fastlora.dropout_mask(seed, 64, 64, 0.5)
    masks = []
    for value in (7, 8, 7):
        seed.fill_(value)
        graph.replay()
        masks.append(mask.clone())
    assert torch.equal(masks[0], masks[2]) and not torch.equal(masks[0], masks[1])
    assert torch.equal(masks[1].cpu(), reference.dropout_mask(torch.tensor([8]), 64, 64, 0.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_on_cuda_matches_cpu(dtype):
    torch.manual_seed(0)
    layer = fastlora.LoRALinear(torch.nn.Linear(64, 48, dtype=dtype), r=8, lora_alpha=16)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 10, 64, dtype=dtype)
    want = layer(x)
    got = layer.cuda()(x.cuda())
    torch.testing.assert_close(got.cpu(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
