"""Decoding steps' linear products (serving/decode_linear.py), weight-first and MKL-packed: the same
products as ``F.linear`` to fp32 rounding, only for the rows they are meant for, removable, chosen
per weight shape by measurement, and the engine's replies with them equal each set's replies
computed alone."""

import pytest
import torch
from accelerate.hooks import ModelHook, add_hook_to_module
from torch import nn
from torch.nn import functional as F

from hybridtune.core.base_models import load_base
from hybridtune.core.kv_cache import cache_keyword, returned_cache
from hybridtune.serving import AdaptersDir, Engine, decode_linear
from test_serve_engine import job, prompt_of, sets_dir, solo  # noqa: F401  (fixtures used below)

TOL = {"rtol": 1e-5, "atol": 1e-5}  # fp32 rounding of a 64-256 term sum


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 4), (2, 1, 4), (3, 5, 4), (40, 4)])
def test_products_equal_f_linear_and_other_row_counts_are_untouched(shape, bias):
    torch.manual_seed(0)
    layer = nn.Linear(4, 6, bias=bias)
    x = torch.randn(*shape[:-1], 4) * 3
    expected = F.linear(x, layer.weight, layer.bias)
    assert decode_linear.install(layer, most_rows=16, measure=False) == 1
    out = layer(x)
    assert out.shape == expected.shape and out.is_contiguous()
    torch.testing.assert_close(out, expected, **TOL)
    rows = x.numel() // 4
    if not 2 <= rows <= 16:  # one row, or a prefill chunk: F.linear itself, bit for bit
        assert torch.equal(out, expected)
    decode_linear.uninstall(layer)
    assert "forward" not in layer.__dict__


def test_a_decoding_step_equals_the_plain_model_and_only_plain_cpu_fp32_layers_change(tiny_lm_dir):
    model, _ = load_base(str(tiny_lm_dir))
    model.eval()
    ids = torch.randint(3, 97, (4, 9), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        prefill = model(input_ids=ids[:, :-1], use_cache=True)
        keyword = cache_keyword(model)
        plain = model(input_ids=ids[:, -1:], **{keyword: returned_cache(prefill)}, use_cache=True).logits
        linears = sum(type(m) is nn.Linear for m in model.modules())
        assert decode_linear.install(model, most_rows=8, measure=False) == linears
        prefill_again = model(input_ids=ids[:, :-1], use_cache=True)
        assert torch.equal(prefill_again.logits, prefill.logits)  # 32 rows > 8: untouched
        step = model(input_ids=ids[:, -1:], **{keyword: returned_cache(prefill_again)}, use_cache=True).logits
    torch.testing.assert_close(step, plain, **TOL)
    decode_linear.uninstall(model)
    assert not any("forward" in m.__dict__ for m in model.modules() if type(m) is nn.Linear)
    assert decode_linear.install(model.to(torch.bfloat16), most_rows=8, measure=False) == 0


def test_accelerate_hooks_keep_running():
    calls = []

    class Count(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            calls.append(1)
            return args, kwargs

    layer = nn.Linear(4, 6)
    add_hook_to_module(layer, Count())
    x = torch.randn(3, 4)
    expected = F.linear(x, layer.weight, layer.bias)
    decode_linear.install(layer, most_rows=8, measure=False)
    torch.testing.assert_close(layer(x), expected, **TOL)
    assert calls == [1]
    decode_linear.uninstall(layer)
    assert torch.equal(layer(x), expected) and calls == [1, 1]


def test_the_measurement_decides_per_weight_shape(monkeypatch):
    layers = nn.ModuleList([nn.Linear(64, 64), nn.Linear(64, 32), nn.Linear(64, 64)])
    monkeypatch.setattr(decode_linear, "measured_choice", lambda modules, rows, packed: dict.fromkeys(
        {tuple(m.weight.shape) for m in modules}))  # fmt: skip
    assert decode_linear.install(layers, most_rows=8) == 0 and not any("forward" in m.__dict__ for m in layers)
    measured = []

    def square_only(modules, rows, packed):
        measured.append((len(modules), rows))
        return {tuple(m.weight.shape): ("weight_first", 2) if m.weight.shape[0] == m.weight.shape[1] else None
                for m in modules}  # fmt: skip

    monkeypatch.setattr(decode_linear, "measured_choice", square_only)
    assert decode_linear.install(layers, most_rows=8) == 2
    assert measured == [(3, 8)]  # one measurement over every layer
    assert ["forward" in m.__dict__ for m in layers] == [True, False, True]


def test_the_measurement_runs_every_product_over_the_layers_and_names_one_per_shape():
    """Real timings (no outcome is asserted: which product wins is the CPU's business), so only
    the form: every shape gets None, weight-first from 2 rows, or packed from a count it measured."""
    layers = [nn.Linear(64, 48), nn.Linear(48, 64), nn.Linear(64, 48)]
    packed = {id(m): decode_linear.pack(m.weight, 8) for m in layers} if decode_linear.packing_available() else {}
    choice = decode_linear.measured_choice(layers, 8, packed, repeats=1)
    assert set(choice) == {(48, 64), (64, 48)}
    for picked in choice.values():
        assert picked is None or picked == ("weight_first", 2) or (picked[0] == "packed" and 3 <= picked[1] <= 8)


packing = pytest.mark.skipif(not decode_linear.packing_available(), reason="this torch has no MKL packed sgemm")


@packing
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 64), (2, 64), (3, 64), (2, 3, 64), (8, 64), (4, 2, 64), (9, 64), (40, 64)])
def test_packed_products_equal_f_linear_and_few_or_many_rows_are_untouched(shape, bias):
    torch.manual_seed(0)
    layer = nn.Linear(64, 48, bias=bias)
    x = torch.randn(*shape) * 3
    expected = F.linear(x, layer.weight, layer.bias)
    assert decode_linear.install(layer, most_rows=8, measure=False, product="packed") == 1
    out = layer(x)
    assert out.shape == expected.shape and out.is_contiguous()
    torch.testing.assert_close(out, expected, **TOL)
    rows = x.numel() // 64
    if not 3 <= rows <= 8:  # one or two rows (at memory speed already), or a prefill chunk: F.linear
        assert torch.equal(out, expected)
    with torch.no_grad():
        layer.weight.mul_(2)  # the packed copy is stale now: F.linear with the new weight
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    decode_linear.uninstall(layer)
    assert "forward" not in layer.__dict__


@packing
def test_a_packed_layer_takes_its_product_only_from_its_measured_row_count(monkeypatch):
    layer = nn.Linear(64, 48)
    monkeypatch.setattr(decode_linear, "measured_choice", lambda modules, rows, packed: {(48, 64): ("packed", 6)})
    calls = []
    real = decode_linear._packed_product
    monkeypatch.setattr(decode_linear, "_packed_product", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    assert decode_linear.install(layer, most_rows=8) == 1
    for rows in range(1, 11):
        torch.testing.assert_close(layer(torch.ones(rows, 64)), F.linear(torch.ones(rows, 64), layer.weight,
                                                                         layer.bias), **TOL)  # fmt: skip
    assert calls == [6, 7, 8]


@pytest.mark.parametrize("product", ["weight_first", pytest.param("packed", marks=packing)])
def test_engine_replies_with_other_products_equal_each_set_alone(sets_dir, tiny_lm_dir, solo, product):  # noqa: F811
    base, tokenizer = load_base(str(tiny_lm_dir))
    base.generation_config.eos_token_id = None
    tokenizer.eos_token_id = None
    engine = Engine(base.eval(), tokenizer, AdaptersDir(sets_dir), max_batch=4, max_loaded=1, decode_product=product)
    linears = [m for m in base.modules() if type(m) is nn.Linear]
    try:
        assert engine.stats["decode_product_layers"] == len(linears)
        jobs = [job(name, prompt_of(20 + i, 3 + i), 8) for i, name in enumerate(["alpha", None, "hybrid", "alpha"])]
        for j, _ in jobs:
            engine.submit(j)
        for (j, events), name in zip(jobs, ["alpha", None, "hybrid", "alpha"], strict=True):
            events.wait()
            assert j.generated == solo(name, j.prompt_ids, 8)
        assert engine.stats["largest_batch"] >= 2
        # one set loaded at a time: sets were unloaded (their branches detached) along the way,
        # and every layer still takes its product
        assert all(decode_linear._ours(m.__dict__.get("forward")) for m in linears)
        packed = [m.__dict__["forward"].keywords["packed"] is not None for m in linears]
        assert packed == [product == "packed"] * len(linears)
    finally:
        engine.close()
    assert not any("forward" in m.__dict__ for m in base.modules() if type(m) is nn.Linear)


def test_a_layer_whose_forward_was_replaced_is_left_alone_and_detaching_branches_keeps_ours():
    from hybridtune.core import attach

    replaced, plain = nn.Linear(4, 6), nn.Linear(4, 6)
    own = replaced.forward = lambda x: x  # e.g. another library's runner
    assert decode_linear.install(nn.ModuleList([replaced, plain]), most_rows=8, measure=False) == 1
    assert replaced.forward is own
    attach._remove_inside(plain)  # what detaching the last branch of a target does
    assert decode_linear._ours(plain.__dict__.get("forward"))


def test_an_unknown_product_or_a_failed_install_stops_the_engine_with_its_cause(tiny_lm_dir, sets_dir, monkeypatch):  # noqa: F811
    base, tokenizer = load_base(str(tiny_lm_dir))
    with pytest.raises(ValueError, match="decode_product 'pack': expected measured, linear, weight_first or packed"):
        Engine(base, tokenizer, AdaptersDir(sets_dir), decode_product="pack")

    real_install = decode_linear.install

    def half_then_fail(model, *args):
        real_install(decode_linear._eligible(model)[0], 8, False)
        raise MemoryError("no room")

    monkeypatch.setattr(decode_linear, "install", half_then_fail)
    with pytest.raises(RuntimeError, match="worker failed to start") as info:
        Engine(base, tokenizer, AdaptersDir(sets_dir))
    assert isinstance(info.value.__cause__, MemoryError)
    assert not any("forward" in m.__dict__ for m in base.modules() if type(m) is nn.Linear)  # put back
