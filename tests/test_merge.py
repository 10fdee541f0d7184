"""merge / unmerge / merge_and_unload, on Linear and on GPT-2's transposed Conv1D."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import hybridtune as ht
from conftest import ATTN_BLOCK, ATTN_TARGETS, make_model, randomize


def lora_and_adapter(arch, with_adapter=True):
    methods = {
        "lora": ht.LoRAConfig(r=4, alpha=8, targets=ATTN_TARGETS[arch]),
        "ffn": ht.LoRAConfig(r=2, alpha=2, targets="all-linear", use_rslora=True),  # stacks on the attention ones
    }
    if with_adapter:
        methods["adapter"] = ht.AdapterConfig(after=[ATTN_BLOCK[arch], "mlp"])
    return randomize(ht.inject(make_model(arch), ht.HybridConfig(methods=methods)))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_merge_matches_unmerged_and_unmerge_is_exact(arch, input_ids):
    hybrid = lora_and_adapter(arch)
    original = {k: v.clone() for k, v in hybrid.base_model.state_dict().items()}
    expected = hybrid(input_ids).logits
    hybrid.merge()
    assert all(b.merged for e, _, _, b in hybrid.branches() if e != "adapter")
    merged = hybrid(input_ids).logits  # adapters still run on top of the merged weights
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)
    changed = [k for k, v in hybrid.base_model.state_dict().items() if not torch.equal(v, original[k])]
    assert changed and all(k.endswith("weight") for k in changed)
    hybrid.unmerge()
    for key, value in hybrid.base_model.state_dict().items():
        assert torch.equal(value, original[key]), key
    assert torch.equal(hybrid(input_ids).logits, expected)


def test_inexact_unmerge_is_close(input_ids):
    hybrid = lora_and_adapter("llama")
    original = {k: v.clone() for k, v in hybrid.base_model.state_dict().items()}
    hybrid.merge(exact_unmerge=False)
    hybrid.unmerge()
    for key, value in hybrid.base_model.state_dict().items():
        torch.testing.assert_close(value, original[key], atol=1e-6, rtol=0)


def test_merge_and_unload_refuses_non_mergeable(input_ids):
    hybrid = lora_and_adapter("llama")
    with pytest.raises(ht.MergeError, match="entries 'adapter' \\(adapter\\) are not mergeable"):
        hybrid.merge_and_unload()
    hybrid.delete_entry("adapter")
    assert "adapter" not in hybrid.entries
    hybrid.merge_and_unload()


def test_disable_refuses_while_merged(input_ids):
    hybrid = lora_and_adapter("llama")
    hybrid.merge()
    with pytest.raises(ht.MergeError, match="unmerge\\(\\) first"), hybrid.disabled():
        pass


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_and_unload_gives_a_plain_model_that_plain_transformers_loads(arch, input_ids, tmp_path):
    hybrid = lora_and_adapter(arch, with_adapter=False)
    expected = hybrid(input_ids).logits
    plain = hybrid.merge_and_unload()
    assert type(plain).__module__.startswith("transformers.")
    assert not any("hybridtune" in name for name, _ in plain.named_modules())
    assert all(not m._forward_hooks for m in plain.modules())
    torch.testing.assert_close(plain(input_ids).logits, expected, atol=1e-5, rtol=1e-5)
    plain.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(reloaded(input_ids).logits, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ht.MergeError, match="merged and unloaded"):
        hybrid(input_ids)


def test_fully_merged_modules_run_without_the_branch_hook(input_ids):
    hybrid = lora_and_adapter("llama")
    q = hybrid.base_model.model.layers[0].self_attn.q_proj
    mlp = hybrid.base_model.model.layers[0].mlp
    assert q._forward_hooks and mlp._forward_hooks
    expected = hybrid(input_ids).logits
    hybrid.merge()
    assert not q._forward_hooks  # zero per-call overhead for merged LoRA
    assert mlp._forward_hooks  # the adapter still runs
    torch.testing.assert_close(hybrid(input_ids).logits, expected, atol=1e-5, rtol=1e-5)
    hybrid.unmerge()
    assert q._forward_hooks
    assert torch.equal(hybrid(input_ids).logits, expected)
