"""IA3 against peft's IA3 on the same vectors; the parallel adapter against a hand computation."""

import copy

import pytest
import torch
from peft import IA3Config, get_peft_model
from transformers.activations import ACT2FN

import hybridtune as ht
from conftest import make_model, randomize

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("arch", "targets", "feedforward"),
    [("llama", ["k_proj", "v_proj", "down_proj"], ["down_proj"]), ("gpt2", ["c_attn", "mlp.c_proj"], ["mlp.c_proj"])],
)
def test_ia3_equals_peft(arch, targets, feedforward, input_ids):
    base = make_model(arch)
    config = ht.HybridConfig(methods={"ia3": ht.IA3Config(targets=targets, feedforward=feedforward)})
    ours = ht.inject(copy.deepcopy(base), config)
    theirs = get_peft_model(copy.deepcopy(base), IA3Config(target_modules=targets, feedforward_modules=feedforward,
                                                           fan_in_fan_out=arch == "gpt2"))  # fmt: skip
    params = dict(theirs.named_parameters())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, name, _, branch in ours.branches():
            branch.ia3_l.copy_(1 + 0.3 * torch.randn(branch.ia3_l.shape, generator=g))
            peft_vec = params[f"base_model.model.{name}.ia3_l.default"]
            peft_vec.copy_(branch.ia3_l.reshape(peft_vec.shape))
    out_ours, out_theirs = ours(input_ids, labels=input_ids), theirs(input_ids, labels=input_ids)
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, **TOL)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    for _, name, _, branch in ours.branches():
        peft_grad = params[f"base_model.model.{name}.ia3_l.default"].grad
        torch.testing.assert_close(branch.ia3_l.grad, peft_grad.reshape(-1), atol=1e-6, rtol=1e-4)


def test_parallel_adapter_matches_hand_computation(llama):
    cfg = ht.ParallelAdapterConfig(after="mlp", bottleneck_size=5, activation="gelu", scaling=4.0)
    randomize(ht.inject(llama, ht.HybridConfig(methods={"par": cfg})))
    mlp = llama.model.layers[1].mlp
    branch = mlp.hybridtune["par"]
    x = torch.randn(2, 3, 32)
    f = mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
    side = ACT2FN["gelu"](x @ branch.down.weight.T + branch.down.bias) @ branch.up.weight.T + branch.up.bias
    torch.testing.assert_close(mlp(x), f + 4.0 * side, **TOL)


def test_parallel_adapter_on_attention_reads_its_keyword_input(llama, input_ids):
    expected = llama(input_ids).logits
    model = ht.inject(llama, ht.HybridConfig(methods={"par": ht.ParallelAdapterConfig(after="self_attn")}))
    torch.testing.assert_close(model(input_ids).logits, expected, atol=0, rtol=0)
    randomize(model)
    model(input_ids, labels=input_ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters_to_train())
