"""DoRA and IA3 in peft's format, against peft itself: adapters peft saved import with peft's logits
(within 1e-5) and gradients, what export_peft writes peft loads with our logits, round trips are
bit-exact, and what one peft adapter cannot hold is refused by name."""

import json
import zlib

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import hybridtune as ht
from conftest import make_model, randomize

TOL = dict(atol=1e-5, rtol=1e-5)  # fp32 logits of two implementations of the same sums
ARCHS = ["llama", "gpt2"]
DORA = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}
IA3 = {"llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]), "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"])}


def ids():
    return torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(5))


def peft_config(kind, arch, **options):
    if kind == "dora":
        return LoraConfig(r=4, lora_alpha=8, target_modules=DORA[arch], use_dora=True,
                          fan_in_fan_out=arch == "gpt2", **options)  # fmt: skip
    targets, feedforward = IA3[arch]
    return IA3Config(target_modules=targets, feedforward_modules=feedforward, fan_in_fan_out=arch == "gpt2", **options)


def peft_saved(kind, arch, tmp_path, **options):
    """A peft DoRA/IA3 adapter with nonzero random weights, saved; returns its dir and peft's reload."""
    model = get_peft_model(make_model(arch), peft_config(kind, arch, **options))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "ia3_" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(zlib.crc32(name.encode()))) * 0.1)
    model.save_pretrained(tmp_path / "peft")
    return tmp_path / "peft", PeftModel.from_pretrained(make_model(arch), tmp_path / "peft").eval()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["dora", "ia3"])
def test_peft_saved_dora_and_ia3_import_exactly(kind, arch, tmp_path):
    options = {"rank_pattern": {DORA[arch][-1]: 2}, "alpha_pattern": {DORA[arch][0]: 3}} if kind == "dora" else {}
    directory, peft_model = peft_saved(kind, arch, tmp_path, **options)
    hybrid = ht.import_peft(make_model(arch), directory, entry=kind)
    assert hybrid.hybrid_config.methods[kind].type == kind
    with torch.no_grad():
        torch.testing.assert_close(hybrid(ids()).logits, peft_model(ids()).logits, **TOL)
    per_module = 3 if kind == "dora" else 1
    assert len(list(hybrid.branches())) * per_module == len(load_file(directory / "adapter_model.safetensors"))


@pytest.mark.parametrize("kind", ["dora", "ia3"])
def test_imported_dora_and_ia3_gradients_equal_peft(kind, tmp_path):
    directory, peft_model = peft_saved(kind, "llama", tmp_path)
    hybrid = ht.import_peft(make_model("llama"), directory, trainable=True)
    peft_model.train()  # no dropout: train mode only turns gradients on
    for name, p in peft_model.named_parameters():
        p.requires_grad_("lora_" in name or "ia3_" in name)
    x = ids()
    peft_model(x, labels=x).loss.backward()
    hybrid(x, labels=x).loss.backward()
    theirs = {n.removeprefix("base_model.model.").replace(".default", ""): p.grad
              for n, p in peft_model.named_parameters() if p.requires_grad}  # fmt: skip
    ours = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "magnitude": "lora_magnitude_vector.weight",
            "ia3_l": "ia3_l"}  # fmt: skip
    for _, target, _, branch in hybrid.branches():
        for name, p in branch.named_parameters():
            expected = theirs[f"{target}.{ours[name]}"]
            torch.testing.assert_close(p.grad, expected.reshape(p.grad.shape), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["dora", "ia3"])
def test_exported_dora_and_ia3_load_in_peft_with_the_same_logits(kind, arch, tmp_path):
    if kind == "dora":
        config = ht.DoRAConfig(r=4, alpha=8, targets=DORA[arch], rank_pattern={DORA[arch][-1]: 2}, use_rslora=True)
    else:
        config = ht.IA3Config(targets=IA3[arch][0], feedforward=IA3[arch][1])
    hybrid = randomize(ht.inject(make_model(arch), ht.HybridConfig(methods={kind: config})))
    ht.export_peft(hybrid, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert saved["peft_type"] == ("LORA" if kind == "dora" else "IA3") and saved.get("use_dora", False) == (
        kind == "dora"
    )
    with torch.no_grad():
        peft_model = PeftModel.from_pretrained(make_model(arch), tmp_path / "out").eval()
        torch.testing.assert_close(peft_model(ids()).logits, hybrid(ids()).logits, **TOL)
    again = ht.import_peft(make_model(arch), tmp_path / "out", entry=kind)
    theirs = {t: b for _, t, _, b in again.branches()}
    for _, target, _, branch in hybrid.branches():  # bit-exact round trip of every tensor
        for name, p in branch.named_parameters():
            assert torch.equal(getattr(theirs[target], name), p), (target, name)


def test_one_peft_adapter_holds_one_peft_method(tmp_path):
    methods = {"lora": ht.LoRAConfig(r=4, alpha=8, targets=["q_proj"]), "dora": ht.DoRAConfig(r=2, targets=["v_proj"]),
               "ia3": ht.IA3Config(targets=["k_proj"])}  # fmt: skip
    hybrid = randomize(ht.inject(make_model("llama"), ht.HybridConfig(methods=methods)))
    with pytest.raises(ValueError, match=r"'lora' \(lora\), 'dora' \(dora\), 'ia3' \(ia3\) are different peft methods"):
        ht.export_peft(hybrid, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    for entry in methods:  # one method at a time, each loads in peft with that entry's function
        ht.export_peft(hybrid, tmp_path / entry, entries=[entry])
        with torch.no_grad(), hybrid.disabled([e for e in methods if e != entry]):
            peft_model = PeftModel.from_pretrained(make_model("llama"), tmp_path / entry).eval()
            torch.testing.assert_close(peft_model(ids()).logits, hybrid(ids()).logits, **TOL)
    two_dora = {"a": ht.DoRAConfig(r=2, targets=["q_proj"]), "b": ht.DoRAConfig(r=2, targets=["q_proj", "v_proj"])}
    hybrid = ht.inject(make_model("llama"), ht.HybridConfig(methods=two_dora))
    with pytest.raises(ValueError, match="DoRA entries .* cannot be written as one peft adapter"):
        ht.export_peft(hybrid, tmp_path / "two")


def test_ia3_options_peft_saves_are_refused_by_name_and_shapes_are_checked(tmp_path):
    directory, _ = peft_saved("ia3", "llama", tmp_path, modules_to_save=["lm_head"])
    with pytest.raises(ht.CheckpointError, match=r"'modules_to_save': \['lm_head'\] is not supported"):
        ht.import_peft(make_model("llama"), directory)
    config = json.loads((directory / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": None}))
    tensors = load_file(directory / "adapter_model.safetensors")
    with pytest.raises(
        ht.CheckpointError, match=r"key 'base_model.model.lm_head.weight' is not a tensor of peft's IA3"
    ):
        ht.import_peft(make_model("llama"), directory)  # the saved lm_head copy is no IA3 vector
    tensors = {k: v for k, v in tensors.items() if k.endswith("ia3_l")}
    key = next(k for k in tensors if "k_proj" in k)
    save_file({**tensors, key: torch.ones(3, 1)}, directory / "adapter_model.safetensors")
    with pytest.raises(ht.CheckpointError, match=r"k_proj': ia3_l \[3, 1\], but the layer is 32 -> 16"):
        ht.import_peft(make_model("llama"), directory)


def test_dora_dropout_in_training_rescales_the_dropped_input_like_peft():
    """With dropout, y = W x + (m/n - 1) W x~ + (m/n) s B A x~ (peft's placement), x~ the dropped input."""
    hybrid = randomize(ht.inject(make_model("llama"), {"methods": {"d": {"type": "dora", "r": 2, "targets": ["q_proj"],
                                                                         "dropout": 0.5}}}))  # fmt: skip
    _, _, module, branch = next(iter(hybrid.branches()))
    branch.train()
    x = torch.randn(2, 5, module.in_features)
    with torch.no_grad():
        got = branch((x,), {}, x @ module.weight.T)  # the branch on the plain output (module(x) would run it too)
        mask = branch.input_dropout.last_mask()
        dropped = x * mask
        ratio = branch.magnitude / branch.weight_norm()
        w = module.weight
        expected = x @ w.T + (ratio - 1) * (dropped @ w.T) + ratio * (dropped @ branch.A.T @ branch.B.T) * branch.scale
    assert 0 < (mask == 0).float().mean() < 1
    torch.testing.assert_close(got, expected, **TOL)
