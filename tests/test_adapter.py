"""Bottleneck adapters against a direct computation, on plain and tuple-returning sub-modules."""

import pytest
import torch
from transformers.activations import ACT2FN

import hybridtune as ht
from conftest import ATTN_BLOCK, CONFIGS, make_model, randomize


def adapter(model, **kwargs):
    return ht.inject(model, ht.HybridConfig(methods={"adapter": ht.AdapterConfig(**kwargs)}))


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_houlsby_placement_is_identity_at_init(arch, input_ids):
    model = make_model(arch)
    expected = model(input_ids).logits
    hybrid = adapter(model, after=[ATTN_BLOCK[arch], "mlp"], reduction_factor=8)
    assert len(list(hybrid.branches())) == 4
    assert torch.equal(hybrid(input_ids).logits, expected)
    for _, _, _, branch in hybrid.branches():
        assert branch.down.out_features == 4 and torch.count_nonzero(branch.up.weight) == 0


def test_mlp_adapter_matches_hand_computation(llama):
    hybrid = randomize(adapter(llama, after="mlp", bottleneck_size=5, activation="gelu", scaling=0.5))
    mlp = llama.model.layers[0].mlp
    branch = mlp.hybridtune["adapter"]
    x = torch.randn(2, 3, 32)
    f = mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
    down = f @ branch.down.weight.T + branch.down.bias
    expected = f + 0.5 * (ACT2FN["gelu"](down) @ branch.up.weight.T + branch.up.bias)
    torch.testing.assert_close(mlp(x), expected, atol=1e-6, rtol=1e-5)
    assert hybrid.trainable_parameters()["entries"]["adapter"]["trainable"] == 2 * (32 * 5 + 5 + 5 * 32 + 32)


def test_attention_tuple_output_keeps_the_other_items(llama):
    randomize(adapter(llama, after="self_attn"))
    attn = llama.model.layers[0].self_attn
    branch = attn.hybridtune["adapter"]
    hidden = torch.randn(1, 4, 32)
    position = llama.model.rotary_emb(hidden, torch.arange(4)[None])
    with torch.no_grad():
        out = attn(hidden_states=hidden, position_embeddings=position, attention_mask=None)
        branch.active = False
        plain = attn(hidden_states=hidden, position_embeddings=position, attention_mask=None)
    assert isinstance(out, tuple) and len(out) == len(plain)
    torch.testing.assert_close(out[0], branch.adapt(plain[0]))
    assert not torch.equal(out[0], plain[0])


def test_unsupported_output_type_is_a_clear_error():
    branch = ht.methods.adapter.AdapterBranch(
        4, 2, activation="relu", dropout=0.0, scaling=1.0, target="x.block", dtype=torch.float32, device="cpu"
    )
    with pytest.raises(TypeError, match="adapter after 'x.block': the module returned dict"):
        branch((), {}, {"hidden": torch.zeros(1, 4)})
