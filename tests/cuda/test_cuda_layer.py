"""GPU tests of the layer's CUDA kernels (skipped without CUDA): every op against the float64
reference with fresh inputs and poisoned outputs, odd sizes, non-contiguous and misaligned
inputs, dropout, determinism, agreement with the CPU kernels, opcheck, CUDA graphs,
torch.compile, memory held after forward, and the switch that gates the kernels.

FASTLORA_QUICK_TESTS=1 (gpu_check.sh's compute-sanitizer run) keeps a representative subset."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from torch import nn

import fastlora
from fastlora.testing import reference
from fastlora._extension import compiled_kernel
from fastlora.backends.registry import kernel_used
from fastlora.functional import kernel_path_applies
from conftest import DTYPES, RTOL, assert_matches, magnitude, make_matrix, seed_tensor, traced_graphs
from helpers import opcheck_samples, problem_tensors, problems

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not compiled_kernel("lora_forward", "cuda"), reason="extension built without CUDA kernels"),
]
ops = torch.ops.fastlora
QUICK = os.environ.get("FASTLORA_QUICK_TESTS") == "1"


@pytest.fixture(autouse=True)
def layer_kernels():
    previous = fastlora.set_cuda_layer_kernels(True)
    yield
    fastlora.set_cuda_layer_kernels(previous)


def poison_cuda_allocator() -> None:
    """Fills free blocks of the caching allocator (both pools) with 0xFF bytes, NaN in every
    float dtype: outputs and scratch allocated next reuse them, so an element a kernel forgets to
    write shows up as NaN. (torch's fill_uninitialized_memory needs deterministic mode, which
    cuBLAS refuses without CUBLAS_WORKSPACE_CONFIG.)"""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    blocks = [torch.full((256 << 20,), 255, dtype=torch.uint8, device="cuda")]
    blocks += [torch.full((512 << 10,), 255, dtype=torch.uint8, device="cuda") for _ in range(64)]
    del blocks


def on_cuda(t):
    """t on the GPU with the same strides (non-tensors unchanged)."""
    if not isinstance(t, torch.Tensor):
        return t
    if t.dim() == 2 and t.stride(0) == 0:  # broadcast rows
        out = t[:1].cuda().expand(t.shape)
    else:
        out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cuda")
        out.copy_(t.detach())
    return out.requires_grad_(t.requires_grad)


def cuda_matrix(rows, cols, dtype, layout, g):
    """make_matrix on the GPU; "misaligned" rows start one element past 16-byte alignment."""
    if layout == "misaligned":
        return make_matrix(rows, cols + 1, dtype, "contiguous", g).cuda()[:, 1:]
    return on_cuda(make_matrix(rows, cols, dtype, layout, g))


def _inputs(T, n_in, n_out, r, dtype, layout="contiguous", seed=0):
    """The tensors of one problem on the GPU, in the same keys as helpers.problem_tensors."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=cuda_matrix(T, n_in, dtype, layout, g),
        dy=cuda_matrix(T, n_out, dtype, layout, g),
        w=(make_matrix(n_out, n_in, dtype, "contiguous", g) / n_in**0.5).cuda(),
        bias=make_matrix(1, n_out, dtype, "contiguous", g)[0].cuda(),
        a=(make_matrix(r, n_in, torch.float32, "contiguous", g) / n_in**0.5).cuda(),
        b=make_matrix(n_out, r, torch.float32, "contiguous", g).cuda(),
        dxa=make_matrix(T, r, reference.accumulation_dtype(dtype), "contiguous", g).cuda(),
        seed=seed_tensor(99).cuda(),
    )


def _check_ops(t, s, p):
    """Runs every layer op on the GPU tensors of t (allocator poisoned first) and compares each
    result with the float64 reference computed on the CPU from the same values."""
    x, w, bias, a, b, dy, dxa, seed = (t[k] for k in ("x", "w", "bias", "a", "b", "dy", "dxa", "seed"))
    b2 = t.get("b2", b)  # lora_dy_products takes a B of any width
    dtype, acc = x.dtype, reference.accumulation_dtype(x.dtype)
    poison_cuda_allocator()
    y, xa = ops.lora_forward(x, w, bias, a, b, s, p, seed)
    d_xa, d_b = ops.lora_dy_products(dy, xa, b2, s)
    got = {
        "xa": xa,
        "y": y,
        "lora_down": ops.lora_down(x, a, p, seed),
        "lora_up": ops.lora_up(dy, xa, b, s),
        "dxa": d_xa,
        "dB": d_b,
        "dA": ops.lora_grad_A(x, dxa, p, seed, a.dtype),
        "dx": ops.lora_grad_x(dy, w, dxa, a, p, seed),
    }
    assert {v.dtype for k, v in got.items() if k not in ("dxa", "dB", "dA")} == {dtype}
    assert (d_xa.dtype, d_b.dtype, got["dA"].dtype) == (acc, b2.dtype, a.dtype)
    assert torch.equal(got["lora_down"], xa), "lora_down and lora_forward disagree on xa"

    X, W, BIAS, A, B, B2, DY, DXA, XA = (v.cpu().double() for v in (x, w, bias, a, b, b2, dy, dxa, xa))
    S = seed.cpu()
    # The rank-r terms use the rounded xa, as the reference does when given it.
    want = {
        "xa": (reference.lora_down, (X, A, p, S)),
        "y": (lambda *v: reference.lora_up(F.linear(*v[:3]), *v[3:]), (X, W, BIAS, XA, B, s)),
        "lora_down": (reference.lora_down, (X, A, p, S)),
        "lora_up": (reference.lora_up, (DY, XA, B, s)),
        "dxa": (lambda *v: reference.lora_dy_products(*v)[0], (DY, XA, B2, s)),
        "dB": (lambda *v: reference.lora_dy_products(*v)[1], (DY, XA, B2, s)),
        "dA": (reference.lora_grad_A, (X, DXA, p, S, torch.float64)),
        "dx": (reference.lora_grad_x, (DY, W, DXA, A, p, S)),
    }
    for name, (fn, args) in want.items():
        tol_dtype = acc if name in ("dxa", "dB", "dA") else dtype
        assert_matches(got[name].cpu(), fn(*args), tol_dtype, name, magnitude(fn, *args))


# (T, in, out, r), reaching every kernel path: one token, rank one; sizes that are not multiples
# of 8 (element-wise loads) and that are (16-byte vectors); a short, wide x (split-K in
# lora_down); many row tiles and row groups; ranks 40 and 130 (lora_dy_products' two-pass path,
# four and eight rank tiles, two rank chunks).
SHAPES = [(1, 1, 1, 1), (1, 17, 9, 1), (5, 7, 6, 3), (33, 70, 45, 16), (130, 31, 260, 31), (3, 4100, 33, 16),
          (2000, 64, 72, 16), (257, 200, 96, 40), (100, 96, 520, 130)]
LAYOUTS = ("contiguous", "transposed", "strided", "misaligned")
# Every shape in every dtype, with and without dropout; the layouts take turns (hypothesis below
# draws layouts freely).
CASES = [(shape, dtype, LAYOUTS[(i + j) % len(LAYOUTS)], p)
         for i, shape in enumerate(SHAPES) for j, dtype in enumerate(DTYPES) for p in (0.0, 0.3)]
if QUICK:
    CASES = [c for c in CASES if c[1] in (torch.float32, torch.bfloat16) and c[3] > 0]


def _case_id(case):
    (T, n_in, n_out, r), dtype, layout, p = case
    return f"T{T}-in{n_in}-out{n_out}-r{r}-{str(dtype)[6:]}-{layout}-p{p}"


@pytest.mark.parametrize("shape,dtype,layout,p", CASES, ids=[_case_id(c) for c in CASES])
def test_ops_match_reference(shape, dtype, layout, p):
    _check_ops(_inputs(*shape, dtype, layout), 1.7, p)


@settings(max_examples=20 if QUICK else 150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(problems())
def test_properties_on_cuda(pr):
    """test_properties' drawn problems (shapes, strides incl. broadcast dy, dtypes, ranks, xa and
    B of different widths, dropout, seeds) on the GPU."""
    _check_ops({k: on_cuda(v) for k, v in problem_tensors(pr).items()}, pr["scale"], pr["p"])


@pytest.mark.skipif(os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING") == "1", reason="caching allocator off")
def test_poison_reaches_new_allocations():
    poison_cuda_allocator()
    assert torch.isnan(torch.empty(1000, device="cuda")).all()  # small pool
    assert torch.isnan(torch.empty(1 << 22, device="cuda")).all()  # large pool


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_same_mask_in_every_op_and_on_cpu(dtype):
    t = _inputs(64, 72, 40, 8, dtype)
    x, w, a, b, dy = t["x"], t["w"], t["a"], t["b"], t["dy"]
    seed, p = t["seed"], 0.5
    mask = ops.dropout_mask(seed, 64, 72, p)
    assert torch.equal(mask.cpu(), ops.dropout_mask(seed.cpu(), 64, 72, p))
    assert torch.equal(mask.cpu(), reference.dropout_mask(seed.cpu(), 64, 72, p))
    # Dropped inputs must not influence xa, y's rank-r term, dA or the rank-r term of dx.
    x_changed = torch.where(mask, x, x + 100.0)
    assert torch.equal(ops.lora_down(x, a, p, seed), ops.lora_down(x_changed, a, p, seed))
    zero_w = torch.zeros_like(w)
    assert torch.equal(ops.lora_forward(x, zero_w, None, a, b, 1.0, p, seed)[0],
                       ops.lora_forward(x_changed, zero_w, None, a, b, 1.0, p, seed)[0])
    dxa = t["dxa"]
    assert torch.equal(ops.lora_grad_A(x, dxa, p, seed, a.dtype), ops.lora_grad_A(x_changed, dxa, p, seed, a.dtype))
    low_rank = ops.lora_grad_x(dy, zero_w, dxa, a, p, seed)
    assert torch.all(low_rank[~mask] == 0) and torch.all(low_rank[mask] != 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_and_cuda_kernels_agree(dtype):
    g = torch.Generator().manual_seed(4)
    T, n_in, n_out, r = 300, 200, 150, 16
    x, dy = make_matrix(T, n_in, dtype, "contiguous", g), make_matrix(T, n_out, dtype, "contiguous", g)
    w = make_matrix(n_out, n_in, dtype, "contiguous", g) / n_in**0.5
    a = make_matrix(r, n_in, torch.float32, "contiguous", g) / n_in**0.5
    b, bias = make_matrix(n_out, r, torch.float32, "contiguous", g), make_matrix(1, n_out, dtype, "contiguous", g)[0]
    seed, p, s = seed_tensor(5), 0.2, 0.7

    def run(device):
        x_, w_, a_, b_, dy_, bias_, seed_ = (v.to(device) for v in (x, w, a, b, dy, bias, seed))
        y, xa = ops.lora_forward(x_, w_, bias_, a_, b_, s, p, seed_)
        dxa, d_b = ops.lora_dy_products(dy_, xa, b_, s)
        return {"y": y, "xa": xa, "dxa": dxa, "dB": d_b, "dA": ops.lora_grad_A(x_, dxa, p, seed_, a.dtype),
                "dx": ops.lora_grad_x(dy_, w_, dxa, a_, p, seed_)}

    cpu, cuda = run("cpu"), run("cuda")
    for name, want in cpu.items():
        # Chained outputs differ by the rounding of their inputs (xa): the activation dtype's tolerance.
        assert_matches(cuda[name].cpu(), want.double(), dtype, f"{name}: CUDA vs CPU")


@pytest.mark.parametrize("r", [16, 64])
def test_reductions_are_deterministic(r):
    t = _inputs(3000, 512, 384, r, torch.bfloat16)
    short = _inputs(3, 4100, 16, r, torch.bfloat16)  # lora_down splits the columns of x
    xa = ops.lora_down(t["x"], t["a"], 0.1, t["seed"])

    def run():
        return (*ops.lora_dy_products(t["dy"], xa, t["b"], 2.0),
                ops.lora_grad_A(t["x"], t["dxa"], 0.1, t["seed"], t["a"].dtype),
                ops.lora_down(short["x"], short["a"], 0.1, short["seed"]))

    first, second = run(), run()
    assert all(torch.equal(u, v) for u, v in zip(first, second))


def test_broadcast_gradient_and_empty_batch():
    t = _inputs(12, 10, 6, 2, torch.float32)
    dy = torch.ones(1, 6, device="cuda").expand(12, 6)  # the gradient of y.sum(): zero row stride
    xa = ops.lora_down(t["x"], t["a"], 0.0, None)
    dxa, d_b = ops.lora_dy_products(dy, xa, t["b"], 2.0)
    dxa_ref, d_b_ref = reference.lora_dy_products(dy.cpu().double(), xa.cpu().double(), t["b"].cpu().double(), 2.0)
    assert_matches(dxa.cpu(), dxa_ref, torch.float32, "dxa")
    assert_matches(d_b.cpu(), d_b_ref, torch.float32, "dB")
    x0 = t["x"][:0]
    y0, xa0 = ops.lora_forward(x0, t["w"], t["bias"], t["a"], t["b"], 2.0, 0.1, t["seed"])
    assert y0.shape == (0, 6) and xa0.shape == (0, 2)
    dxa0, d_b0 = ops.lora_dy_products(torch.empty(0, 6, device="cuda"), xa0, t["b"], 2.0)
    assert dxa0.shape == (0, 2) and torch.equal(d_b0, torch.zeros_like(t["b"]))
    assert torch.equal(ops.lora_grad_A(x0, dxa0, 0.1, t["seed"], torch.float32), torch.zeros_like(t["a"]))


def test_opcheck_on_cuda():
    samples = opcheck_samples()
    t = _inputs(7, 16, 24, 4, torch.bfloat16)
    grad = lambda v: v.clone().requires_grad_(True)  # noqa: E731
    samples.append(("lora_forward", (grad(t["x"]), t["w"], t["bias"], grad(t["a"]), grad(t["b"]), 1.5, 0.2, t["seed"])))
    for name, args in samples:
        torch.library.opcheck(getattr(ops, name).default, tuple(on_cuda(v) for v in args))


def _op_chain(t, s, p):
    y, xa = ops.lora_forward(t["x"], t["w"], t["bias"], t["a"], t["b"], s, p, t["seed"])
    dxa, d_b = ops.lora_dy_products(t["dy"], xa, t["b"], s)
    return (y, xa, dxa, d_b, ops.lora_grad_A(t["x"], dxa, p, t["seed"], t["a"].dtype),
            ops.lora_grad_x(t["dy"], t["w"], dxa, t["a"], p, t["seed"]))


def test_cuda_graph_replays_the_ops_with_new_seeds():
    t = _inputs(256, 192, 160, 16, torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the graph
        _op_chain(t, 2.0, 0.1)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _op_chain(t, 2.0, 0.1)
    runs = []
    for value in (8, 7, 8):
        t["seed"].fill_(value)
        graph.replay()
        runs.append([v.clone() for v in out])
    eager = _op_chain(t, 2.0, 0.1)  # seed 8
    assert all(torch.equal(u, v) for u, v in zip(runs[0], runs[2]))
    assert not torch.equal(runs[0][1], runs[1][1]), "the replay must read the new seed"
    for u, v in zip(runs[2], eager):  # cuBLAS may pick another algorithm inside the capture
        torch.testing.assert_close(u, v, rtol=2e-2, atol=2e-2 * v.abs().max().item())


def test_graphed_layer_forward_backward_matches_eager():
    torch.manual_seed(0)
    layer = fastlora.LoRALinear(nn.Linear(256, 192, device="cuda", dtype=torch.bfloat16), r=16, lora_alpha=32)
    nn.init.normal_(layer.lora_B)
    eager_layer = copy.deepcopy(layer)
    x = torch.randn(4, 64, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    graphed = torch.cuda.make_graphed_callables(layer, (x,))
    layer.zero_grad(set_to_none=True)
    g = torch.randn(4, 64, 192, device="cuda", dtype=torch.bfloat16)
    outs = []
    for module in (graphed, eager_layer):
        x.grad = None
        y = module(x)
        y.backward(g)
        params = layer if module is graphed else eager_layer
        outs.append((y.detach(), x.grad.clone(), params.lora_A.grad.clone(), params.lora_B.grad.clone()))
    for u, v in zip(*outs):
        torch.testing.assert_close(u, v, rtol=2e-2, atol=2e-2 * v.abs().max().item())


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_torch_compile_on_cuda(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32)).to("cuda", torch.bfloat16)
    fastlora.inject(model, target_modules=["0", "2"], r=8, lora_alpha=16)
    for layer in fastlora.lora_layers(model).values():
        nn.init.normal_(layer.lora_B)
    params = fastlora.trainable_parameters(model)
    x = torch.randn(4, 32, 64, device="cuda", dtype=torch.bfloat16)

    def step(m):
        y = m(x)
        return [y.detach().clone()] + [v.clone() for v in torch.autograd.grad(y.float().square().sum(), params)]

    compiled = torch.compile(model, fullgraph=True, mode=mode)
    for _ in range(3):  # reduce-overhead records its CUDA graphs on the first calls
        got = step(compiled)
    for u, v in zip(got, step(model)):
        torch.testing.assert_close(u, v, rtol=2e-2, atol=2e-2 * v.abs().max().item())
    if mode is None:  # the traced graph calls the fused op, not the reference path
        graphs = traced_graphs(model, x)
        assert graphs and graphs[0].count("fastlora.lora_forward") == 2


@pytest.mark.parametrize("dtype,p", [(torch.float32, 0.0), (torch.bfloat16, 0.1), (torch.float16, 0.1)])
def test_layer_kernel_path_matches_reference_path(dtype, p):
    torch.manual_seed(0)
    layer = fastlora.LoRALinear(nn.Linear(300, 200, device="cuda", dtype=dtype), r=16, lora_alpha=32,
                                lora_dropout=p)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 50, 300, device="cuda", dtype=dtype, requires_grad=True)
    w, bias = layer.base_layer.weight, layer.base_layer.bias
    assert kernel_path_applies(x.reshape(-1, 300), w, bias, layer.lora_A, layer.lora_B)

    def run(backend):
        with fastlora.use_backend(backend):
            torch.manual_seed(1)  # the same dropout seed on both paths
            y = layer(x)
            return [y] + list(torch.autograd.grad(y.float().square().sum(), (x, layer.lora_A, layer.lora_B)))

    for name, u, v in zip(("y", "dx", "dA", "dB"), run("auto"), run("reference")):
        tol = 4 * RTOL[dtype]
        torch.testing.assert_close(u, v, rtol=tol, atol=tol * v.abs().max().item(), msg=name)


def test_memory_held_after_forward_is_frozen_plus_T_r():
    T, n, r = 4096, 1024, 16
    base = nn.Linear(n, n, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    layer = fastlora.LoRALinear(copy.deepcopy(base), r=r, lora_alpha=2 * r, lora_dropout=0.05).train()
    x = torch.randn(T, n, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def held(module):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        y = module(x)
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated() - before, y

    frozen, y_frozen = held(base)
    ours, y_ours = held(layer)
    # xa (T x r) and the one-element seed, each rounded up to the allocator's 512-byte blocks.
    assert ours - frozen <= T * r * 2 + 1024, f"fastlora holds {ours - frozen} bytes more than the frozen layer"


def test_switch_gates_layer_and_gradient_engine():
    t = _inputs(4, 8, 6, 2, torch.float32)
    args = (t["x"], t["w"], t["bias"], t["a"], t["b"])
    fastlora.set_cuda_layer_kernels(False)
    assert not kernel_path_applies(*args) and not kernel_used("lora_dy_products", "cuda")
    assert not kernel_used("dropout_mask", "cuda")
    fastlora.set_cuda_layer_kernels(True)
    assert fastlora.cuda_layer_kernels() and kernel_path_applies(*args) and kernel_used("lora_dy_products", "cuda")
    assert kernel_used("dropout_mask", "cuda")


@pytest.mark.skipif(QUICK, reason="reads 2^31 elements")
def test_indices_beyond_2_to_the_31():
    n_in, T = 1 << 16, (1 << 15) + 3  # 2^31 + 3 * 2^16 elements, every row the same storage
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, n_in, generator=g).cuda().expand(T, n_in)
    a = torch.randn(1, n_in, generator=g).cuda()
    seed, p, last = seed_tensor(5).cuda(), 0.5, 3
    xa = ops.lora_down(x, a, p, seed)
    mask = reference.dropout_mask(seed.cpu(), last, n_in, p, first_row=T - last)
    want = reference.dropout(x[-last:].cpu().double(), p, None, mask) @ a.cpu().double().t()
    assert_matches(xa[-last:].cpu(), want, torch.float32, "xa of the last rows")
    assert xa[0].item() != xa[-1].item()
