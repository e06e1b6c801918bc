"""fastlora under DeepSpeed on two CPU processes (gloo; docs/distributed.md#deepspeed), one
process group for everything: ZeRO-0 with LoRAPro as the client optimizer; ZeRO-2 and ZeRO-3 with
AdamW (bit for bit one process averaging the two ranks' gradients) and with LoRA-Pro applied as a
gradient transform inside backward (lora_pro_gradient_hooks; equal to one process's
LoRAPro(mode="efficient") within a rounding bound); LoRAPro itself refused under ZeRO-2 (flat
partitions); ZeRO-3 saves refused outside a gather (never an empty or partial adapter) and, inside
one, complete: PEFT loads the export with the trained model's logits."""

from __future__ import annotations

import os

import pytest
import torch

import fastlora
from conftest import assert_matches
from fastlora.optim import LoRAPro, lora_pro_gradient_hooks
from fsdp_helpers import TinyDecoder, U, batch, gram_condition, loss_of, make_model, needs_fsdp2, reference_grads, spawn

deepspeed = pytest.importorskip("deepspeed")
pytestmark = [needs_fsdp2, pytest.mark.slow]  # multi-process (gloo)

STEPS = 3
LR = 1e-2


def _config(stage: int) -> dict:
    # No clipping (DeepSpeed clips to norm 1 by default; one process does not); ZeRO-3 partitions
    # even these small parameters (by default it keeps those under 1e5 elements whole).
    zero = {"stage": stage}
    if stage == 3:
        zero.update(stage3_param_persistence_threshold=0, stage3_model_persistence_threshold=0)
    return {"train_micro_batch_size_per_gpu": 6, "zero_optimization": zero, "zero_allow_untested_optimizer": True,
            "gradient_clipping": 0.0}


def _adamw(model, weight_decay=0.01):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=weight_decay,
                             foreach=False)


def _gathered(model) -> dict:
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        return {name: p.detach().clone() for name, p in model.named_parameters()}


def _worker(rank, world, out_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    deepspeed.init_distributed(dist_backend="gloo")
    out = {}
    for name, stage in (("lora-pro", 0), ("adamw", 2), ("hooks", 2), ("adamw", 3), ("hooks", 3)):
        model = make_model()
        opt = LoRAPro(model, lr=LR) if name == "lora-pro" else _adamw(model, 0.0 if name == "hooks" else 0.01)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=_config(stage))
        for step in range(STEPS):
            if name == "hooks":
                with lora_pro_gradient_hooks(model):
                    engine.backward(loss_of(engine, rank, step))
            else:
                engine.backward(loss_of(engine, rank, step))
            engine.step()
        out[name, stage] = _gathered(model) if stage == 3 else {n: p.detach().clone()
                                                                 for n, p in model.named_parameters()}
        if stage == 3 and name == "hooks":
            for save in (fastlora.save_adapter, fastlora.export_peft):  # outside a gather: refused
                with pytest.raises(ValueError, match="GatheredParameters"):
                    save(model, os.path.join(out_dir, "refused"))
            assert not os.path.exists(os.path.join(out_dir, "refused"))
            with deepspeed.zero.GatheredParameters(list(model.parameters())):
                if rank == 0:
                    fastlora.save_adapter(model, os.path.join(out_dir, "fastlora"))
                    fastlora.export_peft(model, os.path.join(out_dir, "peft"))
    model = make_model()  # LoRAPro as ZeRO-2's client optimizer sees flat partitions: refused
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=LoRAPro(model, lr=LR), config=_config(2))
    engine.backward(loss_of(engine, rank, 0))
    with pytest.raises(RuntimeError, match="DeepSpeed ZeRO"):
        engine.step()
    return out


def _one_process(opt_of) -> dict:
    model = make_model()
    opt = opt_of(model)
    for step in range(STEPS):
        reference_grads(model, step)  # the two ranks' gradients averaged (halving is exact)
        opt.step()
        opt.zero_grad()
    return model



def test_deepspeed_zero_0_2_3_adamw_lora_pro_and_zero3_saves(tmp_path):
    ranks = spawn(_worker, tmp_path)
    torch.set_num_threads(1)
    for key in ranks[0]:
        for name, value in ranks[0][key].items():
            assert torch.equal(value, ranks[1][key][name]), f"{key}: the ranks differ on {name}"
    lora_pro = _one_process(lambda m: LoRAPro(m, lr=LR))
    adamw = _one_process(_adamw)
    for name, p in lora_pro.named_parameters():
        assert torch.equal(ranks[0]["lora-pro", 0][name], p.detach()), f"ZeRO-0 LoRAPro: {name}"
    for stage in (2, 3):
        for name, p in adamw.named_parameters():
            assert torch.equal(ranks[0]["adamw", stage][name], p.detach()), f"ZeRO-{stage} AdamW: {name}"
    # The hooks adjust each rank's gradient before DeepSpeed averages them; one process adjusts the
    # average (LoRAPro efficient mode). The closed form is linear in the gradients, so the two
    # differ by its rounding (amplified by the Gram matrices' condition numbers) and Adam's own
    # few roundings per element and step, carried over the steps.
    start = make_model()
    kappa = gram_condition(start)
    efficient = _one_process(lambda m: LoRAPro(m, lr=LR, mode="efficient", moment_dtype=torch.float32))
    before = dict(start.named_parameters())
    n = max(max(layer.in_features, layer.out_features) for layer in fastlora.lora_layers(start).values())
    gamma = n * U / (1 - n * U)
    for stage in (2, 3):
        for name, p in efficient.named_parameters():
            moved = float((p.detach() - before[name].detach()).double().norm())
            tol = STEPS * 16 * kappa * gamma * moved + 4 * U * float(p.detach().norm())
            err = float((ranks[0]["hooks", stage][name] - p.detach()).double().norm())
            assert err <= tol, f"ZeRO-{stage} + lora_pro_gradient_hooks: {name}: {err:.3g} > {tol:.3g}"
    # The ZeRO-3 saves are complete: fastlora's file loads back to the trained values, PEFT's
    # export gives the trained model's logits.
    trained = make_model()
    with torch.no_grad():
        for name, p in trained.named_parameters():
            p.copy_(ranks[0]["hooks", 3][name])
    loaded = fastlora.load_adapter(make_model(), tmp_path / "fastlora")
    for name, p in trained.named_parameters():
        assert torch.equal(dict(loaded.named_parameters())[name], p), f"fastlora file: {name}"
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = TinyDecoder(d=12, h=21, depth=2, out=5)
    x = batch(5, 0)[0]
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft"))(x)
        ours = trained.double()(x.double())
    assert_matches(theirs, ours, torch.float32, "PEFT's logits from the ZeRO-3 export")
