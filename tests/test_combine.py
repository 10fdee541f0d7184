"""Merging LoRA sets into one, ensembles of sets, and routers that pick a set per input."""

import pytest
import torch

import hybridtune as ht
from conftest import make_model, make_tokenizer, randomize
from hybridtune.interop.set_merging import ClassifierRouter, Ensemble, RuleRouter, merge_sets

TOL = dict(atol=1e-5, rtol=1e-5)


def lora(r, targets=("q_proj", "v_proj")):
    return ht.HybridConfig(methods={"lora": ht.LoRAConfig(r=r, alpha=2 * r, targets=list(targets))})


@pytest.fixture
def two_sets():
    model = ht.inject(make_model(), lora(4), set_name="a")
    randomize(model, seed=1)
    model.add_set("b", ht.HybridConfig(methods={
        "attn": ht.LoRAConfig(r=2, targets=["q_proj"], use_rslora=True),
        "ffn": ht.LoRAConfig(r=3, alpha=1, targets=["down_proj", "q_proj"]),
    }))  # fmt: skip
    with model.using("b"):
        randomize(model, seed=2)
    return model


def deltas(model, set_name):
    total = {}
    with model.acting_on(set_name):
        for _, target, _, branch in model.branches():
            total[target] = total.get(target, 0) + branch.delta_weight()
    return total


def test_concat_merge_is_the_exact_weighted_sum(two_sets, input_ids):
    merge_sets(two_sets, {"a": 0.3, "b": 0.7}, into="ab")
    a, b, ab = deltas(two_sets, "a"), deltas(two_sets, "b"), deltas(two_sets, "ab")
    assert ab.keys() == a.keys() | b.keys()
    for target in ab:
        expected = 0.3 * a.get(target, 0) + 0.7 * b.get(target, 0)
        torch.testing.assert_close(ab[target], expected, **TOL)
    with two_sets.using("ab"):
        ranks = {t: br.rank for _, t, _, br in two_sets.branches()}
    assert ranks["model.layers.0.self_attn.q_proj"] == 4 + 2 + 3 and ranks["model.layers.0.mlp.down_proj"] == 3
    merge_sets(two_sets, {"a": 1.0}, into="a_again")
    with two_sets.using("a"):
        expected = two_sets(input_ids).logits
    with two_sets.using("a_again"):
        torch.testing.assert_close(two_sets(input_ids).logits, expected, **TOL)


def test_svd_merge_compresses_to_the_asked_rank(two_sets):
    exact = deltas(two_sets, "a")
    merge_sets(two_sets, {"a": 1.0}, into="full", method="svd", rank=4)
    merge_sets(two_sets, {"a": 1.0}, into="low", method="svd", rank=1)
    full, low = deltas(two_sets, "full"), deltas(two_sets, "low")
    for target, value in exact.items():
        torch.testing.assert_close(full[target], value, atol=1e-4, rtol=1e-4)  # rank 4 holds it all
        s = torch.linalg.svdvals(value)
        err = torch.linalg.matrix_norm(low[target] - value)
        torch.testing.assert_close(err, s[1:].norm(), atol=1e-4, rtol=1e-3)  # Eckart-Young: the best rank-1
    with pytest.raises(ValueError, match="needs rank"):
        merge_sets(two_sets, {"a": 1.0}, into="x", method="svd")


def test_merge_refuses_adapter_sets(two_sets):
    two_sets.add_set("ad", ht.HybridConfig(methods={"adapter": ht.AdapterConfig()}))
    with pytest.raises(ValueError, match="set 'ad' has non-LoRA entries \\(adapter\\)"):
        merge_sets(two_sets, {"a": 0.5, "ad": 0.5}, into="x")


def test_ensemble_averages_logits_in_one_pass(two_sets, input_ids):
    ensemble = Ensemble(two_sets, {"a": 1.0, "b": 3.0, None: 1.0})
    parts = {}
    for name in ["a", "b", None]:
        with two_sets.using(name):
            parts[name] = two_sets(input_ids).logits
    expected = 0.2 * parts["a"] + 0.6 * parts["b"] + 0.2 * parts[None]
    torch.testing.assert_close(ensemble(input_ids), expected, **TOL)


def test_ensemble_generate_matches_stepwise_argmax(two_sets):
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    ensemble = Ensemble(two_sets, {"a": 0.5, "b": 0.5})
    out = ensemble.generate(ids, attention_mask=mask, max_new_tokens=5)
    tokens, m = ids, mask
    for _ in range(5):  # the slow way: full forward each step, no cache
        positions = (m.cumsum(-1) - 1).clamp(min=0)
        logits = 0.5 * two_sets(tokens, attention_mask=m, position_ids=positions, adapter_sets=["a", "a"]).logits
        logits = (
            logits + 0.5 * two_sets(tokens, attention_mask=m, position_ids=positions, adapter_sets=["b", "b"]).logits
        )
        tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        m = torch.cat([m, torch.ones_like(m[:, :1])], dim=1)
    assert torch.equal(out, tokens)
    single = Ensemble(two_sets, {"b": 1.0}).generate(ids[:1], max_new_tokens=4)
    with two_sets.using("b"):
        assert torch.equal(single, two_sets.generate(ids[:1], max_new_tokens=4, do_sample=False))


def test_rule_router():
    router = RuleRouter("domain", {"med": "medical", "law": "legal"}, default=None)
    assert router.route([{"domain": "law"}, {"domain": "cooking"}, {"domain": "med"}]) == ["legal", None, "medical"]


def test_classifier_router_learns_to_pick_a_set():
    tok = make_tokenizer()
    model = ht.inject(make_model("llama", vocab_size=len(tok)), lora(2), set_name="colors")
    model.add_set("movies", lora(2))
    texts = ["what color is the sky", "what color is the grass", "the snow is white", "red blood and black coal",
             "this movie is great", "an awful film", "the film is good", "a bad movie review"]  # fmt: skip
    labels = ["colors"] * 4 + ["movies"] * 4
    router = ClassifierRouter(model, tok, ["colors", "movies"])
    assert router.fit(texts, labels) == 1.0
    assert router.route(["what color is the sun", "a great film"]) == ["colors", "movies"]
