"""LoRA + Adapter in one model: joint training, gradients, generate, checkpointing, switches."""

import copy

import pytest
import torch

import hybridtune as ht
from conftest import make_model, randomize, train_losses


def hybrid_config(**lora_kwargs):
    return ht.HybridConfig(
        methods={
            "lora": ht.LoRAConfig(r=8, alpha=16, targets=["q_proj", "k_proj", "v_proj"], rank_pattern={"v_proj": 4},
                                  **lora_kwargs),
            "adapter": ht.AdapterConfig(reduction_factor=4, after="mlp", activation="gelu"),
        }
    )  # fmt: skip


def test_training_lowers_loss_and_never_touches_the_base(input_ids):
    model = make_model("llama", initializer_range=0.2)  # big enough logits for a frozen head to express
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hybrid = ht.inject(model, hybrid_config(dropout=0.05))
    hybrid.train()
    losses = train_losses(hybrid, input_ids, steps=50, lr=3e-2)
    assert losses[-1] < 0.7 * losses[0]
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def test_gradients_reach_every_method_and_nothing_else(llama, input_ids):
    hybrid = randomize(ht.inject(llama, hybrid_config()))
    hybrid(input_ids, labels=input_ids).loss.backward()
    branch_params = {id(p) for _, _, _, b in hybrid.branches() for p in b.parameters()}
    for name, p in hybrid.named_parameters():
        if id(p) in branch_params:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    counts = hybrid.trainable_parameters()["entries"]
    assert counts["lora"]["trainable"] == 2 * (8 * (32 + 32) + 8 * (32 + 16) + 4 * (32 + 16))
    assert counts["adapter"]["trainable"] > 0


def test_two_entries_of_the_same_kind(input_ids):
    model = make_model("llama")
    cfg = ht.HybridConfig(
        methods={
            "attn": ht.LoRAConfig(r=8, targets=["q_proj", "v_proj"]),
            "ffn": ht.LoRAConfig(r=2, alpha=4, targets=["down_proj"]),
            "extra": ht.LoRAConfig(r=3, targets=["q_proj"]),  # stacks on a module that already has one
        }
    )
    hybrid = randomize(ht.inject(model, cfg))
    q = model.model.layers[0].self_attn.q_proj
    assert list(q.hybridtune) == ["attn", "extra"]
    x = torch.randn(1, 2, 32)
    expected = x @ q.weight.T + sum(
        b.scale * (x @ b.lora_A.T @ b.lora_B.T) for b in (q.hybridtune["attn"], q.hybridtune["extra"])
    )
    torch.testing.assert_close(q(x), expected, atol=1e-6, rtol=1e-5)
    hybrid(input_ids, labels=input_ids).loss.backward()
    assert all(p.grad is not None for p in hybrid.parameters() if p.requires_grad)


def test_generate_and_no_grad_inference(llama, input_ids):
    plain = llama.generate(input_ids[:1], max_new_tokens=5, do_sample=False)
    hybrid = ht.inject(llama, hybrid_config())
    assert torch.equal(hybrid.generate(input_ids[:1], max_new_tokens=5, do_sample=False), plain)
    randomize(hybrid, std=0.5)
    with torch.no_grad():
        logits = hybrid(input_ids).logits
    assert not logits.requires_grad
    assert hybrid.generate(input_ids[:1], max_new_tokens=5, do_sample=False).shape == plain.shape


@pytest.mark.parametrize(("enable", "use_reentrant"), [
    ("activation_checkpointing_enable", False),
    ("activation_checkpointing_enable", True),
    ("gradient_checkpointing_enable", False),  # the older name
])  # fmt: skip
def test_gradient_checkpointing_gives_the_same_gradients(enable, use_reentrant, input_ids):
    """The same gradients, and branches really are recomputed in the backward pass, so
    checkpointing is on and covers them."""

    def grads(checkpointing):
        hybrid = randomize(ht.inject(make_model("llama"), hybrid_config()))
        hybrid.train()
        calls = []
        for *_, branch in hybrid.branches():
            branch.register_forward_hook(lambda *_: calls.append(1))
        if checkpointing:
            getattr(hybrid, enable)({"use_reentrant": use_reentrant})
        hybrid(input_ids, labels=input_ids).loss.backward()
        return {n: p.grad.clone() for n, p in hybrid.named_parameters() if p.requires_grad}, len(calls)

    (plain, plain_calls), (checkpointed, checkpointed_calls) = grads(False), grads(True)
    # (non-reentrant recomputation stops once it has what backward needs: a layer's last branch may be spared)
    assert 0 < plain_calls < checkpointed_calls <= 2 * plain_calls
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)


def test_disabled_and_set_trainable(llama, input_ids):
    base_logits = llama(input_ids).logits
    hybrid = randomize(ht.inject(llama, hybrid_config()))
    with hybrid.disabled():
        torch.testing.assert_close(hybrid(input_ids).logits, base_logits)
    with hybrid.disabled(["lora"]):
        only_adapter = hybrid(input_ids).logits
    assert not torch.allclose(only_adapter, base_logits)
    hybrid.set_trainable(["adapter"])
    assert all(not p.requires_grad for _, p in hybrid.entry_parameters("lora"))
    assert all(p.requires_grad for _, p in hybrid.entry_parameters("adapter"))
    with pytest.raises(KeyError, match="no method entry 'lroa'"):
        hybrid.set_trainable(["lroa"])


def test_inject_into_a_hybrid_adds_entries(llama):
    hybrid = ht.inject(llama, ht.HybridConfig(methods={"lora": ht.LoRAConfig(targets="q_proj")}))
    same = ht.inject(hybrid, ht.HybridConfig(methods={"adapter": ht.AdapterConfig()}))
    assert same is hybrid and list(hybrid.entries) == ["lora", "adapter"]
    with pytest.raises(ValueError, match="entry name\\(s\\) already in the model: lora"):
        ht.inject(hybrid, ht.HybridConfig(methods={"lora": ht.LoRAConfig(targets="v_proj")}))
    with pytest.raises(ValueError, match="already carries hybridtune branches"):
        ht.inject(llama, ht.HybridConfig(methods={"x": ht.LoRAConfig(targets="v_proj")}))


def test_deepcopy_keeps_working(llama, input_ids):
    hybrid = randomize(ht.inject(llama, hybrid_config()))
    twin = copy.deepcopy(hybrid)
    torch.testing.assert_close(twin(input_ids).logits, hybrid(input_ids).logits)


def test_transformers_trainer_trains_a_hybrid(tmp_path, input_ids):
    from transformers import Trainer, TrainingArguments

    model = make_model("llama", initializer_range=0.2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hybrid = ht.inject(model, hybrid_config())
    rows = [{"input_ids": row, "labels": row} for row in input_ids] * 4
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=4, learning_rate=3e-2,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(model=hybrid, args=args, train_dataset=rows)
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert losses[-1] < 0.5 * losses[0]
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
