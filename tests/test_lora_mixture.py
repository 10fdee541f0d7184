"""Multi-task LoRA mixture: hard routing by task id, soft gates, mixed task batches."""

import pytest
import torch

import hybridtune as ht
from conftest import make_model, randomize

TOL = dict(atol=1e-5, rtol=1e-5)
TARGETS = ["q_proj", "v_proj", "down_proj"]


def mixture(**kwargs):
    cfg = {"tasks": ["sentiment", "colors", "format"], "r": 4, "alpha": 8, "targets": TARGETS, **kwargs}
    return ht.inject(make_model(), ht.HybridConfig(methods={"mix": ht.LoRAMixtureConfig(**cfg)}))


def test_identity_at_init_and_config_errors(input_ids):
    expected = make_model()(input_ids).logits
    model = mixture()
    torch.testing.assert_close(model(input_ids, task_ids=[0, 2]).logits, expected, atol=0, rtol=0)
    with pytest.raises(ValueError, match="list the task names in 'tasks'"):
        ht.LoRAMixtureConfig(experts=2, targets="q_proj")
    with pytest.raises(ValueError, match="give 'experts' \\(how many\\) or 'tasks'"):
        ht.LoRAMixtureConfig(mode="soft", targets="q_proj")
    with pytest.raises(ValueError, match="needs task_ids"):
        model(input_ids)
    with pytest.raises(ValueError, match="task_ids must be in 0..2"):
        model(input_ids, task_ids=[0, 3])


@pytest.mark.parametrize("task", [0, 1, 2])
def test_hard_mode_row_equals_a_plain_lora_with_that_experts_weights(task, input_ids):
    model = randomize(mixture())
    plain = ht.inject(make_model(), ht.HybridConfig(methods={"lora": ht.LoRAConfig(r=4, alpha=8, targets=TARGETS)}))
    mix = {name: b for _, name, _, b in model.branches()}
    with torch.no_grad():
        for _, name, _, branch in plain.branches():
            branch.lora_A.copy_(mix[name].lora_A[task])
            branch.lora_B.copy_(mix[name].lora_B[task])
    got = model(input_ids, task_ids=torch.tensor([task, task])).logits
    torch.testing.assert_close(got, plain(input_ids).logits, **TOL)


def test_mixed_task_batch_equals_each_row_alone(input_ids):
    model = randomize(mixture())
    ids = torch.cat([input_ids, input_ids.flip(0)])
    tasks = [2, 0, 1, 2]
    mixed = model(ids, task_ids=tasks).logits
    for row, task in enumerate(tasks):
        alone = model(ids[row : row + 1], task_ids=[task]).logits
        torch.testing.assert_close(mixed[row], alone[0], **TOL)
    out = model.generate(ids[:2], task_ids=[1, 0], max_new_tokens=3, do_sample=False)
    for row, task in enumerate([1, 0]):
        alone = model.generate(ids[row : row + 1], task_ids=[task], max_new_tokens=3, do_sample=False)
        assert torch.equal(out[row], alone[0])


@pytest.mark.parametrize("gate", ["token", "global"])
def test_soft_mode_gradients_reach_the_gate(gate, input_ids):
    model = randomize(mixture(mode="soft", gate=gate, tasks=None, experts=3))
    model(input_ids, labels=input_ids).loss.backward()
    gate_params = [p for n, p in model.named_parameters() if "router" in n or "gate_logits" in n]
    assert gate_params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in gate_params)


def test_soft_token_mixture_matches_hand_computation():
    model = randomize(mixture(mode="soft", tasks=None, experts=3))
    layer = model.base_model.model.layers[0].self_attn.q_proj
    branch = layer.hybridtune["mix"]
    x = torch.randn(2, 3, 32)
    weights = torch.softmax(x @ branch.router.weight.T + branch.router.bias, dim=-1)
    expected = x @ layer.weight.T + sum(weights[..., k : k + 1] * branch.expert_delta(x, k) for k in range(3))
    torch.testing.assert_close(layer(x), expected, **TOL)


def test_training_from_yaml_with_task_fields(tmp_path, tiny_lm_dir):
    import json

    import yaml

    from hybridtune.training.recipe import train
    from hybridtune.training.run_config import ConfigError, load_run_config

    colors = [
        {"instruction": f"what color is the {t}?", "output": c, "task": "colors"}
        for t, c in [("sky", "blue"), ("grass", "green"), ("snow", "white"), ("coal", "black")]
    ]
    movies = [
        {"instruction": f"classify: the film is {w}", "output": lab, "task": "movies"}
        for w, lab in [("great", "positive"), ("awful", "negative"), ("good", "positive"), ("bad", "negative")]
    ]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (colors + movies) * 3))
    raw = {"model": str(tiny_lm_dir), "data": {"train": "train.jsonl", "eval": "train.jsonl"},
           "methods": {"mix": {"type": "lora_mixture", "tasks": ["colors", "movies"], "r": 4,
                               "targets": ["q_proj", "v_proj", "down_proj"]}},
           "training": {"batch_size": 4, "lr": 2e-2, "max_steps": 12}, "eval": {"max_new_tokens": 2, "max_samples": 8},
           "output": str(tmp_path / "run")}  # fmt: skip
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    result = train(load_run_config(tmp_path / "run.yaml"), log=lambda *a: None)
    assert result.summary["after"]["eval_loss"] < 0.7 * result.summary["before"]["eval_loss"]

    (tmp_path / "bad.jsonl").write_text(json.dumps({**colors[0], "task": "cooking"}) + "\n")
    raw["data"] = {"train": "bad.jsonl"}
    raw["output"] = str(tmp_path / "run2")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(
        ConfigError, match="an example has task 'cooking'; the mixture's tasks are \\['colors', 'movies'\\]"
    ):
        train(load_run_config(tmp_path / "run.yaml"), log=lambda *a: None)
