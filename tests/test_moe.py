"""Mixture-of-experts models (tiny Qwen3-MoE, Mixtral and Qwen2-MoE with shared experts, built from
configs): what `all-linear` adapts and what it says it leaves out, targets that name the fused
experts, Adapters around the sparse MoE blocks (with the router's load-balancing loss), save/load,
and serving an MoE base with per-row sets."""

import threading
import warnings

import pytest
import torch
import yaml

import hybridtune as ht
from conftest import MOE_CONFIGS, greedy_uncached, make_model, make_tokenizer, randomize
from hybridtune.cli import main
from hybridtune.core.errors import TargetError, TargetWarning

CONFIGS = MOE_CONFIGS
ALL_LINEAR = {"methods": {"lora": {"type": "lora", "r": 2, "targets": "all-linear"}}}
HYBRID = {
    "lora": {"type": "lora", "r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]},
    "adapter": {"type": "adapter", "after": "mlp", "bottleneck_size": 8},
}
# LoRA on the router and the expert tensors themselves (tests/test_moe_lora.py), beside an Adapter after each block
EXPERTS_HYBRID = {
    **HYBRID,
    "lora": {
        "type": "lora",
        "r": 4,
        "alpha": 8,
        "targets": ["q_proj", "mlp.gate", "experts.gate_up_proj", "experts.down_proj"],
    },
}


def moe_model(arch, seed=0, **overrides):
    return make_model(arch, seed, **overrides)


def batch(seed=1):
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(seed))
    return ids, torch.ones_like(ids)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_all_linear_adapts_the_linear_layers_and_says_what_it_leaves_out(arch):
    with pytest.warns(TargetWarning) as caught:
        model = ht.inject(moe_model(arch), ALL_LINEAR)
    (warning,) = [w for w in caught if issubclass(w.category, TargetWarning)]
    message = str(warning.message)
    assert "model.layers.*.mlp.experts.down_proj" in message and "model.layers.*.mlp.gate.weight" in message
    assert "% of the model's weights" in message
    targeted = set(model.targets)
    assert any(t.endswith("self_attn.q_proj") for t in targeted)
    if arch == "qwen2_moe":  # shared experts are plain linears: adapted
        assert any(t.endswith("mlp.shared_expert.down_proj") for t in targeted)
        assert any(t.endswith("mlp.shared_expert_gate") for t in targeted)
    assert not any("experts." in t and "shared" not in t for t in targeted)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TargetWarning)  # a dense model: nothing left out, nothing said
        ht.inject(make_model("llama"), ALL_LINEAR)


def test_targets_naming_the_fused_experts_are_refused_with_what_to_do():
    with pytest.raises(TargetError, match="fused 3-D expert tensors, not linear layers"):
        ht.inject(moe_model("qwen3_moe"), {"methods": {"lora": {"type": "lora", "r": 2, "targets": ["experts"]}}})


@pytest.mark.parametrize("methods", [HYBRID, EXPERTS_HYBRID], ids=["attention-lora", "experts-lora"])
@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_adapters_around_moe_blocks_train_with_the_load_balancing_loss(arch, methods, tmp_path):
    ids, mask = batch()
    base = moe_model(arch, output_router_logits=True, router_aux_loss_coef=0.5)
    with torch.no_grad():
        expected = base(input_ids=ids, attention_mask=mask, labels=ids)
    assert expected.aux_loss is not None and expected.aux_loss > 0
    model = ht.inject(base, {"methods": methods})
    with torch.no_grad():
        start = model(input_ids=ids, attention_mask=mask, labels=ids)
    torch.testing.assert_close(start.logits, expected.logits, rtol=0, atol=1e-6)  # identity at init
    torch.testing.assert_close(start.aux_loss, expected.aux_loss)
    torch.testing.assert_close(start.loss, expected.loss)  # the aux loss is in the loss, weighted
    model.train()
    optimizer = torch.optim.AdamW(model.parameters_to_train(), lr=1e-2)
    losses = []
    for _ in range(8):
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
        assert torch.isfinite(out.aux_loss)
    assert losses[-1] < losses[0]
    model.eval()
    model.save_adapters(tmp_path / "set")
    loaded = ht.load(moe_model(arch, output_router_logits=True, router_aux_loss_coef=0.5), tmp_path / "set").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_validate_prints_the_all_linear_warning_as_one_line(tmp_path, capsys):
    model = moe_model("qwen3_moe")
    model.save_pretrained(tmp_path / "moe")
    make_tokenizer().save_pretrained(tmp_path / "moe")
    (tmp_path / "train.jsonl").write_text('{"instruction": "hi", "output": "there"}\n')
    config = {"model": str(tmp_path / "moe"), **ALL_LINEAR,
              "data": {"train": str(tmp_path / "train.jsonl")}, "output": str(tmp_path / "run")}  # fmt: skip
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert main(["validate", str(tmp_path / "run.yaml")]) == 0
    err = capsys.readouterr().err
    assert "warning: entry 'lora': 'all-linear' adapts linear layers only; it leaves out" in err
    assert "LoRA adapts the expert tensors when targets name them: experts.gate_up_proj, experts.down_proj" in err
    assert "Traceback" not in err and "TargetWarning" not in err


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_the_serving_engine_batches_sets_on_an_moe_base(arch, tmp_path):
    from hybridtune.serving import AdaptersDir, Engine, Job
    from hybridtune.serving.sampling import Sampling

    for seed, (name, methods) in enumerate([("one", HYBRID), ("two", EXPERTS_HYBRID)]):  # per row: one, base, two
        randomize(ht.inject(moe_model(arch), {"methods": methods}), std=0.5, seed=seed).save_adapters(tmp_path / name)
    engine = Engine(moe_model(arch), make_tokenizer(), AdaptersDir(tmp_path), max_batch=4)
    try:
        jobs = []
        for i, name in enumerate(["one", None, "two"]):
            done = threading.Event()
            job = Job(name, list(range(5, 10 + 2 * i)), 6, Sampling(temperature=0), [],
                      lambda kind, *_, done=done: done.set() if kind in ("end", "error") else None)  # fmt: skip
            jobs.append((job, done))
            engine.submit(job)
        for job, done in jobs:
            assert done.wait(60)
            reference = moe_model(arch)
            if job.adapter:
                reference = ht.load(reference, tmp_path / job.adapter)
            ids = torch.tensor([job.prompt_ids])
            with torch.no_grad():
                expected = greedy_uncached(reference, ids, torch.ones_like(ids), len(job.generated))
            assert job.generated == expected[0, ids.shape[1] :].tolist()
            assert len(job.generated) == 6 or job.next_token in engine.eos
    finally:
        engine.close()
