"""Problems and oracles shared by test files in several folders, so that no test file imports
another (the fixtures, tolerances, layouts and poisoned allocations every test uses live in
conftest.py; the multi-process launchers in tests/distributed/gloo.py and fsdp_helpers.py):
the gradient engine's MLP problem, the adapter-state models and snapshots, LoRA-Pro's moment-pass
inputs and oracle, the drawn op problems, the ops' operands and opcheck samples, quantized bases,
a small Llama with its logits and PEFT's view of its adapters, and the layer problems with the
low-precision comparison against the float64 oracle."""

from __future__ import annotations

import copy
import json

import torch
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import fastlora
from fastlora.backends import layer as dispatch
from fastlora.testing import reference
from conftest import DTYPES, RTOL, available_isas, make_matrix, seed_tensor


# ---- the gradient engine's problem (gradients, init, io, the gloo worker) ------------------------


def make_mlp_problem(dtype=torch.float32, n_batches=4):
    """A small MLP behind a frozen embedding, batches of token ids and a per-batch loss."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Embedding(11, 16), nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 20, bias=False), nn.Tanh(), nn.Linear(20, 11)
    ).to(dtype)
    batches = [(torch.randint(0, 11, (3, 5), generator=g), torch.randint(0, 11, (3, 5), generator=g))
               for _ in range(n_batches)]

    def loss_fn(m, batch):
        ids, labels = batch
        return nn.functional.cross_entropy(m(ids).float().reshape(-1, 11), labels.reshape(-1))

    return model, batches, loss_fn


# ---- adapter state: small float64 models, their output and snapshots ---------------------------

F64 = torch.float64
X = torch.randn(5, 6, dtype=F64, generator=torch.Generator().manual_seed(3))


def base_model(seed=0):
    """Layers "0" (6 -> 8) and "2.0" (8 -> 3): "2.0" ends in "0" and is narrower than r = 4."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Sequential(nn.Linear(8, 3))).to(F64)


def randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in fastlora.lora_layers(model).values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g, dtype=F64))
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g, dtype=F64))


def out(model):
    with torch.no_grad():
        return model.eval()(X)


def snapshot(model):
    """Every parameter and buffer (values, dtype, device), requires_grad flag, and the layers'
    adapter state."""
    tensors = {f"p:{n}": (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    tensors.update({f"b:{n}": (b.clone(), False) for n, b in model.named_buffers()})
    layers = {n: (layer.r, layer.lora_alpha, layer.lora_dropout, layer.use_rslora, layer.init_method, layer.merged,
                  getattr(layer, "lora_A0", None) is not None, layer.adapter_enabled, layer.detached)
              for n, layer in fastlora.lora_layers(model).items()}
    return tensors, layers, [type(m) for m in model.modules()]


def assert_unchanged(model, before):
    tensors, layers, types = snapshot(model)
    assert set(tensors) == set(before[0]), "parameters or buffers were added or removed"
    for name, (t, flag) in before[0].items():
        now, now_flag = tensors[name]
        assert torch.equal(now, t) and now.dtype == t.dtype, f"{name} changed"
        assert now_flag == flag, f"{name}.requires_grad changed"
    assert layers == before[1] and types == before[2]


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def ga_model(seed, r=2, trained=True):
    """A model with LoRA-GA adapters (float64) on layer "0", and its fresh base."""
    base = base_model()
    model = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(4, 6, generator=g, dtype=F64), torch.randn(4, 3, generator=g, dtype=F64))]
    stats = fastlora.collect_gradients(model, batches, "0", loss_fn=lambda m, b: (m(b[0]) - b[1]).pow(2).mean(),
                                       progress=False)
    fastlora.inject(model, "0", r=r, lora_alpha=2.0, adapter_dtype=F64, init="lora_ga", gradients=stats,
                    init_config={"svd": "exact", "direction": "ArB2r" if seed % 2 else "A2rBr"})
    if trained:
        randomise(model, seed + 100)
    return model, base


def expected(base, adapted):
    """What the fresh base plus ``adapted``'s adapters computes, from the factors alone."""
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for name, layer in fastlora.lora_layers(adapted).items():
            delta = layer.scaling * layer.lora_B.detach() @ layer.lora_A.detach()
            if layer.base_offset is not None:
                a0, b0 = layer.base_offset
                delta = delta - layer.scaling * b0 @ a0
            ref.get_submodule(name).weight += delta
    return out(ref)


def rewrite_fastlora(path, edit):
    file = path / "adapter_model.safetensors"
    tensors = load_file(file)
    with safe_open(str(file), "pt") as f:
        config = json.loads(f.metadata()["fastlora"])
    config = edit(config, tensors)
    save_file(tensors, file, metadata={"fastlora": json.dumps(config, allow_nan=True)})


# ---- LoRA-Pro's moment pass (CPU kernels, CUDA emulation, GPU) -----------------------------------

HYPER = dict(scale=1.7, beta1=0.9, beta2=0.99, eps=1e-8)


def moment_inputs(out, n_in, r, moment_dtype, factor_dtype, seed=0, layout="contiguous"):
    g = torch.Generator().manual_seed(seed)
    lora_a = make_matrix(r, n_in, factor_dtype, layout, g) / n_in**0.5
    lora_b = make_matrix(out, r, factor_dtype, "contiguous", g)
    grad_a0 = make_matrix(r, n_in, factor_dtype, "contiguous", g)
    grad_b0 = make_matrix(out, r, factor_dtype, layout, g) / n_in**0.5
    exp_avg = make_matrix(out, n_in, torch.float64, "contiguous", g).to(moment_dtype)
    # Second moments away from zero keep D well conditioned (D's sensitivity to g is 1/sqrt(v)).
    exp_avg_sq = (torch.rand(out, n_in, generator=g, dtype=torch.float64) + 0.5).to(moment_dtype)
    return exp_avg, exp_avg_sq, lora_a, lora_b, grad_a0, grad_b0


def moment_reference(exp_avg, exp_avg_sq, lora_a, lora_b, grad_a0, grad_b0, step):
    m, v = exp_avg.double().clone(), exp_avg_sq.double().clone()
    out = reference.lora_pro_moments(
        m, v, lora_a.double(), lora_b.double(), grad_a0.double(), grad_b0.double(), step=step, **HYPER
    )
    return out, m, v


def moment_bounds(lora_a, lora_b):
    """Sizes of the terms the two outputs sum (tolerance floors where they cancel); |D| < 10
    for these inputs (|m| < 6, v >= 0.5, step 2 or 3)."""
    s, d_max = HYPER["scale"], 10.0
    return s * d_max * lora_b.double().abs().sum(0).max().item(), s * d_max * lora_a.double().abs().sum(1).max().item()


def assert_moments_match(got_m, got_v, ref_m, ref_v, what=""):
    """The updated moments: the same math rounded to their storage dtype (bfloat16: at most one
    unit in the last place apart), plus the compute dtype's rounding of the gradient they take in
    (float64 for float64 moments, else float32): 8 units of it relative to the largest moment."""
    ulp = {torch.float64: 1e-14, torch.float32: 1e-6, torch.bfloat16: 2.0**-7}[got_m.dtype]
    slack = 8 * torch.finfo(torch.float64 if got_m.dtype == torch.float64 else torch.float32).eps
    for got, want, name in ((got_m, ref_m, "exp_avg"), (got_v, ref_v, "exp_avg_sq")):
        err = ((got.cpu().double() - want).abs() - ulp * want.abs()).max().item()
        assert err <= slack * want.abs().max().item(), f"{what} {name}: off by {err:.3g} beyond {ulp:g} relative"


# ---- drawn op problems (property tests, GPU layer tests) -------------------------------------------

ISAS = available_isas() or ["auto"]


@st.composite
def problems(draw, dy_layouts=("contiguous", "transposed", "strided", "broadcast")):
    n_in = draw(st.integers(1, 80))
    n_out = draw(st.integers(1, 80))
    dtype = draw(st.sampled_from(DTYPES))
    return dict(
        T=draw(st.integers(0, 40)),
        n_in=n_in,
        n_out=n_out,
        r=draw(st.integers(1, min(n_in, n_out, 24))),
        r2=draw(st.integers(1, 24)),  # a second width: lora_dy_products takes xa and B of any widths
        dtype=dtype,
        adapter_dtype=draw(st.sampled_from(sorted({torch.float32, dtype}, key=str))),
        p=draw(st.one_of(st.just(0.0), st.floats(0.01, 0.95))),
        seed=draw(st.integers(0, 2**62)),
        scale=draw(st.floats(0.05, 4.0)) * draw(st.sampled_from([1.0, -1.0])),
        x_layout=draw(st.sampled_from(("contiguous", "transposed", "strided"))),
        dy_layout=draw(st.sampled_from(dy_layouts)),
        values=draw(st.integers(0, 2**31 - 1)),
        isa=draw(st.sampled_from(ISAS)),
    )


def problem_tensors(pr):
    g = torch.Generator().manual_seed(pr["values"])
    T, n_in, n_out, r, dt, at = pr["T"], pr["n_in"], pr["n_out"], pr["r"], pr["dtype"], pr["adapter_dtype"]
    return dict(
        x=make_matrix(T, n_in, dt, pr["x_layout"], g),
        w=make_matrix(n_out, n_in, dt, "contiguous", g),
        bias=make_matrix(1, n_out, dt, "contiguous", g)[0],
        a=make_matrix(r, n_in, at, "contiguous", g),
        b=make_matrix(n_out, r, at, "contiguous", g),
        b2=make_matrix(n_out, pr["r2"], at, "contiguous", g),
        dy=make_matrix(T, n_out, dt, pr["dy_layout"], g),
        dxa=make_matrix(T, r, reference.accumulation_dtype(dt), "contiguous", g),
        seed=torch.tensor([pr["seed"]]),
    )


# ---- the ops' operands and opcheck samples (CPU and CUDA op tests) ---------------------------------


def op_inputs(T, n_in, n_out, r, dtype, layout, adapter_dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = make_matrix(T, n_in, dtype, layout, g)
    w = make_matrix(n_out, n_in, dtype, "contiguous", g) / n_in**0.5
    a = make_matrix(r, n_in, adapter_dtype, "contiguous", g) / n_in**0.5
    b = make_matrix(n_out, r, adapter_dtype, "contiguous", g)
    bias = make_matrix(1, n_out, dtype, "contiguous", g)[0]
    dy = make_matrix(T, n_out, dtype, layout, g)
    return x, w, bias, a, b, dy


def opcheck_samples():
    x, w, bias, a, b, dy = op_inputs(7, 13, 11, 3, torch.float32, "contiguous")
    ops = torch.ops.fastlora
    seed = seed_tensor(5)
    xa = ops.lora_down(x, a, 0.2, seed)
    dxa, _ = ops.lora_dy_products(dy, xa, b, 1.5)
    grad = lambda t: t.clone().requires_grad_(True)  # noqa: E731
    return [
        ("lora_forward", (grad(x), w, bias, grad(a), grad(b), 1.5, 0.2, seed)),
        ("lora_forward", (x, w, None, grad(a), b, 1.5, 0.0, None)),
        ("lora_down", (grad(x), grad(a), 0.2, seed)),
        ("lora_up", (grad(dy), grad(xa), grad(b), 1.5)),
        ("lora_dy_products", (dy, xa, b, 1.5)),
        ("lora_dy_products", (dy, xa, torch.randn(11, 5), 1.5)),  # xa and B of different widths
        ("accumulate_outer", (torch.randn(11, 13), dy, x, 0.5)),
        ("accumulate_outer", (torch.randn(11, 13), dy.bfloat16(), x.bfloat16(), 0.5)),
        ("lora_grad_A", (x, dxa, 0.2, seed, torch.float32)),
        ("lora_grad_x", (dy, w, dxa, a, 0.2, seed)),
        ("dropout_mask", (seed, 4, 6, 0.3)),
    ]


# ---- bitsandbytes-quantized bases (quantized layers, LoRA-Pro's refusal) ------------------------


IN, OUT, R, ALPHA = 48, 40, 4, 8.0
# (quant_type, double quantization, compute dtype); "int8" is Linear8bitLt.
KINDS = [("nf4", False, torch.float32), ("nf4", True, torch.float32), ("nf4", True, torch.bfloat16),
         ("fp4", False, torch.float32), ("fp4", True, torch.bfloat16), ("int8", False, None)]
KIND_IDS = [f"{q}-{'dq' if d else 'nodq'}-{str(c).replace('torch.', '')}" for q, d, c in KINDS]


def quantized_linear(kind=KINDS[0], seed: int = 0, in_f: int = IN, out_f: int = OUT) -> nn.Linear:
    """A quantized layer built from a seeded float weight: the same arguments give the same layer."""
    import bitsandbytes as bnb  # only the quantized tests need it (they skip without it)

    quant_type, double, compute = kind
    torch.manual_seed(seed)
    if quant_type == "int8":
        layer = bnb.nn.Linear8bitLt(in_f, out_f, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(in_f, out_f, compute_dtype=compute, compress_statistics=double,
                                  quant_type=quant_type)
    return layer.to("cpu")  # bitsandbytes quantizes on .to(device)


def adapted(kind=KINDS[0], dropout: float = 0.0, seed: int = 0) -> nn.Sequential:
    model = fastlora.inject(nn.Sequential(quantized_linear(kind, seed)), "all-linear", r=R, lora_alpha=ALPHA,
                            lora_dropout=dropout)
    with torch.no_grad():  # B = 0 would hide every error of the branch
        model[0].lora_B.copy_(torch.randn(OUT, R, generator=torch.Generator().manual_seed(seed + 1)))
    return model


# ---- a small Llama (PEFT interop: its config, its initialisers) ------------------------------------

LLAMA_IDS = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(3))


def tiny_llama(cls=None, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A seeded 2-layer Llama (vocabulary 128, hidden 32) in eval mode: a causal LM unless ``cls``
    names another head (3 labels for sequence classification)."""
    import transformers  # only the interop tests need it (they skip without it)

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                                   pad_token_id=0, num_labels=3)
    return (cls or transformers.LlamaForCausalLM)(cfg).to(dtype).eval()


def llama_logits(model: nn.Module) -> torch.Tensor:
    """The logits (float32) of ``model`` (a :func:`tiny_llama`, adapted or not) on ``LLAMA_IDS``, in eval mode."""
    with torch.no_grad():
        return model.eval()(input_ids=LLAMA_IDS).logits.float()


def peft_layers(model: nn.Module) -> dict:
    """PEFT's LoRA layers of a PeftModel by the name of the module they wrap."""
    import peft

    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}


# ---- layer problems (the conformance suite, the composed and fused paths) --------------------------


def layer_params(n_in, n_out, r, dtype=torch.float64, adapter_dtype=torch.float64, bias=True, seed=0):
    """W, bias, A, B drawn from N(0, 1) (B not zero: B = 0 would hide most of the backward) and the scale."""
    g = torch.Generator().manual_seed(seed)

    def draw(*shape, dt=dtype):
        return torch.randn(*shape, dtype=torch.float64, generator=g).to(dt)

    w, b = draw(n_out, n_in), (draw(n_out) if bias else None)
    return w, b, draw(r, n_in, dt=adapter_dtype), draw(n_out, r, dt=adapter_dtype), 1.7


def layer_input(T, n_in, lead, layout, dtype=torch.float64):
    """T x n_in rows in ``layout``, reshaped to the leading shape ``lead``."""
    x2d = make_matrix(T, n_in, dtype, layout, torch.Generator().manual_seed(1))
    return x2d.reshape(*lead, n_in)


def layer_problem(T, n_in, n_out, r, dtype, layout, bias, seed):
    """x in ``layout``, W, bias (or None) and dy in ``dtype``; float32 master adapters A, B."""
    g = torch.Generator().manual_seed(seed)
    x = make_matrix(T, n_in, dtype, layout, g)
    w = torch.randn(n_out, n_in, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(n_out, generator=g, dtype=torch.float64).to(dtype) if bias else None
    a = torch.randn(r, n_in, generator=g, dtype=torch.float64).float()  # float32 master adapters
    bb = torch.randn(n_out, r, generator=g, dtype=torch.float64).float()
    dy = torch.randn(T, n_out, generator=g, dtype=torch.float64).to(dtype)
    return x, w, b, a, bb, dy


def assert_pinned_runs(impl, x, w, b, a, p):
    """Pinned, ``impl`` itself is what ``fastlora.lora_linear`` runs on these operands, not
    another implementation (a value check alone cannot tell which one ran)."""
    with fastlora.use_backend(impl):
        chosen = dispatch.choose_linear(x.reshape(-1, x.shape[-1]), w, b, a, p)
    assert chosen.name == impl, f"pinned {impl!r}, but {chosen.name!r} runs"


def check_against_the_oracle(impl, T, n_in, n_out, r, dtype, layout, bias, p, seed):
    """y, dx, dA and dB of ``impl`` in ``dtype`` against the float64 oracle on the same inputs and
    mask, relative to the largest term that enters each result (sums of products may cancel),
    with the compute dtype's rounding; the rank-r parts pass through one extra rounding (xa, dxa)."""
    x, w, b, a, bb, dy = layer_problem(T, n_in, n_out, r, dtype, layout, bias, seed)
    s, drop_seed = 1.3, seed_tensor(seed)
    xs, a_s, b_s = x.detach().requires_grad_(True), a.clone().requires_grad_(True), bb.clone().requires_grad_(True)
    assert_pinned_runs(impl, xs, w, b, a_s, p)
    with fastlora.use_backend(impl):
        y = fastlora.lora_linear(xs, w, b, a_s, b_s, s, p, drop_seed)
        y.backward(dy)
    x64 = x.double().requires_grad_(True)
    a64, b64 = a.double().requires_grad_(True), bb.double().requires_grad_(True)
    y64 = reference.lora_linear(x64, w.double(), None if b is None else b.double(), a64, b64, s, p, drop_seed)
    y64.backward(dy.double())
    ax, aw, ady = x64.detach().abs(), w.double().abs(), dy.double().abs()
    aa, ab = a64.detach().abs(), b64.detach().abs()
    terms = {
        "y": ax @ aw.t() + s * (ax @ aa.t()) @ ab.t() + (0.0 if b is None else b.double().abs()),
        "dx": ady @ aw + s * (ady @ ab) @ aa,
        "dA": s * (ady @ ab).t() @ ax,
        "dB": s * ady.t() @ (ax @ aa.t()),
    }
    results = {"y": (y, y64), "dx": (xs.grad, x64.grad), "dA": (a_s.grad, a64.grad), "dB": (b_s.grad, b64.grad)}
    for name, (got, want) in results.items():
        scale = terms[name].max().item()
        assert got.shape == want.shape and torch.isfinite(got).all(), name
        err = (got.double() - want).abs().max().item()
        assert err <= 2 * RTOL[dtype] * max(scale, 1e-30), f"{impl} {name}: {err:.3g} (scale {scale:.3g})"
