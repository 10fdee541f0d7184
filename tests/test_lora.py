"""LoRA against a hand computation and against peft's own LoRA on the same weights."""

import copy
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

import hybridtune as ht
from conftest import ATTN_TARGETS, CONFIGS, make_model, randomize

TOL = dict(atol=1e-5, rtol=1e-5)  # fp32 on CPU, same operations in a different order


def lora(model, **kwargs):
    return ht.inject(model, ht.HybridConfig(methods={"lora": ht.LoRAConfig(**kwargs)}))


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_identity_at_init_and_init_scheme(arch, input_ids):
    model = make_model(arch)
    expected = model(input_ids).logits
    hybrid = lora(model, r=4, alpha=8, targets="all-linear")
    assert torch.equal(hybrid(input_ids).logits, expected)
    for _, _, _, branch in hybrid.branches():
        assert torch.count_nonzero(branch.lora_B) == 0
        assert branch.lora_A.abs().sum() > 0
        bound = 1 / math.sqrt(branch.lora_A.shape[1])  # kaiming_uniform(a=sqrt(5)) bound
        assert branch.lora_A.abs().max() <= bound


def test_forward_matches_hand_computation(llama):
    x = torch.randn(3, 5, 32)
    randomize(lora(llama, r=4, alpha=12, targets="q_proj", rank_pattern={r"model\.layers\.1\..*": 2},
                   alpha_pattern={"layers.1.self_attn.q_proj": 3}))  # fmt: skip
    for i, (r, alpha) in enumerate([(4, 12), (2, 3)]):
        layer = llama.model.layers[i].self_attn.q_proj
        branch = layer.hybridtune["lora"]
        assert branch.lora_A.shape == (r, 32) and branch.scale == alpha / r
        expected = x @ layer.weight.T + (alpha / r) * (x @ branch.lora_A.T @ branch.lora_B.T)
        torch.testing.assert_close(layer(x), expected, **TOL)


def test_rslora_scale(llama):
    hybrid = lora(llama, r=16, alpha=8, targets="v_proj", use_rslora=True)
    assert all(b.scale == 8 / 4 for _, _, _, b in hybrid.branches())


def test_new_parameters_follow_base_dtype(input_ids):
    model = make_model("llama").to(torch.bfloat16)
    hybrid = lora(model, targets="all-linear")
    assert {p.dtype for p in hybrid.parameters() if p.requires_grad} == {torch.bfloat16}
    assert hybrid(input_ids).logits.dtype == torch.bfloat16


def test_dropout_only_in_training(llama, input_ids):
    hybrid = randomize(lora(llama, targets="q_proj", dropout=0.5))
    hybrid.eval()
    assert torch.equal(hybrid(input_ids).logits, hybrid(input_ids).logits)
    hybrid.train()
    assert not torch.equal(hybrid(input_ids).logits, hybrid(input_ids).logits)


def _peft_pair(arch, targets, **lora_kwargs):
    base = make_model(arch)
    ours = randomize(lora(copy.deepcopy(base), targets=targets, **lora_kwargs))
    cfg = LoraConfig(
        r=lora_kwargs["r"],
        lora_alpha=lora_kwargs["alpha"],
        target_modules=targets,
        lora_dropout=0.0,
        use_rslora=lora_kwargs.get("use_rslora", False),
        rank_pattern=lora_kwargs.get("rank_pattern", {}),
        fan_in_fan_out=arch == "gpt2",
    )
    theirs = get_peft_model(copy.deepcopy(base), cfg)
    peft_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for _, name, _, branch in ours.branches():
            peft_params[f"base_model.model.{name}.lora_A.default.weight"].copy_(branch.lora_A)
            peft_params[f"base_model.model.{name}.lora_B.default.weight"].copy_(branch.lora_B)
    return ours, theirs, peft_params


@pytest.mark.parametrize(
    ("arch", "kwargs"),
    [
        ("llama", dict(r=8, alpha=16, rank_pattern={"v_proj": 4})),
        ("llama", dict(r=8, alpha=16, use_rslora=True)),
        ("gpt2", dict(r=4, alpha=8)),
        ("qwen2", dict(r=4, alpha=32)),  # q/k/v with bias in the base layer
    ],
)
def test_same_logits_and_gradients_as_peft(arch, kwargs, input_ids):
    targets = ATTN_TARGETS[arch] + (["mlp.c_fc"] if arch == "gpt2" else ["down_proj"])
    ours, theirs, peft_params = _peft_pair(arch, targets, **kwargs)
    out_ours = ours(input_ids, labels=input_ids)
    out_theirs = theirs(input_ids, labels=input_ids)
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, **TOL)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    compared = 0
    for _, name, _, branch in ours.branches():
        for ab in "AB":
            peft_grad = peft_params[f"base_model.model.{name}.lora_{ab}.default.weight"].grad
            torch.testing.assert_close(getattr(branch, f"lora_{ab}").grad, peft_grad, atol=1e-6, rtol=1e-4)
            compared += 1
    assert compared == 2 * 2 * len(targets)  # A and B, 2 layers, every target


def test_bf16_base_with_fp32_lora_under_autocast_matches_peft(input_ids):
    """The mixed-precision fast path (no input copy, in-place addmm in the autocast dtype) against
    peft on the same bf16 base with fp32 LoRA weights, both under bf16 autocast."""
    ours, theirs, peft_params = _peft_pair("llama", ["q_proj", "v_proj", "down_proj"], r=8, alpha=16)
    ours.base_model.to(torch.bfloat16)
    ours.cast_branches(torch.float32)
    theirs.to(torch.bfloat16)
    for name, param in peft_params.items():
        if "lora_" in name:
            param.data = param.data.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_ours, out_theirs = ours(input_ids, labels=input_ids), theirs(input_ids, labels=input_ids)
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, atol=3e-2, rtol=3e-2)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    for _, name, _, branch in ours.branches():
        assert branch.lora_B.dtype == branch.lora_B.grad.dtype == torch.float32
        peft_grad = peft_params[f"base_model.model.{name}.lora_B.default.weight"].grad
        torch.testing.assert_close(branch.lora_B.grad, peft_grad, atol=2e-3, rtol=5e-2)


def test_lora_dropout_rate_scale_and_sharing():
    from hybridtune.methods.dropout import SharedDropout

    torch.manual_seed(0)
    x = torch.randn(64, 128, 256)
    dropout = SharedDropout(0.1)
    dropped = dropout(x, training=True)
    zero = dropped == 0
    assert abs(zero.float().mean().item() - 0.1) < 0.003
    torch.testing.assert_close(dropped[~zero], x[~zero] / 0.9)
    assert dropout(x, training=True) is dropped  # a second reader of x in the entry shares the mask
    assert SharedDropout(0.1)(x, training=True) is not dropped  # another entry draws its own
    assert dropout(x, training=False) is x
    x.add_(1.0)  # a changed tensor gets a new mask
    assert dropout(x, training=True) is not dropped
    assert not hasattr(x, "_hybridtune_dropout") and "_hybridtune_dropout" not in x.__dict__  # nothing kept on x


def test_q_k_v_share_one_dropout_mask(llama, input_ids):
    hybrid = randomize(lora(llama, targets=["q_proj", "k_proj", "v_proj"], dropout=0.3))
    hybrid.train()
    seen, masks = [], []
    attention = llama.model.layers[0].self_attn
    for name in ["q_proj", "k_proj", "v_proj"]:
        branch = getattr(attention, name).hybridtune["lora"]
        original = branch._hidden

        def spy(x, original=original, branch=branch):
            seen.append(x)
            hidden = original(x)
            masks.append(branch.input_dropout.last_mask())
            return hidden

        branch._hidden = spy
    hybrid(input_ids)
    assert seen[0] is seen[1] is seen[2]
    dropouts = {id(getattr(attention, n).hybridtune["lora"].input_dropout) for n in ("q_proj", "k_proj", "v_proj")}
    assert len(dropouts) == 1  # one per entry
    assert masks[0].eq(0).any() and torch.equal(masks[0], masks[1]) and torch.equal(masks[0], masks[2])


def test_entries_and_sets_draw_their_own_dropout_masks(llama, input_ids):
    """Two entries on the same targets, and a second set, never share a mask."""
    methods = {name: {"type": "lora", "r": 4, "targets": ["q_proj"], "dropout": 0.3} for name in ("a", "b")}
    hybrid = ht.inject(llama, {"methods": methods})
    hybrid.add_set("other", {"methods": methods})
    q = llama.model.layers[0].self_attn.q_proj.hybridtune
    dropouts = [q[key].input_dropout for key in q]
    assert len(dropouts) == 4 and len({id(d) for d in dropouts}) == 4
    x = torch.randn(64, 32)
    masks = [d(x, training=True) == 0 for d in dropouts]
    assert all(not torch.equal(masks[i], masks[j]) for i in range(4) for j in range(i + 1, 4))


def test_attached_configs_still_equal_their_copies(llama):
    """The entry's dropout state is not part of the config: a config compares equal to its copy
    after inject, and a saved and re-read config equals the one in the model."""
    cfg = ht.LoRAConfig(r=4, targets=["q_proj"], dropout=0.2)
    model = ht.inject(llama, {"methods": {"lora": cfg}})
    assert cfg == ht.LoRAConfig(r=4, targets=["q_proj"], dropout=0.2)
    assert ht.HybridConfig.from_dict(model.hybrid_config.to_dict()) == model.hybrid_config


@pytest.mark.parametrize("shape", [(7, 32), (3, 5, 32), (2, 3, 4, 32)])  # addmm_, baddbmm_, generic path
def test_dropout_forward_and_gradients_match_hand_computation(llama, shape):
    """Output and gradients (A, B and the input) through every way the branch adds s·B A x to the
    base output, with dropout on, against autograd on the plain formula with the same mask."""
    randomize(lora(llama, r=4, alpha=12, targets="q_proj", dropout=0.5))
    layer = llama.model.layers[0].self_attn.q_proj
    branch = layer.hybridtune["lora"]
    llama.train()
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=True)
    out = layer(x)
    mask = branch.input_dropout.last_mask()  # 0 or 1/(1-p)
    assert set(mask.round(decimals=4).unique().tolist()) == {0.0, 2.0}
    weight = torch.randn_like(out)
    (out * weight).sum().backward()

    a, b, x_ref = (t.detach().clone().requires_grad_(True) for t in (branch.lora_A, branch.lora_B, x))
    expected = x_ref @ layer.weight.T + 3.0 * ((x_ref * mask) @ a.T @ b.T)
    (expected * weight).sum().backward()
    torch.testing.assert_close(out, expected, **TOL)
    for ours, reference in [(branch.lora_A.grad, a.grad), (branch.lora_B.grad, b.grad), (x.grad, x_ref.grad)]:
        torch.testing.assert_close(ours, reference, **TOL)


def test_random_words_are_splitmix64_of_a_seed_from_torch():
    from hybridtune.methods.dropout import random_words

    def splitmix64(seed, i):  # the published algorithm, on Python integers
        z = (seed + i * 0x9E3779B97F4A7C15) % 2**64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
        return z ^ (z >> 31)

    torch.manual_seed(5)
    words = random_words(9, torch.device("cpu"))
    torch.manual_seed(5)
    seed = int(torch.empty((), dtype=torch.int64).random_(-(2**63), 2**63 - 1)) % 2**64
    assert [int(w) % 2**64 for w in words] == [splitmix64(seed, i) for i in range(1, 10)]
    torch.manual_seed(5)
    assert torch.equal(random_words(9, torch.device("cpu")), words)
    assert not torch.equal(random_words(9, torch.device("cpu")), words)


def test_dropout_masks_are_uniform_per_lane_and_independent_of_neighbours():
    """Each of the four 16-bit lanes of a word drops at rate p, and neighbours (in one word, across
    words, same lane of the next word) drop together at rate p²: a biased lane or correlated lanes
    (e.g. an arithmetic instead of a logical shift in the mixer) fail this."""
    from hybridtune.methods.dropout import SharedDropout

    p = 0.3
    torch.manual_seed(0)
    dropped = SharedDropout(p)(torch.ones(2048, 512), training=True).flatten() == 0
    tolerance = 6 * math.sqrt(p * (1 - p) / (dropped.numel() / 4))  # six standard errors
    for lane in range(4):
        assert abs(dropped[lane::4].float().mean().item() - p) < tolerance
    for distance in (1, 3, 4, 5, 512):
        both = (dropped[:-distance] & dropped[distance:]).float().mean().item()
        assert abs(both - p * p) < tolerance, distance
