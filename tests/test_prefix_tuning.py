"""Prefix tuning through the KV cache: forward against an explicit cache, generate, architectures."""

import pytest
import torch
from transformers import DynamicCache

import hybridtune as ht
from conftest import assert_cached_generate_is_exact, make_model, train_losses
from hybridtune.core.kv_cache import cache_keyword

TOL = dict(atol=1e-5, rtol=1e-5)


def prefixed(arch="llama", n=3, **extra):
    methods = {"prefix": ht.PrefixTuningConfig(num_virtual_tokens=n), **extra}
    model = ht.inject(make_model(arch), ht.HybridConfig(methods=methods))
    return model, model.base_model.hybridtune["prefix"]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "qwen2"])
def test_forward_equals_an_explicit_prefix_cache(arch, input_ids):
    model, branch = prefixed(arch)
    base = model.base_model
    cache = DynamicCache(config=base.config)
    for layer in range(branch.prefix_keys.shape[0]):
        cache.update(branch.prefix_keys[layer].expand(2, -1, -1, -1), branch.prefix_values[layer].expand(2, -1, -1, -1),
                     layer)  # fmt: skip
    with model.disabled():
        reference = base(
            input_ids, attention_mask=torch.ones(2, 15, dtype=torch.long), **{cache_keyword(base): cache}
        ).logits
    out = model(input_ids, labels=input_ids)
    torch.testing.assert_close(out.logits, reference, **TOL)
    # the training recipe runs without a KV cache: the prefixes must still be there
    torch.testing.assert_close(model(input_ids, use_cache=False).logits, reference, **TOL)
    assert not torch.allclose(out.logits, make_model(arch)(input_ids).logits)  # documented: not identity at init
    out.loss.backward()
    assert branch.prefix_keys.grad.abs().sum() > 0 and branch.prefix_values.grad.abs().sum() > 0


def test_generate_with_padding_equals_the_uncached_loop():
    model, _ = prefixed()
    assert_cached_generate_is_exact(model, padded_row=1)


def test_prefix_with_lora_trains_and_saves(input_ids, tmp_path):
    model, _ = prefixed(lora=ht.LoRAConfig(r=4, targets=["q_proj", "v_proj"]))
    losses = train_losses(model, input_ids, steps=15, lr=3e-2)
    assert losses[-1] < losses[0]
    expected = model(input_ids).logits
    model.save_adapters(tmp_path)
    assert torch.equal(ht.load(make_model(), tmp_path)(input_ids).logits, expected)


@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "qwen2"])
@pytest.mark.parametrize(("with_prompt", "use_cache"), [(False, False), (True, False), (False, None)])
def test_gradient_checkpointing_keeps_the_prefixes(arch, with_prompt, use_cache, input_ids):
    """transformers drops the cache from checkpointed layers (their recompute would write it a
    second time), and the prefixes with it. A training call's prefixes are a read-only cache the
    layers may keep: the same loss and gradients as without checkpointing, with prompt tuning too
    and whether the call asks for no cache (the recipe) or leaves it to the config (transformers'
    Trainer); the layers are left as they were."""
    extra = {"prompt": ht.PromptTuningConfig(num_virtual_tokens=2)} if with_prompt else {}

    def run(checkpointing):
        model, _ = prefixed(arch, **extra)
        if checkpointing:
            model.activation_checkpointing_enable()
        model.train()
        loss = model(input_ids, labels=input_ids, use_cache=use_cache).loss
        loss.backward()
        return model, loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    _, plain_loss, plain_grads = run(False)
    model, loss, grads = run(True)
    torch.testing.assert_close(loss, plain_loss, **TOL)
    assert grads.keys() == plain_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], **TOL, msg=name)
    assert not any("_can_checkpoint_with_cache" in m.__dict__ for m in model.modules())


def test_gradient_checkpointing_on_a_model_that_withholds_the_cache_is_a_clear_error(input_ids):
    """GPT-2 passes its checkpointed blocks no cache at all: said plainly, not a shape mismatch."""
    model, _ = prefixed("gpt2")
    model.activation_checkpointing_enable()
    model.train()
    with pytest.raises(RuntimeError, match="cannot train GPT2LMHeadModel under gradient checkpointing"):
        model(input_ids, labels=input_ids, use_cache=False)
    model.eval()  # the layers were left as they were: the model still runs where it can
    assert not any(
        m._forward_pre_hooks or "_can_checkpoint_with_cache" in m.__dict__ for m in model.base_model.transformer.h
    )
    model(input_ids)
