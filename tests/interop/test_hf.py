"""The Hugging Face stack: Trainer saves and resumes adapters only, PEFT and transformers load
them, unload, disable_adapter, task types, TRL."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import fastlora
from fastlora.optim import LoRAPro

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("accelerate")

VOCAB = 512
IDS = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(9))


def _config():
    return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                    pad_token_id=0)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny Llama saved to disk, so adapters can name their base (base_model_name_or_path)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base")
    transformers.LlamaForCausalLM(_config()).save_pretrained(path)
    return str(path)


def _base(base_dir):
    return transformers.LlamaForCausalLM.from_pretrained(base_dir).eval()


def _logits(model):
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


class _Data(torch.utils.data.Dataset):
    def __init__(self, n=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, 8), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _args(out, **kw):
    defaults = dict(output_dir=str(out), per_device_train_batch_size=4, max_steps=4, learning_rate=1e-2,
                    save_steps=2, logging_steps=1, report_to=[], use_cpu=True, seed=0, data_seed=0,
                    disable_tqdm=True, dataloader_num_workers=0)
    defaults.update(kw)
    return transformers.TrainingArguments(**defaults)


def _adapted(base_dir, init="lora"):
    model = _base(base_dir)
    kwargs = {}
    if init != "lora":
        batches = [{"input_ids": IDS, "labels": IDS}]
        kwargs = dict(init=init, gradients=fastlora.collect_gradients(model, batches, progress=False))
    fastlora.inject(model, ["q_proj", "v_proj"], r=4, lora_alpha=8, generator=torch.Generator().manual_seed(0),
                    **kwargs)
    return model


def _trainer(model, out, optimizer=None, **kw):
    optimizers = (optimizer(model), None) if optimizer else (None, None)
    return transformers.Trainer(model=model, args=_args(out, **kw), train_dataset=_Data(), optimizers=optimizers)


@pytest.mark.slow  # a Trainer run
def test_trainer_saves_the_adapter_only_and_every_loader_gets_the_trained_model(base_dir, tmp_path):
    model = _adapted(base_dir)
    trainer = _trainer(model, tmp_path / "run", max_steps=3, save_steps=100)
    trainer.train()
    out = tmp_path / "final"
    trainer.save_model(str(out))
    files = sorted(p.name for p in out.iterdir())
    assert "config.json" not in files and "adapter_model.safetensors" in files and "adapter_config.json" in files
    size = sum(p.stat().st_size for p in out.iterdir() if p.suffix == ".safetensors")
    full = sum(p.stat().st_size for p in Path(base_dir).iterdir() if p.suffix == ".safetensors")
    assert size < 0.05 * full, (size, full)
    want = _logits(model)
    assert (want - _logits(_base(base_dir))).abs().max() > 1e-4  # training moved the model
    got = _logits(peft.PeftModel.from_pretrained(_base(base_dir), str(out)))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    auto = transformers.AutoModelForCausalLM.from_pretrained(str(out))  # base + adapter, via PEFT
    torch.testing.assert_close(_logits(auto), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(_logits(fastlora.load_adapter(_base(base_dir), out)), want, rtol=0, atol=0)


@pytest.fixture
def single_thread():
    """One thread for runs compared bit for bit (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _adapter_values(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.slow  # a Trainer run
@pytest.mark.parametrize("init", ["lora", "lora_ga", "gora"])
@pytest.mark.parametrize("optimizer", [None, lambda m: LoRAPro(m, lr=1e-2, moment_dtype=torch.float32)],
                         ids=["adamw", "lorapro"])
def test_trainer_resume_is_bit_identical(base_dir, tmp_path, init, optimizer, single_thread):
    model = _adapted(base_dir, init)
    _trainer(model, tmp_path / "a", optimizer).train()
    straight = _adapter_values(model)
    # A new process would rebuild the model from the checkpoint's adapter (exact ranks and
    # LoRA-GA offsets), then let Trainer restore the adapter, optimizer, scheduler and RNG.
    checkpoint = tmp_path / "a" / "checkpoint-2"
    resumed = fastlora.load_adapter(_base(base_dir), checkpoint)
    _trainer(resumed, tmp_path / "b", optimizer).train(resume_from_checkpoint=str(checkpoint))
    again = _adapter_values(resumed)
    assert set(again) == set(straight)
    for name in straight:
        assert torch.equal(again[name], straight[name]), name


@pytest.mark.slow  # a Trainer run
def test_trainer_resumes_into_a_model_rebuilt_by_inject(base_dir, tmp_path, single_thread):
    """Trainer loads the checkpoint's adapter (model.safetensors, the trainable tensors only)."""
    model = _adapted(base_dir)
    _trainer(model, tmp_path / "a").train()
    rebuilt = _adapted(base_dir)
    _trainer(rebuilt, tmp_path / "b").train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    for name, value in _adapter_values(model).items():
        assert torch.equal(_adapter_values(rebuilt)[name], value), name


def test_unload_gives_a_standard_checkpoint(base_dir, tmp_path):
    model = _adapted(base_dir, "lora_ga")
    with torch.no_grad():
        for layer in fastlora.lora_layers(model).values():
            layer.lora_B.normal_(std=0.1)
    want = _logits(model)
    fastlora.merge_and_unload(model)
    assert not fastlora.lora_layers(model) and "save_pretrained" not in model.__dict__
    model.save_pretrained(tmp_path / "merged")
    assert (tmp_path / "merged" / "config.json").is_file()
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(_logits(loaded), want, rtol=0, atol=1e-5)
    # Without merging, the original base comes back (LoRA-GA's offset removed).
    plain = _adapted(base_dir, "lora_ga")
    fastlora.unload(plain, merge=False)
    torch.testing.assert_close(_logits(plain), _logits(_base(base_dir)), rtol=0, atol=1e-5)


def test_export_infers_the_task_type_for_auto_peft_models(base_dir, tmp_path):
    model = _adapted(base_dir)
    with torch.no_grad():
        for layer in fastlora.lora_layers(model).values():
            layer.lora_B.normal_(std=0.1)
    fastlora.export_peft(model, tmp_path / "p", base_model_name_or_path=base_dir)
    loaded = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "p"))
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=1e-5)
    assert fastlora.io.infer_task_type(model) == "CAUSAL_LM"
    bert = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16))
    assert fastlora.io.infer_task_type(bert) == "SEQ_CLS"
    assert fastlora.io.infer_task_type(torch.nn.Linear(2, 2)) is None


@pytest.mark.parametrize("init", ["lora", "lora_ga"])
def test_disable_adapter_gives_the_base_model(base_dir, init):
    model = _adapted(base_dir, init)
    with torch.no_grad():
        for layer in fastlora.lora_layers(model).values():
            layer.lora_B.normal_(std=0.1)
    adapted, base = _logits(model), _logits(_base(base_dir))
    with fastlora.disable_adapter(model):
        inside = _logits(model)
    if init == "lora":
        assert torch.equal(inside, base)
    else:  # the base weight holds W - s·B0 A0; the offset is added back in the branch
        torch.testing.assert_close(inside, base, rtol=0, atol=1e-5)
    assert torch.equal(_logits(model), adapted)
    with pytest.raises(KeyError):
        with fastlora.disable_adapter(model):
            raise KeyError("inside")
    assert torch.equal(_logits(model), adapted)
    fastlora.merge(model)
    with pytest.raises(RuntimeError, match="merged"):
        with fastlora.disable_adapter(model):
            pass


def test_print_trainable_parameters(base_dir, capsys):
    model = _adapted(base_dir)
    trainable, total = fastlora.print_trainable_parameters(model)
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert capsys.readouterr().out.strip() == (
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")


@pytest.mark.slow  # a Trainer run
def test_trl_sft_trainer_trains_a_fastlora_model(base_dir, tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    g = torch.Generator().manual_seed(1)
    rows = [{"input_ids": torch.randint(1, VOCAB, (12,), generator=g).tolist()} for _ in range(8)]
    data = datasets.Dataset.from_list(rows * 4)
    model = _adapted(base_dir)
    config = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=12, per_device_train_batch_size=4,
                           learning_rate=2e-2, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                           disable_tqdm=True, dataset_kwargs={"skip_prepare_dataset": True},
                           remove_unused_columns=False)
    def collator(batch):
        ids = torch.tensor([b["input_ids"] for b in batch])
        return {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}

    from tokenizers import Tokenizer, models

    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t1"))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=words, pad_token="t0", unk_token="t1",
                                                     eos_token="t2")
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=data, data_collator=collator,
                             processing_class=tokenizer)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
    trainer.save_model(str(tmp_path / "sft_out"))
    assert (tmp_path / "sft_out" / "adapter_model.safetensors").is_file()


def test_modules_to_save_train_a_copy_and_keep_the_original(base_dir, tmp_path):
    torch.manual_seed(0)
    cfg = _config()
    cfg.num_labels = 3
    base = transformers.LlamaForSequenceClassification(cfg).eval()
    base.save_pretrained(tmp_path / "base")
    base = transformers.LlamaForSequenceClassification.from_pretrained(tmp_path / "base").eval()
    model = copy.deepcopy(base)
    fastlora.inject(model, ["q_proj", "v_proj"], r=4, lora_alpha=8, modules_to_save=["score"])
    original = model.score.original_module.weight.detach().clone()
    assert not model.score.original_module.weight.requires_grad and model.score.trained.weight.requires_grad
    assert model.score.weight is model.score.trained.weight  # attributes read through to the copy
    opt = torch.optim.AdamW(fastlora.trainable_parameters(model), lr=1e-2)
    for _ in range(3):
        model.train()(input_ids=IDS, labels=torch.tensor([0, 2])).loss.backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(model.score.original_module.weight, original)
    want = _logits(model)
    with fastlora.disable_adapter(model):
        torch.testing.assert_close(_logits(model), _logits(base), rtol=0, atol=1e-6)
    model.save_pretrained(tmp_path / "out")
    config = (tmp_path / "out" / "adapter_config.json").read_text()
    assert '"modules_to_save": [\n    "score"\n  ]' in config and '"SEQ_CLS"' in config
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "out"))
    torch.testing.assert_close(_logits(peft_model), want, rtol=0, atol=1e-5)
    for load in (fastlora.load_adapter, fastlora.import_peft):
        loaded = load(copy.deepcopy(base), tmp_path / "out")
        assert isinstance(loaded.score, fastlora.copies.TrainableCopy)
        torch.testing.assert_close(_logits(loaded), want, rtol=0, atol=1e-5)
    merged = fastlora.unload(copy.deepcopy(model), merge=True)
    assert isinstance(merged.score, torch.nn.Linear)
    torch.testing.assert_close(_logits(merged), want, rtol=0, atol=1e-5)
    plain = fastlora.unload(model, merge=False)
    torch.testing.assert_close(_logits(plain), _logits(base), rtol=0, atol=1e-6)


@pytest.mark.slow  # a Trainer run
def test_trl_dpo_trainer_trains_a_fastlora_model(base_dir, tmp_path):
    """DPO with the reference log-probabilities precomputed (TRL keeps a frozen copy of the model
    at the start as the reference); the preference loss falls."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t1"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=words, pad_token="t0", unk_token="t1",
                                                     eos_token="t2")
    g = torch.Generator().manual_seed(0)

    def text(n):
        return " ".join(f"t{int(i)}" for i in torch.randint(3, VOCAB, (n,), generator=g))

    data = datasets.Dataset.from_list([{"prompt": text(6), "chosen": text(4), "rejected": text(4)} for _ in range(8)])
    model = _adapted(base_dir)
    config = trl.DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=8, per_device_train_batch_size=4,
                           learning_rate=5e-3, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                           disable_tqdm=True, precompute_ref_log_probs=True)
    trainer = trl.DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 8 and losses[-1] < losses[0]


def _quantized_base(base_dir):
    """The base loaded in 4 bits (NF4, double quantization, float32 compute) by transformers, with
    bitsandbytes' CPU repacking off (fastlora's layers keep it off; see fastlora.quantized)."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=config,
                                                                  device_map="cpu", dtype=torch.float32)
    except (ImportError, RuntimeError, ValueError) as exc:  # a bitsandbytes or transformers without CPU 4-bit
        pytest.skip(f"transformers cannot load a 4-bit model on this CPU: {exc}")
    for m in model.modules():
        fastlora.quantized.cpu_repacking(m, False)
    return model.eval()


@pytest.mark.slow  # a Trainer run
def test_qlora_from_transformers_4bit_loader_trains_saves_exports_and_imports(base_dir, tmp_path, single_thread):
    model = _quantized_base(base_dir)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.uint8
    batches = [{"input_ids": IDS, "labels": IDS}]
    stats = fastlora.collect_gradients(model, batches, progress=False)
    fastlora.inject(model, "all-linear", r=4, lora_alpha=8, init="lora_ga", gradients=stats)
    layers = fastlora.lora_layers(model)
    assert len(layers) == 14 and all(layer.quantized and layer.base_offset is not None for layer in layers.values())
    torch.testing.assert_close(_logits(model), _logits(_quantized_base(base_dir)), rtol=0, atol=1e-4)
    _trainer(model, tmp_path / "run", lambda m: LoRAPro(m, lr=1e-2, moment_dtype=torch.float32), max_steps=2,
             save_steps=100).train()
    out = tmp_path / "final"
    _trainer(model, tmp_path / "run", max_steps=0).save_model(str(out))
    want = _logits(model)
    assert (want - _logits(_quantized_base(base_dir))).abs().max() > 1e-4  # training moved the model
    torch.testing.assert_close(_logits(fastlora.load_adapter(_quantized_base(base_dir), out)), want, rtol=0, atol=0)
    fastlora.export_peft(model, tmp_path / "peft")  # LoRA-GA as the rank-2r adapter on the quantized base
    theirs = peft.PeftModel.from_pretrained(_quantized_base(base_dir), str(tmp_path / "peft"))
    for m in theirs.modules():
        fastlora.quantized.cpu_repacking(m, False)
    torch.testing.assert_close(_logits(theirs), want, rtol=0, atol=1e-4)
    imported = fastlora.import_peft(_quantized_base(base_dir), tmp_path / "peft")
    torch.testing.assert_close(_logits(imported), want, rtol=0, atol=1e-4)
    assert imported._hf_peft_config_loaded  # what Trainer asks of a quantized model
    fastlora.unload(imported, merge=False)
    assert not imported._hf_peft_config_loaded
