"""Named adapter sets on one base, and one forward pass serving a different set per row."""

import pytest
import torch

import hybridtune as ht
from conftest import make_model, randomize

TOL = dict(atol=1e-5, rtol=1e-5)


def lora_only(r=4):
    return ht.HybridConfig(methods={"lora": ht.LoRAConfig(r=r, alpha=2 * r, targets=["q_proj", "v_proj"])})


def hybrid_set():
    return ht.HybridConfig(methods={"lora": ht.LoRAConfig(r=2, targets="all-linear"),
                                    "adapter": ht.AdapterConfig(after=["self_attn", "mlp"])})  # fmt: skip


@pytest.fixture
def three_sets():
    model = ht.inject(make_model(), lora_only(4), set_name="a")
    randomize(model, seed=1)
    model.add_set("b", lora_only(8))
    with model.using("b"):
        randomize(model, seed=2)
    model.add_set("c", hybrid_set())
    with model.using("c"):
        randomize(model, seed=3)
    return model


def test_switching_sets_changes_outputs_without_copying_weights(three_sets, input_ids):
    model = three_sets
    assert model.list_sets() == ["a", "b", "c"] and model.active_set == "a"
    pointers = {n: p.data_ptr() for n, p in model.base_model.named_parameters()}
    outputs = {}
    for name in ["a", "b", "c", None]:
        model.set_active(name)
        outputs[name] = model(input_ids).logits
    assert all(not torch.allclose(outputs[x], outputs[y]) for x in outputs for y in outputs if x != y)
    assert {n: p.data_ptr() for n, p in model.base_model.named_parameters()} == pointers
    model.set_active("a")
    with model.using("c"):
        torch.testing.assert_close(model(input_ids).logits, outputs["c"])
    assert model.active_set == "a"
    torch.testing.assert_close(model(input_ids).logits, outputs["a"])
    with pytest.raises(KeyError, match="no adapter set 'd'; sets: a, b, c"):
        model.set_active("d")


def test_training_one_set_leaves_the_others_bit_identical(three_sets, input_ids):
    model = three_sets
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads_before = {n: p.requires_grad for n, p in model.named_parameters()}
    model.set_active("b")
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads_before  # switching flips nothing
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        model(input_ids, labels=input_ids).loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, snapshot[n])}
    assert changed and all(":" in n and n.split(".hybridtune.")[1].startswith("b:") for n in changed)


def test_sets_save_and_load_independently(three_sets, input_ids, tmp_path):
    model = three_sets
    model.save_set("c", tmp_path / "c")
    model.save_set("a", tmp_path / "a")
    with model.using("c"):
        expected_c = model(input_ids).logits
    with model.using("a"):
        expected_a = model(input_ids).logits
    fresh = ht.load(make_model(), tmp_path / "a", set_name="a")
    fresh.load_set("c", tmp_path / "c")
    assert fresh.list_sets() == ["a", "c"] and fresh.active_set == "a"
    torch.testing.assert_close(fresh(input_ids).logits, expected_a)
    with fresh.using("c"):
        torch.testing.assert_close(fresh(input_ids).logits, expected_c)
    fresh.delete_set("c")
    assert fresh.list_sets() == ["a"]
    assert not any(".c:" in n for n, _ in fresh.named_parameters())
    assert any(".a:" in n for n, _ in fresh.named_parameters())


def test_merged_set_blocks_switching_and_routing(three_sets, input_ids):
    model = three_sets
    model.merge()
    with pytest.raises(ht.MergeError, match="set 'a' has LoRA merged"):
        model.set_active("b")
    with pytest.raises(ht.MergeError, match="routing needs unmerged LoRA"):
        model(input_ids, adapter_sets=["a", "b"])
    model.unmerge()
    model.set_active("b")


@pytest.mark.parametrize("padded", [False, True])
def test_mixed_batch_equals_each_row_alone(three_sets, padded):
    model = three_sets
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 97, (5, 9), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :3] = 0  # left padding on two rows
        mask[3, :5] = 0
    choice = ["a", "b", "c", None, "a"]
    mixed = model(ids, attention_mask=mask, adapter_sets=choice).logits
    for row, name in enumerate(choice):
        with model.using(name):
            alone = model(ids[row : row + 1], attention_mask=mask[row : row + 1]).logits
        keep = mask[row].bool()
        torch.testing.assert_close(mixed[row, keep], alone[0, keep], **TOL)


def test_mixed_batch_gradients_reach_each_rows_set(three_sets, input_ids):
    model = three_sets
    model(input_ids, labels=input_ids, adapter_sets=["b", "c"]).loss.backward()
    with_grad = {n.split(".hybridtune.")[1].split(".")[0] for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {"b:lora", "c:lora", "c:adapter"}


def test_generate_with_a_set_per_row(three_sets):
    model = three_sets
    ids = torch.randint(0, 97, (4, 6), generator=torch.Generator().manual_seed(9))
    choice = ["c", None, "b", "a"]
    out = model.generate(ids, adapter_sets=choice, max_new_tokens=6, do_sample=False)
    for row, name in enumerate(choice):
        with model.using(name):
            alone = model.generate(ids[row : row + 1], max_new_tokens=6, do_sample=False)
        assert torch.equal(out[row], alone[0]), (row, name)
    two = model.generate(ids[:2], adapter_sets=["a", "b"], max_new_tokens=3, do_sample=True,
                         num_return_sequences=2)  # fmt: skip
    assert two.shape == (4, 9)
    with pytest.raises(KeyError, match="unknown adapter set\\(s\\) zz"):
        model(ids, adapter_sets=["a", "zz", None, None])
