"""EVA (fastlora.init.eva, fastlora.initialize_lora_eva_weights) against PEFT 0.21.2's EVA on the
same model and batches: components, ranks, alphas, removed layers; outputs unchanged at init."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fastlora
from fastlora.init.eva import EvaConfig, _IncrementalPCA

peft = pytest.importorskip("peft")
from peft.tuners.lora.eva import initialize_lora_eva_weights as peft_eva  # noqa: E402
from peft.utils.incremental_pca import IncrementalPCA  # noqa: E402
from gloo import spawn  # noqa: E402  (tests/distributed, on pytest's pythonpath)
from helpers import tiny_llama  # noqa: E402


class Net(nn.Module):
    """q and k see the same input (they share one PCA, as PEFT's hash check); ``iso`` sees an
    isotropic input (low explained variance ratios: its rank goes to the others)."""

    def __init__(self, d: int = 24, h: int = 40, z: int = 64) -> None:
        super().__init__()
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.up = nn.Linear(d, h)
        self.down = nn.Linear(h, d)
        self.iso = nn.Linear(z, d)

    def forward(self, x, z):
        return self.down(torch.tanh(self.up(self.q(x) + self.k(x)))) + self.iso(z)


def _batches(seed: int, n: int = 30, rows: int = 64, d: int = 24, z: int = 64, spectrum: float = 0.7):
    """(x, z): x with distinct variances (its PCA converges), z isotropic."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    scales = spectrum ** torch.arange(d, dtype=torch.float64)
    return [(((torch.randn(rows, d, generator=g, dtype=torch.float64) * scales) @ basis.T).float() + 0.3,
             torch.randn(rows, z, generator=g))
            for _ in range(n)]


def _both(r=3, rho=2.0, tau=0.99, whiten=False, adjust=True, seed=0, targets=("q", "k", "up", "down", "iso")):
    torch.manual_seed(seed)
    base = Net()
    batches = _batches(seed)
    ours = copy.deepcopy(base)
    fastlora.get_peft_model(ours, fastlora.LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights="eva",
        eva_config=EvaConfig(rho=rho, tau=tau, whiten=whiten, adjust_scaling_factors=adjust)))
    fastlora.initialize_lora_eva_weights(ours, batches, show_progress_bar=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights="eva",
        eva_config=peft.EvaConfig(rho=rho, tau=tau, whiten=whiten, adjust_scaling_factors=adjust)))
    peft_eva(theirs, batches, forward_fn=lambda m, b: m(*b), prepare_model_inputs_fn=None,
             prepare_layer_inputs_fn=None, show_progress_bar=False)
    return base, ours, theirs, batches


def _peft_layers(model):
    return {n.replace("base_model.model.", ""): m for n, m in model.named_modules()
            if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}


ALL = ("q", "k", "up", "down", "iso")
NOT_SHARED = ("q", "up", "down", "iso")  # PEFT whitens components shared by k layers k times (in place)


@pytest.mark.parametrize("rho,whiten,adjust,targets", [(2.0, False, True, ALL), (1.0, False, True, ALL),
                                                       (3.0, True, False, NOT_SHARED), (4.0, False, False, ALL)])
def test_matches_peft(rho, whiten, adjust, targets):
    base, ours, theirs, batches = _both(rho=rho, whiten=whiten, adjust=adjust, targets=targets)
    mine = fastlora.lora_layers(ours)
    peft_layers = _peft_layers(theirs)
    assert set(mine) == set(peft_layers)  # same layers kept (rank 0 ones removed by both)
    assert sum(layer.r for layer in mine.values()) == len(targets) * 3  # the budget is kept
    for name, layer in mine.items():
        p = peft_layers[name]
        a_peft = p.lora_A["default"].weight.detach()
        assert layer.r == a_peft.shape[0], name
        assert layer.lora_alpha == pytest.approx(p.lora_alpha["default"]), name
        assert layer.scaling == pytest.approx(p.scaling["default"]), name
        torch.testing.assert_close(layer.lora_A.detach(), a_peft, rtol=1e-4, atol=1e-5)
        assert torch.count_nonzero(layer.lora_B) == 0
    for name in set(dict(base.named_modules())) - set(mine) - {""}:  # removed layers are plain again
        assert type(ours.get_submodule(name)) is type(base.get_submodule(name))
    torch.testing.assert_close(ours(*batches[0]), base(*batches[0]), rtol=0, atol=0)


def test_redistribution_moves_rank():
    """With rho > 1 the ranks are not all r (the test data's spectra differ between layers)."""
    _, ours, _, _ = _both(rho=2.0)
    ranks = {n: layer.r for n, layer in fastlora.lora_layers(ours).items()}
    assert set(ranks.values()) != {3}, ranks
    assert "iso" not in ranks  # rank 0: the adapter is removed, as PEFT does
    assert type(ours.iso) is nn.Linear
    assert ranks["q"] >= ranks.get("k", 0)  # a layer sharing q's PCA never outranks it


def test_incremental_pca_matches_peft():
    g = torch.Generator().manual_seed(1)
    ours, theirs = _IncrementalPCA(5), IncrementalPCA(n_components=5, lowrank=True, lowrank_seed=42)
    for _ in range(4):
        x = torch.randn(33, 13, generator=g) * torch.linspace(3, 0.1, 13) + 1.0
        ours.partial_fit(x)
        theirs.partial_fit(x.clone())
        torch.testing.assert_close(ours.components, theirs.components_, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.singular_values, theirs.singular_values_, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.explained_variance_ratio, theirs.explained_variance_ratio_,
                                   rtol=1e-5, atol=1e-7)


@settings(max_examples=25, deadline=None)
@given(features=st.integers(1, 17), k=st.integers(1, 6), rows=st.integers(6, 40), steps=st.integers(1, 3),
       seed=st.integers(0, 2**31 - 1))
def test_incremental_pca_property(features, k, rows, steps, seed):
    """Any shape (1 feature, k = features, odd sizes, a non-contiguous batch): the singular values
    and explained variance ratios equal PEFT's IncrementalPCA's; the spanned subspace too where
    the spectrum has a gap after k (distinct variances by construction)."""
    k = min(k, features)
    g = torch.Generator().manual_seed(seed)
    scales = 2.0 ** -torch.arange(features, dtype=torch.float32)  # gap ratio 2 between variances
    ours, theirs = _IncrementalPCA(k), IncrementalPCA(n_components=k, lowrank=True, lowrank_seed=42)
    for _ in range(steps):
        x = (torch.randn(features, rows, generator=g) * scales[:, None]).t() + 0.5  # non-contiguous
        ours.partial_fit(x)
        theirs.partial_fit(x.clone())
    scale = float(theirs.singular_values_[0])
    torch.testing.assert_close(ours.singular_values.double(), theirs.singular_values_.double(),
                               rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(ours.explained_variance_ratio.double(), theirs.explained_variance_ratio_.double(),
                               rtol=1e-4, atol=1e-6)
    proj = ours.components.double().T @ ours.components.double()
    proj_peft = theirs.components_.double().T @ theirs.components_.double()
    torch.testing.assert_close(proj, proj_peft, rtol=0, atol=1e-3)


@pytest.mark.parametrize("kwargs,match", [({"rho": 0.5}, "rho"), ({"tau": 1.5}, "tau"), ({"tau": "x"}, "tau")])
def test_bad_config_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EvaConfig(**kwargs)


def test_bad_use_refused_and_model_unchanged():
    torch.manual_seed(0)
    model = Net()
    with pytest.raises(ValueError, match="no LoRA layers"):
        fastlora.initialize_lora_eva_weights(model, _batches(0))
    fastlora.inject(model, ["q"], r=13)  # round(r*rho) > in_features
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="rho"):
        fastlora.initialize_lora_eva_weights(model, _batches(0))
    with pytest.raises(ValueError, match="dataloader"):
        fastlora.initialize_lora_eva_weights(model)
    with pytest.raises(ValueError, match="eva_config: unknown"):
        fastlora.initialize_lora_eva_weights(model, _batches(0), eva_config={"rhoo": 2})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _lm_batches(n: int = 12, vocab: int = 128):
    """Language-model batches with padding (attention_mask 0) and ignored labels (-100)."""
    g = torch.Generator().manual_seed(5)
    out = []
    for _ in range(n):
        ids = torch.randint(1, vocab, (4, 16), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 12:] = 0
        labels = ids.clone()
        labels[:, :3] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def test_llama_peft_user_flow_matches_peft():
    """PEFT's own flow (get_peft_model with init_lora_weights="eva", then initialize_lora_eva_weights
    with its language-model masks) against fastlora's with only those two lines changed."""
    pytest.importorskip("transformers")
    base = tiny_llama()
    config = dict(r=2, lora_alpha=4, target_modules="all-linear", init_lora_weights="eva",
                  eva_config=peft.EvaConfig(rho=2.0, tau=0.9))
    batches = _lm_batches()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    peft_eva(theirs, batches, show_progress_bar=False)
    ours = fastlora.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    fastlora.initialize_lora_eva_weights(ours, batches, show_progress_bar=False)
    mine, peft_layers = fastlora.lora_layers(ours), _peft_layers(theirs)
    assert set(mine) == set(peft_layers)
    for name, layer in mine.items():
        a_peft = peft_layers[name].lora_A["default"].weight.detach()
        assert layer.r == a_peft.shape[0], name
        assert layer.lora_alpha == pytest.approx(peft_layers[name].lora_alpha["default"]), name
        torch.testing.assert_close(layer.lora_A.detach(), a_peft, rtol=1e-4, atol=1e-5)
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, base(input_ids=ids).logits, rtol=0, atol=0)


def test_iterator_refused():
    torch.manual_seed(0)
    model = fastlora.inject(Net(), ["q"], r=2)
    with pytest.raises(TypeError, match="re-iterable"):
        fastlora.initialize_lora_eva_weights(model, iter(_batches(0)))
    with pytest.raises(ValueError, match="empty"):
        fastlora.initialize_lora_eva_weights(model, [])
    assert fastlora.lora_layers(model)["q"].r == 2


def test_export_after_eva_loads_in_peft(tmp_path):
    """New ranks/alphas and removed layers go to PEFT's rank_pattern/alpha_pattern/target_modules:
    PEFT's from_pretrained on the original base gives fastlora's outputs."""
    torch.manual_seed(0)
    base = Net()
    model = copy.deepcopy(base)
    fastlora.inject(model, list(ALL), r=3, lora_alpha=6)
    fastlora.initialize_lora_eva_weights(model, _batches(0), eva_config=EvaConfig(rho=2.0),
                                         show_progress_bar=False)
    assert "iso" not in fastlora.lora_layers(model)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in fastlora.lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
    fastlora.export_peft(model, tmp_path / "a")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a")).eval()
    x = _batches(1, n=1)[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(*x), model.eval()(*x), rtol=1e-5, atol=1e-5)


def _eva_on_rank(rank, world, out_dir):
    torch.manual_seed(0)
    model = fastlora.inject(Net(), list(ALL), r=3)
    batches = [tuple(t.chunk(world)[rank] for t in batch) for batch in _batches(0)]
    fastlora.initialize_lora_eva_weights(model, batches, eva_config=EvaConfig(rho=2.0), show_progress_bar=False)
    return {name: layer.lora_A.detach() for name, layer in fastlora.lora_layers(model).items()}


@pytest.mark.slow  # two processes
def test_distributed_gathers_every_ranks_inputs(tmp_path):
    """Two gloo ranks with half of each batch each reach the one-process result on whole batches."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    torch.manual_seed(0)
    single = fastlora.inject(Net(), list(ALL), r=3)
    fastlora.initialize_lora_eva_weights(single, _batches(0), eva_config=EvaConfig(rho=2.0), show_progress_bar=False)
    want = {name: layer.lora_A.detach() for name, layer in fastlora.lora_layers(single).items()}
    for got in spawn(_eva_on_rank, tmp_path, world=2):
        assert set(got) == set(want)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_base(kind):
    """EVA reads the layers' inputs, so a 4-bit / 8-bit base works as a float one; outputs
    unchanged at init. int8 (bitsandbytes' forward in both): PEFT's components and ranks. NF4:
    the first layer (the same inputs in PEFT) gets PEFT's components, the model those of a float
    model holding the dequantized weights (bitsandbytes' CPU NF4 forward, which PEFT uses, keeps
    its scales in bfloat16, so the later layers' inputs differ slightly from PEFT's)."""
    bnb = pytest.importorskip("bitsandbytes")
    from fastlora.quantized import dense_weight

    def build(dense=False):
        torch.manual_seed(0)
        layers = []
        for i, o in ((64, 128), (128, 64)):  # bitsandbytes' CPU 4-bit kernels: multiples of 64
            if kind == "int8":
                layers.append(bnb.nn.Linear8bitLt(i, o, has_fp16_weights=False))
            else:
                layers.append(bnb.nn.Linear4bit(i, o, compute_dtype=torch.float32, quant_type="nf4"))
            layers.append(nn.Tanh())
        model = nn.Sequential(*layers).to("cpu")
        if dense:
            for index in (0, 2):
                q = model[index]
                plain = nn.Linear(q.in_features, q.out_features)
                with torch.no_grad():
                    plain.weight.copy_(dense_weight(q))
                    plain.bias.copy_(q.bias)
                model[index] = plain
        return model

    batches = [x for x, _ in _batches(0, d=64)]
    config = dict(target_modules=["0", "2"], r=3, init_lora_weights="eva", eva_config=peft.EvaConfig(rho=2.0))
    theirs = peft.get_peft_model(build(), peft.LoraConfig(**config))
    peft_eva(theirs, batches, forward_fn=lambda m, x: m(x), prepare_model_inputs_fn=None,
             prepare_layer_inputs_fn=None, show_progress_bar=False)
    ours = fastlora.get_peft_model(build(), peft.LoraConfig(**config))
    with torch.no_grad():
        want = ours(batches[0])
    fastlora.initialize_lora_eva_weights(ours, batches, show_progress_bar=False)
    peft_a = {name: layer.lora_A["default"].weight.detach() for name, layer in _peft_layers(theirs).items()}
    mine = {name: layer.lora_A.detach() for name, layer in fastlora.lora_layers(ours).items()}
    torch.testing.assert_close(mine["0"], peft_a["0"], rtol=1e-4, atol=1e-5)
    if kind == "nf4":
        dense = fastlora.get_peft_model(build(dense=True), peft.LoraConfig(**config))
        fastlora.initialize_lora_eva_weights(dense, batches, show_progress_bar=False)
        want_a = {name: layer.lora_A.detach() for name, layer in fastlora.lora_layers(dense).items()}
    else:
        want_a = peft_a
    assert set(mine) == set(want_a)
    for name, a in mine.items():
        assert a.shape == want_a[name].shape, name
        torch.testing.assert_close(a, want_a[name], rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(ours(batches[0]), want, rtol=0, atol=0)
