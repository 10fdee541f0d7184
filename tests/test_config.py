import pytest
import torch
from pydantic import ValidationError

import hybridtune as ht
from conftest import make_model


def test_dicts_become_registered_configs():
    cfg = ht.HybridConfig(methods={"l": {"type": "lora", "targets": "q_proj", "r": 4}, "a": {"type": "adapter"}})
    assert isinstance(cfg.methods["l"], ht.LoRAConfig) and cfg.methods["l"].targets == ["q_proj"]
    assert isinstance(cfg.methods["a"], ht.AdapterConfig) and cfg.methods["a"].after == ["mlp"]
    again = ht.HybridConfig.from_dict(cfg.to_dict())
    assert again == cfg


def test_unknown_key_names_the_closest_valid_one():
    with pytest.raises(
        ValidationError, match="method entry 'l': unknown key 'alhpa' for a LoRAConfig; did you mean 'alpha'"
    ):
        ht.HybridConfig(methods={"l": {"type": "lora", "targets": "q_proj", "alhpa": 4}})
    with pytest.raises(ValidationError, match="unknown key 'reduction' .*did you mean 'reduction_factor'"):
        ht.AdapterConfig(reduction=8)


def test_unknown_method_type():
    with pytest.raises(ValidationError, match="unknown method type 'lroa'; did you mean 'lora'"):
        ht.HybridConfig(methods={"x": {"type": "lroa", "targets": "q_proj"}})
    with pytest.raises(ValidationError, match="needs a 'type' key"):
        ht.HybridConfig(methods={"x": {"targets": "q_proj"}})


def test_bad_values():
    with pytest.raises(ValidationError, match="r is 0; ranks must be >= 1"):
        ht.LoRAConfig(r=0, targets="q_proj")
    with pytest.raises(ValidationError, match="method entry 'l': dropout: Input should be less than 1"):
        ht.HybridConfig(methods={"l": {"type": "lora", "targets": "q_proj", "dropout": 1.5}})
    with pytest.raises(ValidationError, match="rank_pattern\\['v_proj'\\] is 0"):
        ht.LoRAConfig(targets="q_proj", rank_pattern={"v_proj": 0})
    with pytest.raises(ValidationError, match="unknown activation 'gleu'"):
        ht.AdapterConfig(activation="gleu")
    with pytest.raises(ValidationError, match="entry name 'my-lora' must be an identifier"):
        ht.HybridConfig(methods={"my-lora": {"type": "lora", "targets": "q_proj"}})
    with pytest.raises(ValidationError, match="at least 1 item"):
        ht.HybridConfig(methods={})


def test_peft_names_are_accepted_where_a_peft_user_types_them(input_ids):
    excluded = ["model.layers.0.self_attn.q_proj"]
    ours = ht.LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj"], dropout=0.1, exclude=excluded)
    theirs = ht.LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.1,
                           exclude_modules=excluded)  # fmt: skip
    assert theirs == ours and theirs.model_dump() == ours.model_dump()  # saved under hybridtune's names
    assert ht.DoRAConfig(lora_alpha=4, target_modules="q_proj").alpha == 4
    with pytest.raises(ValueError, match="'alpha' and 'lora_alpha' are the same option"):
        ht.LoRAConfig(alpha=8, lora_alpha=16, targets=["q_proj"])
    with pytest.raises(ValueError, match="unknown key 'lora_alhpa' .*did you mean 'lora_alpha'"):
        ht.LoRAConfig(lora_alhpa=8, targets=["q_proj"])


def test_a_bare_method_config_is_one_entry_named_after_its_type(tmp_path, input_ids):
    model = ht.inject(make_model("llama"), ht.LoRAConfig(r=4, target_modules=["q_proj"]))
    assert list(model.entries) == ["lora"]
    model.save_adapters(tmp_path)
    again = ht.HybridModel.from_pretrained(make_model("llama"), tmp_path)
    torch.testing.assert_close(again(input_ids).logits, model(input_ids).logits, rtol=0, atol=0)
