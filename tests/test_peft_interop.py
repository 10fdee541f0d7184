"""export_peft -> peft loads it with the same logits; peft's own saves -> import_peft."""

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import hybridtune as ht
from conftest import make_model, randomize

TOL = dict(atol=1e-5, rtol=1e-5)


def _check_peft_loads(hybrid, base, tmp_path, input_ids, entries=None):
    expected = hybrid(input_ids).logits
    ht.export_peft(hybrid, tmp_path / "peft", entries=entries)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "peft")
    torch.testing.assert_close(peft_model(input_ids).logits, expected, **TOL)
    return json.loads((tmp_path / "peft" / "adapter_config.json").read_text())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_export_single_entry_with_rank_and_alpha_patterns(arch, tmp_path, input_ids):
    base = make_model(arch)
    targets = ["q_proj", "v_proj", "down_proj"] if arch == "llama" else ["c_attn", "mlp.c_proj"]
    cfg = ht.LoRAConfig(r=8, alpha=16, targets=targets, rank_pattern={targets[-1]: 4}, alpha_pattern={targets[0]: 4})
    hybrid = randomize(ht.inject(copy.deepcopy(base), ht.HybridConfig(methods={"lora": cfg})))
    config = _check_peft_loads(hybrid, base, tmp_path, input_ids)
    assert config["r"] == 8 and config["fan_in_fan_out"] == (arch == "gpt2")


def test_export_stacked_entries_rslora_and_adapters_left_out(tmp_path, input_ids):
    base = make_model("llama")
    methods = {
        "a": ht.LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]),
        "b": ht.LoRAConfig(r=2, alpha=4, targets=["q_proj", "o_proj"], use_rslora=True),
        "adapter": ht.AdapterConfig(),
    }
    hybrid = randomize(ht.inject(copy.deepcopy(base), ht.HybridConfig(methods=methods)))
    with pytest.raises(ValueError, match=r"'adapter' \(adapter\) have no equivalent .* entries=\['a', 'b'\]"):
        ht.export_peft(hybrid, tmp_path / "refused")  # a silent partial export would compute something else
    with hybrid.disabled(["adapter"]):
        config = _check_peft_loads(hybrid, base, tmp_path, input_ids, entries=["a", "b"])
    tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (6, 32)  # 4 + 2
    assert config["use_rslora"] is False


def test_import_what_peft_saved(tmp_path, input_ids):
    base = make_model("gpt2")
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], rank_pattern={"c_fc": 2},
                     alpha_pattern={"c_attn": 2}, fan_in_fan_out=True)  # fmt: skip
    peft_model = get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
    expected = peft_model(input_ids).logits
    peft_model.save_pretrained(tmp_path)
    hybrid = ht.import_peft(copy.deepcopy(base), tmp_path, entry="imported")
    torch.testing.assert_close(hybrid(input_ids).logits, expected, **TOL)
    ranks = {name: b.rank for _, name, _, b in hybrid.branches()}
    assert ranks["transformer.h.0.mlp.c_fc"] == 2 and ranks["transformer.h.1.attn.c_attn"] == 4
    # and into an existing hybrid, next to an adapter
    hybrid2 = ht.inject(copy.deepcopy(base), ht.HybridConfig(methods={"adapter": ht.AdapterConfig()}))
    ht.import_peft(hybrid2, tmp_path)
    assert list(hybrid2.entries) == ["adapter", "lora"]
    torch.testing.assert_close(hybrid2(input_ids).logits, expected, **TOL)


def test_export_and_import_errors(tmp_path, llama):
    only_adapter = ht.inject(llama, ht.HybridConfig(methods={"adapter": ht.AdapterConfig()}))
    with pytest.raises(ValueError, match=r"no entry of this model has a peft equivalent: 'adapter' \(adapter\)"):
        ht.export_peft(only_adapter, tmp_path)
    with pytest.raises(ValueError, match="no entry to export"):
        ht.export_peft(only_adapter, tmp_path, entries=[])
    with pytest.raises(ValueError, match=r"without a peft equivalent \(or not in this model\): adapter"):
        ht.export_peft(only_adapter, tmp_path, entries=["adapter"])
    with pytest.raises(ht.CheckpointError, match="no adapter_config.json"):
        ht.import_peft(make_model("llama"), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "bias": "all"}))
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(ht.CheckpointError, match="only a pickled adapter_model.bin is there"):
        ht.import_peft(make_model("llama"), tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ht.CheckpointError, match="'bias': 'all' is not supported"):
        ht.import_peft(make_model("llama"), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LOHA"}))
    with pytest.raises(ht.CheckpointError, match="peft_type 'LOHA' is not supported \\(supported: IA3, LORA\\)"):
        ht.import_peft(make_model("llama"), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(ht.CheckpointError, match="corrupt or truncated"):
        ht.import_peft(make_model("llama"), tmp_path)


def test_keys_that_keep_peft_adapter_name_import_the_same(tmp_path, input_ids):
    """A state dict saved straight from a PeftModel (keys `...lora_A.default.weight`)."""
    from safetensors.torch import save_file

    base = make_model("llama")
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
    peft_model.save_pretrained(tmp_path)
    expected = ht.import_peft(copy.deepcopy(base), tmp_path)(input_ids).logits
    saved = load_file(tmp_path / "adapter_model.safetensors")
    named = {k.replace(".weight", ".default.weight"): v for k, v in saved.items()}
    save_file(named, tmp_path / "adapter_model.safetensors")
    torch.testing.assert_close(
        ht.import_peft(copy.deepcopy(base), tmp_path)(input_ids).logits, expected, rtol=0, atol=0
    )
