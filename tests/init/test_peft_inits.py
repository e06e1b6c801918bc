"""PiSSA (exact and pissa_niter_<n>) and OLoRA as base offsets, against PEFT 0.21.2: the same A, B
and adjusted base weight, outputs unchanged at init, exports PEFT reloads on the original base,
PEFT's own PiSSA/OLoRA adapters (converted or not) imported, NF4 bases with the offset exact."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastlora
from fastlora.principal import principal_factors
from helpers import llama_logits, peft_layers, tiny_llama

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "up_proj"]


def float32_tol(w):
    """Float32 rounding of a product summed over the inner dimension, relative to |W|."""
    return 64 * torch.finfo(torch.float32).eps * w.abs().max().item()


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_b_and_residual_base_equal_peft(init, dtype):
    kwargs = dict(target_modules=TARGETS, r=4, lora_alpha=8, init_lora_weights=init)
    base = tiny_llama(dtype=dtype)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    ours = fastlora.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    twins = peft_layers(theirs)
    for name, layer in fastlora.lora_layers(ours).items():
        twin = twins[name]
        a, b = twin.lora_A["default"].weight, twin.lora_B["default"].weight
        w = twin.base_layer.weight
        tol = float32_tol(b @ a)
        # PEFT moves A and B to the base's dtype after computing the residual (then back to
        # float32): its factors carry one rounding of that dtype; fastlora's stay float32, so
        # its output at init is the base's
        for ours_t, theirs_t in ((layer.lora_A, a), (layer.lora_B, b)):
            rounding = 0.0 if dtype == torch.float32 else torch.finfo(dtype).eps * theirs_t.abs().max().item()
            torch.testing.assert_close(ours_t.detach(), theirs_t.detach().float(), rtol=0, atol=tol + rounding)
        assert layer.base_layer.weight.dtype == w.dtype == dtype
        # the residual base: the same up to one rounding of the base dtype
        ulp = torch.finfo(dtype).eps * w.float().abs().max().item()
        torch.testing.assert_close(layer.base_layer.weight.float(), w.float(), rtol=0, atol=ulp + tol)
        assert layer.init_method == init and layer.base_offset is not None
    # outputs unchanged at init (both models compute the original base)
    scale = llama_logits(base).abs().max().item()
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(llama_logits(ours), llama_logits(base), rtol=0, atol=64 * eps * scale)


def test_pissa_niter_is_within_the_svd_bound_of_peft():
    """svd_lowrank draws its own random matrix: on weights with a clear spectral gap both
    randomized results are within the subspace-iteration bound of the exact PiSSA."""
    base = tiny_llama()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # rank-4 signal plus small noise: gap sigma_4 / sigma_5 ~ 1e3
        for name, module in base.named_modules():
            if name.endswith(tuple(TARGETS)):
                out_f, in_f = module.weight.shape
                u, v = torch.randn(out_f, 4, generator=g), torch.randn(4, in_f, generator=g)
                module.weight.copy_(u @ v + 1e-3 * torch.randn(out_f, in_f, generator=g))
    kwargs = dict(target_modules=TARGETS, r=4, lora_alpha=8, init_lora_weights="pissa_niter_4")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    ours = fastlora.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    twins = peft_layers(theirs)
    for name, layer in fastlora.lora_layers(ours).items():
        twin = twins[name]
        exact = principal_factors(base.get_submodule(name).weight, 4, layer.scaling, "pissa")
        ours_ba = layer.lora_B.detach() @ layer.lora_A.detach()
        theirs_ba = twin.lora_B["default"].weight.detach() @ twin.lora_A["default"].weight.detach()
        exact_ba = exact[1] @ exact[0]
        # (sigma_5 / sigma_4)^(2 niter + 1) is far below float32; the noise level bounds what is left
        bound = 1e-2 * exact_ba.abs().max().item()
        torch.testing.assert_close(ours_ba, exact_ba, rtol=0, atol=bound)
        torch.testing.assert_close(theirs_ba, exact_ba, rtol=0, atol=bound)
        torch.testing.assert_close(layer.base_layer.weight.detach(), twin.base_layer.weight.detach(), rtol=0,
                                   atol=bound * layer.scaling)
    torch.testing.assert_close(llama_logits(ours), llama_logits(base), rtol=0, atol=1e-4)


def _train_like(layers, seed=1):
    """Moves every adapter away from its init, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a, b in layers:
            a.add_(0.1 * torch.randn(a.shape, generator=g))
            b.add_(0.1 * torch.randn(b.shape, generator=g))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_export_reloads_in_peft_on_the_original_base(init, tmp_path):
    base = tiny_llama()
    model = fastlora.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=TARGETS, r=4,
                                                                         init_lora_weights=init))
    _train_like([(layer.lora_A, layer.lora_B) for layer in fastlora.lora_layers(model).values()])
    expected = llama_logits(model)
    fastlora.export_peft(model, tmp_path)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(llama_logits(reloaded), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("converted", [False, True], ids=["as_saved", "converted"])
def test_peft_saved_pissa_and_olora_adapters_import(init, converted, tmp_path):
    base = tiny_llama()
    config = peft.LoraConfig(target_modules=TARGETS, r=4, lora_alpha=8, init_lora_weights=init)
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    if converted:
        theirs.save_pretrained(tmp_path / "init")  # the adapter as initialised
    _train_like([(m.lora_A["default"].weight, m.lora_B["default"].weight) for m in peft_layers(theirs).values()])
    expected = llama_logits(theirs)
    kwargs = {"path_initial_model_for_weight_conversion": str(tmp_path / "init")} if converted else {}
    theirs.save_pretrained(tmp_path / "trained", **kwargs)
    ours = fastlora.import_peft(copy.deepcopy(base), tmp_path / "trained")
    torch.testing.assert_close(llama_logits(ours), expected, rtol=1e-5, atol=1e-5)
    layer = next(iter(fastlora.lora_layers(ours).values()))
    assert (layer.base_offset is not None) == (not converted)


def test_a_randomized_pissa_adapter_is_refused_with_the_conversion(tmp_path):
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=["q_proj"], r=2,
                                                               init_lora_weights="pissa_niter_2"))
    theirs.save_pretrained(tmp_path)
    with pytest.raises(fastlora.AdapterFormatError, match="path_initial_model_for_weight_conversion"):
        fastlora.import_peft(tiny_llama(), tmp_path)


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_on_a_quantized_base_the_offset_is_exact(init, quant):
    bnb = pytest.importorskip("bitsandbytes")
    from fastlora.quantized import dense_weight

    torch.manual_seed(0)
    if quant == "nf4":
        layer = bnb.nn.Linear4bit(48, 40, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
    else:
        layer = bnb.nn.Linear8bitLt(48, 40, has_fp16_weights=False).to("cpu")
    model = nn.Sequential(layer)
    x = torch.randn(5, 48)
    with torch.no_grad():
        before = model(x)
    packed = layer.weight.detach().clone()
    fastlora.inject(model, fastlora.LoraConfig(target_modules=["0"], r=4, init_lora_weights=init))
    adapted = model[0]
    a, b = principal_factors(dense_weight(layer), 4, adapted.scaling, init)
    torch.testing.assert_close(adapted.lora_A.detach(), a, rtol=0, atol=0)
    torch.testing.assert_close(adapted.lora_B.detach(), b, rtol=0, atol=0)
    assert torch.equal(adapted.base_layer.weight, packed)  # the packed weight is never rewritten
    with torch.no_grad():
        after = model(x)
    # the offset is an exact term: forward adds s·B A x and subtracts s·B0 A0 x with B0 A0 = B A
    branch = (adapted.scaling * (x @ a.t()).abs() @ b.abs().t()).max().item()
    torch.testing.assert_close(after, before, rtol=0, atol=16 * torch.finfo(torch.float32).eps * branch)


def test_pissa_keyword_form_and_unload_restore_the_original_weights():
    base = tiny_llama()
    model = fastlora.inject(copy.deepcopy(base), TARGETS, r=4, init="olora")
    _train_like([(layer.lora_A, layer.lora_B) for layer in fastlora.lora_layers(model).values()])
    plain = fastlora.unload(model, merge=False)
    for name in fastlora.lora_layers(fastlora.inject(copy.deepcopy(base), TARGETS, r=4)):
        w0 = base.get_submodule(name).weight
        torch.testing.assert_close(plain.get_submodule(name).weight, w0, rtol=0, atol=float32_tol(w0))
