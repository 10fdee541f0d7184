"""The contract every registered method keeps, run over the registry: a new method file is covered
by adding it to METHODS (with its example()). Each case is a method on a base: every method on the
tiny Llama and on the tiny Qwen2-MoE (whose attention and shared expert carry Llama's names, with
Adapters around its sparse MoE blocks), and LoRA on the fused expert tensors and routers of three MoE families."""

import itertools
from typing import NamedTuple

import pytest
import torch

import hybridtune as ht
from conftest import MOE_CONFIGS, make_model

NAMES = list(ht.METHODS)
TOL = dict(atol=1e-5, rtol=1e-5)


class Case(NamedTuple):
    name: str  # the method, and the entry's name
    arch: str
    experts: bool = False  # LoRA on the expert tensors instead of the method's example()

    def config(self):
        if self.experts:
            targets = ["q_proj", "mlp.gate", "experts.gate_up_proj", "experts.down_proj"]  # the router too
            return ht.METHODS[self.name](r=4, alpha=8, targets=targets)
        return ht.METHODS[self.name].example()

    def __str__(self):
        return f"{self.name}{'-experts' if self.experts else ''}@{self.arch}"


CASES = [Case(n, "llama") for n in NAMES] + [Case(n, "qwen2_moe") for n in NAMES]
CASES += [Case("lora", arch, experts=True) for arch in MOE_CONFIGS]
PAIRS = [(Case(a, "llama"), Case(b, "llama")) for a, b in itertools.combinations(NAMES, 2)]
PAIRS += [(Case("lora", "qwen2_moe", experts=True), Case(n, "qwen2_moe")) for n in NAMES if n != "lora"]
cases = pytest.mark.parametrize("case", CASES, ids=str)


def build(*cases):
    return ht.inject(make_model(cases[0].arch), ht.HybridConfig(methods={c.name: c.config() for c in cases}))


def perturb(model, seed=0):
    """Move every parameter away from its initial value (so identity-at-init branches do something)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters_to_train():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@cases
def test_identity_at_init(case, input_ids):
    expected = make_model(case.arch)(input_ids).logits
    got = build(case)(input_ids).logits
    if ht.METHODS[case.name].identity_at_init:
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    else:  # documented: it changes outputs from the start
        assert got.shape == expected.shape and not torch.allclose(got, expected)


@cases
def test_save_load_round_trip_is_exact(case, input_ids, tmp_path):
    model = perturb(build(case))
    expected = model(input_ids).logits
    assert not torch.allclose(expected, make_model(case.arch)(input_ids).logits)
    model.save_adapters(tmp_path)
    assert torch.equal(ht.load(make_model(case.arch), tmp_path)(input_ids).logits, expected)


@cases
def test_merge_is_exact_where_mergeable_and_refused_otherwise(case, input_ids):
    model = perturb(build(case))
    expected = model(input_ids).logits
    original = {k: v.clone() for k, v in model.base_state_dict().items()}
    if not ht.METHODS[case.name].mergeable:
        with pytest.raises(ht.MergeError, match="not mergeable"):
            model.merge_and_unload()
        return
    model.merge()
    torch.testing.assert_close(model(input_ids).logits, expected, **TOL)
    model.unmerge()
    assert all(torch.equal(v, original[k]) for k, v in model.base_state_dict().items())
    plain = model.merge_and_unload()
    torch.testing.assert_close(plain(input_ids).logits, expected, **TOL)
    assert not any("hybridtune" in n for n, _ in plain.named_modules())


@cases
def test_gradients_reach_only_its_parameters(case, input_ids):
    model = perturb(build(case))
    model(input_ids, labels=input_ids).loss.backward()
    own = {id(p) for p in model.parameters_to_train()}
    assert own
    for pname, p in model.named_parameters():
        if id(p) in own:
            assert p.grad is not None and p.grad.abs().sum() > 0, pname
        else:
            assert p.grad is None, pname


@cases
def test_a_set_per_row_equals_each_row_alone(case):
    name = case.name
    model = perturb(build(case))
    model.add_set("other", ht.HybridConfig(methods={name: case.config()}))
    with model.using("other"):
        perturb(model, seed=1)
    ids = torch.randint(0, 97, (3, 7), generator=torch.Generator().manual_seed(2))
    choice = ["other", None, "default"]
    if not ht.METHODS[name].supports_routing:
        with pytest.raises(ValueError, match=f"routing is not possible with entry '{name}'"):
            model(ids, adapter_sets=choice)
        return
    mixed = model(ids, adapter_sets=choice).logits
    for row, set_name in enumerate(choice):
        with model.using(set_name):
            torch.testing.assert_close(mixed[row], model(ids[row : row + 1]).logits[0], **TOL)


@pytest.mark.parametrize(("first", "second"), PAIRS, ids=lambda c: str(c))
def test_every_pair_trains_together(first, second, input_ids, tmp_path):
    model = perturb(build(first, second))
    model(input_ids, labels=input_ids).loss.backward()
    for entry in (first.name, second.name):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for _, p in model.entry_parameters(entry)), entry
    expected = model(input_ids).logits
    model.save_adapters(tmp_path)
    assert torch.equal(ht.load(make_model(first.arch), tmp_path)(input_ids).logits, expected)
