"""hybridtune against peft itself, option by option: adapters peft saved with each LoraConfig
option import exactly (logits equal to peft's own reload, within 1e-5) or are refused with the
option named; what export_peft writes peft loads with the same logits; round trips are bit-exact
and gradients agree. No option is ever ignored silently."""

import copy
import json
import zlib

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import hybridtune as ht
from conftest import make_model, randomize

TOL = dict(atol=1e-5, rtol=1e-5)  # fp32 logits of two implementations of the same sums
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}
LAYERS = {"llama": "layers", "gpt2": "h"}
ARCHS = ["llama", "gpt2"]


def peft_saved(arch, tmp_path, **options):
    """A peft LoRA with ``options``, random nonzero weights, saved; returns its logits and dir."""
    base = make_model(arch)
    options = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS[arch], "fan_in_fan_out": arch == "gpt2", **options}
    model = get_peft_model(copy.deepcopy(base), LoraConfig(**options))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(zlib.crc32(name.encode())))
    model.save_pretrained(tmp_path / "peft")
    reloaded = PeftModel.from_pretrained(make_model(arch), tmp_path / "peft").eval()
    return tmp_path / "peft", reloaded


def ids():
    return torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(5))


EXACT = {
    "plain": {},
    "rank_and_alpha_patterns": {"rank_pattern": {"v_proj": 2, "c_fc": 2}, "alpha_pattern": {"q_proj": 3, "c_attn": 3}},
    "rslora": {"use_rslora": True},
    "layers_to_transform": {"layers_to_transform": [1]},
    "layers_to_transform_and_pattern": {"layers_to_transform": [0], "layers_pattern": "LAYERS"},
    "exclude_modules": {"exclude_modules": ["model.layers.0.self_attn.q_proj", "transformer.h.0.attn.c_attn"]},
    "init_gaussian": {"init_lora_weights": "gaussian"},
    "init_false": {"init_lora_weights": False},
    "dropout": {"lora_dropout": 0.2},  # compared in eval mode; the rate itself is imported as the entry's dropout
}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("case", sorted(EXACT))
def test_peft_options_import_exactly(arch, case, tmp_path):
    options = {k: (LAYERS[arch] if v == "LAYERS" else v) for k, v in EXACT[case].items()}
    directory, peft_model = peft_saved(arch, tmp_path, **options)
    hybrid = ht.import_peft(make_model(arch), directory)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(hybrid(x).logits, peft_model(x).logits, **TOL)
    saved = load_file(directory / "adapter_model.safetensors")
    assert len(list(hybrid.branches())) * 2 == len(saved)  # every saved module, and no other


REFUSED_BY_PEFT = {  # options peft itself saves in adapter_config.json; generated with peft
    "init_lora_weights": {"init_lora_weights": "pissa"},
    "init_lora_weights ": {"init_lora_weights": "olora"},
    "alora_invocation_tokens": {"alora_invocation_tokens": [5, 6]},
    "bias": {"bias": "all"},
    "lora_bias": {"lora_bias": True},
    "modules_to_save": {"modules_to_save": ["lm_head"]},
}


@pytest.mark.parametrize("key", sorted(REFUSED_BY_PEFT))
def test_peft_options_that_change_the_function_are_refused_by_name(key, tmp_path):
    directory, _ = peft_saved("llama", tmp_path, **REFUSED_BY_PEFT[key])
    with pytest.raises(ht.CheckpointError, match=f"'{key.strip()}': .* is not supported"):
        ht.import_peft(make_model("llama"), directory)


@pytest.mark.parametrize(
    ("key", "value"),
    [("trainable_token_indices", [1, 2]), ("layer_replication", [[0, 1]]), ("use_qalora", True),
     ("target_parameters", ["experts.gate_up_proj"]), ("megatron_config", {"a": 1}),
     ("loftq_config", {"loftq_bits": 4}), ("init_lora_weights", "corda"), ("use_bdlora", True),
     ("a_future_option", 3)],
)  # fmt: skip
def test_every_other_option_is_refused_by_name_unless_unset(key, value, tmp_path):
    directory, peft_model = peft_saved("llama", tmp_path)
    config = json.loads((directory / "adapter_config.json").read_text())
    config[key] = value
    (directory / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ht.CheckpointError, match=f"'{key}': "):
        ht.import_peft(make_model("llama"), directory)
    config[key] = True if key == "init_lora_weights" else None  # unset: nothing to reproduce
    (directory / "adapter_config.json").write_text(json.dumps(config))
    with torch.no_grad():
        torch.testing.assert_close(ht.import_peft(make_model("llama"), directory)(ids()).logits,
                                   peft_model(ids()).logits, **TOL)  # fmt: skip


def test_imported_gradients_equal_peft(tmp_path):
    directory, peft_model = peft_saved("llama", tmp_path, rank_pattern={"v_proj": 2})
    hybrid = ht.import_peft(make_model("llama"), directory, trainable=True)
    x = ids()
    peft_model.train()  # dropout is 0: train mode only turns gradients on
    for name, p in peft_model.named_parameters():
        p.requires_grad_("lora_" in name)
    peft_model(x, labels=x).loss.backward()
    hybrid(x, labels=x).loss.backward()
    theirs = {n.removeprefix("base_model.model.").replace(".default", ""): p.grad
              for n, p in peft_model.named_parameters() if "lora_" in n}  # fmt: skip
    for _, target, _, branch in hybrid.branches():
        for name in ("lora_A", "lora_B"):
            torch.testing.assert_close(
                getattr(branch, name).grad, theirs[f"{target}.{name}.weight"], atol=1e-6, rtol=1e-4
            )


# ---- export ----------------------------------------------------------------------------------
def _peft_reload(arch, directory):
    return PeftModel.from_pretrained(make_model(arch), directory).eval()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "cfg",
    [
        {"r": 4, "alpha": 8},
        {"r": 4, "alpha": 12, "use_rslora": True},
        {"r": {"start": 2, "max": 4, "grow_by": 2, "every_steps": 1}, "alpha": 8},
        {"r": {"start": 2, "max": 4, "grow_by": 2, "every_steps": 1}, "alpha": 8, "use_rslora": True},
    ],
    ids=["plain", "rslora", "grown", "grown_rslora"],
)
def test_exported_lora_loads_in_peft_with_the_same_logits(arch, cfg, tmp_path):
    hybrid = randomize(
        ht.inject(make_model(arch), {"methods": {"lora": {"type": "lora", "targets": TARGETS[arch], **cfg}}})
    )
    hybrid.update_rank_schedules(step=1, epoch=0.0)  # grown: rank 4, scale still alpha/2 (or alpha/sqrt 2)
    x = ids()
    ht.export_peft(hybrid, tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(_peft_reload(arch, tmp_path / "out")(x).logits, hybrid(x).logits, **TOL)
    again = ht.import_peft(make_model(arch), tmp_path / "out")
    theirs = {t: b for _, t, _, b in again.branches()}
    for _, target, _, branch in hybrid.branches():  # bit-exact round trip of the tensors
        assert torch.equal(theirs[target].A, branch.A) and torch.equal(theirs[target].B, branch.B)


@pytest.mark.parametrize("kind", ["adapter", "parallel_adapter", "lora_mixture", "prompt_tuning", "prefix_tuning"])
def test_entries_peft_cannot_hold_are_refused_unless_left_out_explicitly(kind, tmp_path):
    other = ht.METHODS[kind].example()
    hybrid = randomize(ht.inject(make_model("llama"), ht.HybridConfig(methods={
        "lora": ht.LoRAConfig(r=4, alpha=8, targets=["q_proj"]), "other": other})))  # fmt: skip
    with pytest.raises(ValueError, match=rf"'other' \({kind}\) have no equivalent in peft's format"):
        ht.export_peft(hybrid, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    ht.export_peft(hybrid, tmp_path / "lora", entries=["lora"])  # asked for: the LoRA part alone
    with torch.no_grad(), hybrid.disabled(["other"]):
        torch.testing.assert_close(_peft_reload("llama", tmp_path / "lora")(ids()).logits, hybrid(ids()).logits, **TOL)
