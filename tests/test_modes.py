"""New branches follow the base model's train/eval mode: a base from ``from_pretrained`` is in
eval(), and branches injected or loaded into it must not run dropout."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

import hybridtune as ht
from conftest import make_model, randomize

# dropout everywhere a method has it, high enough that two live calls never agree
METHODS = {
    "lora": ht.LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj"], dropout=0.5),
    "adapter": ht.AdapterConfig(bottleneck_size=8, after="mlp", dropout=0.5),
}


def _deterministic(model, input_ids) -> bool:
    with torch.no_grad():
        return torch.equal(model(input_ids).logits, model(input_ids).logits)


def test_inject_into_an_eval_base_runs_without_dropout(input_ids):
    base = make_model("llama")  # eval(), as from_pretrained returns it
    model = randomize(ht.inject(base, ht.HybridConfig(methods=METHODS)))
    assert not model.training and not any(b.training for *_, b in model.branches())
    assert _deterministic(model, input_ids)
    model.train()
    assert not _deterministic(model, input_ids)  # the dropout is there, and train() turns it on
    model.eval()
    assert _deterministic(model, input_ids)


def test_inject_into_a_training_base_keeps_training_mode(input_ids):
    base = make_model("llama").train()
    model = ht.inject(base, ht.HybridConfig(methods=METHODS))
    assert model.training and all(b.training for *_, b in model.branches())


def test_load_and_added_sets_follow_the_base_mode(tmp_path, input_ids):
    trained = randomize(ht.inject(make_model("llama").train(), ht.HybridConfig(methods=METHODS)))
    trained.save_adapters(tmp_path / "a")
    loaded = ht.load(make_model("llama"), tmp_path / "a")
    assert _deterministic(loaded, input_ids)
    loaded.load_set("second", tmp_path / "a")
    loaded.set_active("second")
    assert not any(b.training for *_, b in loaded.branches())
    assert _deterministic(loaded, input_ids)


def test_import_peft_into_an_eval_base_runs_without_dropout(tmp_path, input_ids):
    base = make_model("llama")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.5)
    peft_model = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    peft_model.save_pretrained(tmp_path / "peft")
    imported = ht.import_peft(make_model("llama"), tmp_path / "peft")
    assert _deterministic(imported, input_ids)


@pytest.mark.parametrize("entry", ["lora", "adapter"])
def test_entries_added_to_an_existing_hybrid_follow_its_mode(entry, input_ids):
    model = ht.inject(
        make_model("llama"), ht.HybridConfig(methods={"first": ht.IA3Config(targets=["k_proj"], feedforward=[])})
    )
    model = ht.inject(model, ht.HybridConfig(methods={entry: METHODS[entry]}))
    assert not any(b.training for *_, b in model.branches())
