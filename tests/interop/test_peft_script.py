"""PEFT's own causal-LM training example (its quick tour: LoraConfig with task_type, all-linear
targets and lora_dropout, get_peft_model, print_trainable_parameters, Trainer, save_pretrained)
runs with fastlora by changing only the import; PEFT reloads the saved folder and computes the
trained model's logits."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("accelerate")

# PEFT's quick tour, as a PEFT user has it (a tiny local model and token data in place of the hub).
PEFT_SCRIPT = '''
from peft import LoraConfig, TaskType, get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

peft_config = LoraConfig(task_type=TaskType.CAUSAL_LM, inference_mode=False, r=8, lora_alpha=32, lora_dropout=0.1,
                         target_modules="all-linear")
model = AutoModelForCausalLM.from_pretrained(base_model)
model = get_peft_model(model, peft_config)
model.print_trainable_parameters()

training_args = TrainingArguments(
    output_dir=output_dir,
    learning_rate=1e-3,
    per_device_train_batch_size=4,
    per_device_eval_batch_size=4,
    num_train_epochs=2,
    weight_decay=0.01,
    eval_strategy="epoch",
    save_strategy="epoch",
    load_best_model_at_end=True,
    report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
)
trainer = Trainer(model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset)
trainer.train()
model.save_pretrained(output_dir + "/final")
'''
FASTLORA_SCRIPT = PEFT_SCRIPT.replace("from peft import LoraConfig, TaskType, get_peft_model",
                                      "from peft import LoraConfig, TaskType\nfrom fastlora import get_peft_model")

VOCAB = 128


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        self.ids = torch.randint(1, VOCAB, (n, 8), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@pytest.mark.slow  # a Trainer run
def test_the_peft_quick_tour_trains_with_fastlora_and_peft_reloads_it(tmp_path, capsys):
    assert FASTLORA_SCRIPT != PEFT_SCRIPT and FASTLORA_SCRIPT.count("\n") == PEFT_SCRIPT.count("\n") + 1
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                                      pad_token_id=0)
    base = tmp_path / "base"
    transformers.LlamaForCausalLM(config).save_pretrained(base)
    namespace = dict(base_model=str(base), output_dir=str(tmp_path / "out"), train_dataset=_Tokens(16, 0),
                     eval_dataset=_Tokens(8, 1))
    exec(compile(FASTLORA_SCRIPT, "peft_quick_tour.py", "exec"), namespace)

    model = namespace["model"]
    import fastlora

    layers = fastlora.lora_layers(model)
    assert layers and {layer.lora_dropout for layer in layers.values()} == {0.1}
    assert "lm_head" not in layers
    assert capsys.readouterr().out.startswith("trainable params: ")
    ids = torch.randint(1, VOCAB, (2, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        trained = model.eval()(input_ids=ids).logits
        reloaded = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "out" / "final").eval()
        theirs = reloaded(input_ids=ids).logits
        original = transformers.AutoModelForCausalLM.from_pretrained(base).eval()(input_ids=ids).logits
    assert (trained - original).abs().max() > 1e-4  # it did train
    assert (theirs - trained).abs().max().item() <= 1e-5
