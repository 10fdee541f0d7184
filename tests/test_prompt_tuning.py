"""Prompt tuning through the model's own call: forward, loss, padding, generate with the KV cache."""

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

import hybridtune as ht
from conftest import assert_cached_generate_is_exact, make_model, train_losses
from hybridtune.core.kv_cache import cache_keyword

TOL = dict(atol=1e-5, rtol=1e-5)


def prompted(n=3, **extra):
    methods = {"prompt": ht.PromptTuningConfig(num_virtual_tokens=n), **extra}
    model = ht.inject(make_model("llama", initializer_range=0.2), ht.HybridConfig(methods=methods))
    return model, model.base_model.hybridtune["prompt"].prompt


def test_forward_and_loss_equal_the_explicit_computation(input_ids):
    model, prompt = prompted()
    base = model.base_model
    embeds = torch.cat([prompt.expand(2, -1, -1), base.get_input_embeddings()(input_ids)], dim=1)
    labels = torch.cat([torch.full((2, 3), -100), input_ids], dim=1)
    with model.disabled():
        reference = base(inputs_embeds=embeds, labels=labels)
    out = model(input_ids, labels=input_ids)
    assert out.logits.shape == (2, 12, 97)  # the prompt positions are not returned
    torch.testing.assert_close(out.logits, reference.logits[:, 3:], **TOL)
    torch.testing.assert_close(out.loss, reference.loss, **TOL)
    out.loss.backward()
    assert prompt.grad is not None and prompt.grad.abs().sum() > 0


def test_padding_rows_equal_each_row_alone():
    model, _ = prompted()
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    both = model(ids, attention_mask=mask, position_ids=positions).logits
    alone = model(ids[1:, 2:]).logits
    torch.testing.assert_close(both[1, 2:], alone[0], **TOL)


def test_generate_uses_the_prompt_and_the_cache_correctly():
    model, _ = prompted()
    assert_cached_generate_is_exact(model, padded_row=0)


def test_lora_plus_prompt_tuning_trains_and_saves(input_ids, tmp_path):
    model, prompt = prompted(n=4, lora=ht.LoRAConfig(r=4, targets=["q_proj", "v_proj"]))
    before = prompt.detach().clone()
    losses = train_losses(model, input_ids, steps=25, lr=3e-2)
    assert losses[-1] < 0.7 * losses[0] and not torch.equal(prompt, before)
    expected = model(input_ids).logits
    model.save_adapters(tmp_path)
    again = ht.load(make_model("llama", initializer_range=0.2), tmp_path)
    assert torch.equal(again(input_ids).logits, expected)
    with torch.no_grad():
        assert again.generate(input_ids, max_new_tokens=3, do_sample=False).shape == (2, 15)


def test_lora_plus_prompt_tuning_from_yaml(project, tiny_lm_dir):
    import yaml

    from conftest import write_config
    from hybridtune.training.recipe import train
    from hybridtune.training.run_config import load_run_config

    path = write_config(project, tiny_lm_dir, max_steps=12)
    raw = yaml.safe_load(path.read_text())
    raw["methods"] = {"lora": {"type": "lora", "r": 4, "targets": ["q_proj", "v_proj"]},
                      "prompt": {"type": "prompt_tuning", "num_virtual_tokens": 4}}  # fmt: skip
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    result = train(load_run_config(path), log=lambda *a: None)
    assert result.summary["after"]["eval_loss"] < 0.7 * result.summary["before"]["eval_loss"]
    reloaded = ht.load(AutoModelForCausalLM.from_pretrained(tiny_lm_dir), result.adapters_dir)
    assert list(reloaded.entries) == ["lora", "prompt"]


def test_concurrent_calls_keep_their_own_lengths():
    from concurrent.futures import ThreadPoolExecutor

    model, _ = prompted()
    inputs = [torch.randint(0, 97, (1, length), generator=torch.Generator().manual_seed(length)) for length in
              [3, 9, 5, 12, 7, 4, 10, 6]]  # fmt: skip
    with torch.no_grad():
        expected = [model(ids).logits for ids in inputs]
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda ids: model(ids).logits, inputs * 3))
    for i, logits in enumerate(got):
        torch.testing.assert_close(logits, expected[i % len(inputs)], **TOL)


@pytest.mark.parametrize("prefix_first", [True, False])
def test_prompt_and_prefix_tuning_compose_in_either_order(input_ids, prefix_first):
    """Both change a call's inputs; whichever runs second must still see the call as the first of
    its sequence (the cache then holds only the other's prefixes) and place its tokens after them."""
    entries = {"prompt": ht.PromptTuningConfig(num_virtual_tokens=3)}
    prefix = {"prefix": ht.PrefixTuningConfig(num_virtual_tokens=4)}
    methods = {**prefix, **entries} if prefix_first else {**entries, **prefix}
    torch.manual_seed(0)
    model = ht.inject(make_model("llama", initializer_range=0.2), ht.HybridConfig(methods=methods))
    base = model.base_model
    prompt, branch = base.hybridtune["prompt"].prompt, base.hybridtune["prefix"]
    cache = DynamicCache(config=base.config)
    for layer in range(branch.prefix_keys.shape[0]):
        cache.update(branch.prefix_keys[layer].expand(2, -1, -1, -1), branch.prefix_values[layer].expand(2, -1, -1, -1),
                     layer)  # fmt: skip
    embeds = torch.cat([prompt.expand(2, -1, -1), base.get_input_embeddings()(input_ids)], dim=1)
    with model.disabled():
        mask = torch.ones(2, 19)
        reference = base(inputs_embeds=embeds, attention_mask=mask, **{cache_keyword(base): cache}).logits[:, 3:]
    torch.testing.assert_close(model(input_ids).logits, reference, **TOL)
    assert_cached_generate_is_exact(model, padded_row=1)
