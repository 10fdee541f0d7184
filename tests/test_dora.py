"""DoRA against peft's use_dora=True on the same weights, and its merge."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

import hybridtune as ht
from conftest import ATTN_TARGETS, make_model, randomize

TOL = dict(atol=1e-5, rtol=1e-5)


def dora(model, **kwargs):
    return ht.inject(model, ht.HybridConfig(methods={"dora": ht.DoRAConfig(**kwargs)}))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_same_logits_and_gradients_as_peft_dora(arch, input_ids):
    base = make_model(arch)
    targets = ATTN_TARGETS[arch] + (["mlp.c_fc"] if arch == "gpt2" else ["down_proj"])
    ours = randomize(dora(copy.deepcopy(base), r=4, alpha=8, targets=targets))
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True,
                                                            fan_in_fan_out=arch == "gpt2"))  # fmt: skip
    params = dict(theirs.named_parameters())
    with torch.no_grad():
        for _, name, _, branch in ours.branches():
            branch.magnitude.mul_(1 + 0.1 * torch.randn_like(branch.magnitude))
            params[f"base_model.model.{name}.lora_A.default.weight"].copy_(branch.lora_A)
            params[f"base_model.model.{name}.lora_B.default.weight"].copy_(branch.lora_B)
            params[f"base_model.model.{name}.lora_magnitude_vector.default.weight"].copy_(branch.magnitude)
    out_ours, out_theirs = ours(input_ids, labels=input_ids), theirs(input_ids, labels=input_ids)
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, **TOL)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    for _, name, _, branch in ours.branches():
        for mine, key in [("lora_A", "lora_A.default.weight"), ("lora_B", "lora_B.default.weight"),
                          ("magnitude", "lora_magnitude_vector.default.weight")]:  # fmt: skip
            peft_grad = params[f"base_model.model.{name}.{key}"].grad
            torch.testing.assert_close(getattr(branch, mine).grad, peft_grad, atol=1e-6, rtol=1e-4)


def test_identity_at_init_and_merge(input_ids, tmp_path):
    model = make_model("gpt2")
    expected = model(input_ids).logits
    hybrid = dora(model, r=4, targets=["c_attn", "c_proj"])
    torch.testing.assert_close(hybrid(input_ids).logits, expected, **TOL)
    randomize(hybrid)
    with torch.no_grad():
        for _, _, _, b in hybrid.branches():
            b.magnitude.abs_()
    original = {k: v.clone() for k, v in hybrid.base_state_dict().items()}
    live = hybrid(input_ids).logits
    hybrid.merge()
    torch.testing.assert_close(hybrid(input_ids).logits, live, **TOL)
    hybrid.unmerge()
    assert all(torch.equal(v, original[k]) for k, v in hybrid.base_state_dict().items())
    hybrid.merge(exact_unmerge=False)
    hybrid.unmerge()
    for key, value in hybrid.base_state_dict().items():
        torch.testing.assert_close(value, original[key], atol=1e-5, rtol=1e-5)
    hybrid.save_adapters(tmp_path)
    again = ht.load(make_model("gpt2"), tmp_path)
    torch.testing.assert_close(again(input_ids).logits, live, **TOL)
    plain = hybrid.merge_and_unload()
    torch.testing.assert_close(plain(input_ids).logits, live, **TOL)
