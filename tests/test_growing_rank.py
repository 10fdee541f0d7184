"""LoRA whose rank grows during training: same function at growth, optimizer state kept, resumable."""

import json

import pytest
import torch
import yaml
from pydantic import ValidationError

import hybridtune as ht
from conftest import make_model
from hybridtune.methods.lora import RankSchedule


def growing(**schedule):
    schedule = {"start": 2, "max": 6, "grow_by": 2, "every_steps": 3, **schedule}
    return ht.HybridConfig(methods={"lora": ht.LoRAConfig(r=schedule, alpha=4, targets=["q_proj", "v_proj"])})


def test_schedule_values_and_validation():
    s = RankSchedule(start=4, max=10, grow_by=4, every_steps=5)
    assert [s.rank_at(step, 0) for step in (0, 4, 5, 10, 15, 100)] == [4, 4, 8, 10, 10, 10]
    assert RankSchedule(start=1, max=3, grow_by=1, every_epochs=0.5).rank_at(0, 1.2) == 3
    with pytest.raises(ValidationError, match="exactly one of every_steps and every_epochs"):
        RankSchedule(start=1, max=3, grow_by=1)
    with pytest.raises(ValidationError, match="cannot be combined with rank_pattern"):
        ht.LoRAConfig(r={"start": 1, "max": 2, "grow_by": 1, "every_steps": 1}, targets="q_proj",
                      rank_pattern={"q_proj": 2})  # fmt: skip


def test_growth_keeps_the_function_and_the_optimizer_state(input_ids):
    model = ht.inject(make_model("llama", initializer_range=0.2), growing())
    branch = model.base_model.model.layers[0].self_attn.q_proj.hybridtune["lora"]
    assert branch.rank == 2 and branch.capacity == 6 and branch.scale == 2.0
    opt = torch.optim.AdamW(model.parameters_to_train(), lr=1e-2)
    losses = []
    for step in range(1, 13):
        loss = model(input_ids, labels=input_ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        with torch.no_grad():
            before = model(input_ids).logits
        state = {k: v.clone() for k, v in opt.state[branch.lora_A].items()}
        rank_before = branch.rank
        model.update_rank_schedules(step, 0.0)
        if branch.rank != rank_before:  # a growth step
            with torch.no_grad():  # zero new columns: equal up to matmul summation order
                torch.testing.assert_close(model(input_ids).logits, before, atol=1e-5, rtol=1e-5)
            assert opt.state[branch.lora_A]["exp_avg"] is not None
            for key, value in state.items():
                assert torch.equal(opt.state[branch.lora_A][key], value), key  # nothing reset or moved
            assert torch.count_nonzero(branch.lora_B[:, rank_before:]) == 0
    assert branch.rank == 6
    assert torch.count_nonzero(branch.lora_B[:, 4:6]) > 0  # the last directions trained after growing
    assert losses[-1] < losses[0]


def test_saved_adapters_record_the_current_rank(tmp_path, input_ids):
    model = ht.inject(make_model(), growing())
    model.update_rank_schedules(3, 0.0)
    with torch.no_grad():
        for p in model.parameters_to_train():
            p.normal_(0, 0.1)
    model.save_adapters(tmp_path)
    loaded = ht.load(make_model(), tmp_path)
    ranks = {b.rank for _, _, _, b in loaded.branches()}
    assert ranks == {4}
    torch.testing.assert_close(loaded(input_ids).logits, model(input_ids).logits, atol=0, rtol=0)


def test_resume_mid_schedule_matches_an_uninterrupted_run(tmp_path, tiny_lm_dir):
    from hybridtune.training.recipe import TrainingInterrupted, train
    from hybridtune.training.run_config import load_run_config

    rows = [{"instruction": f"what color is the {t}?", "output": c} for t, c in
            [("sky", "blue"), ("grass", "green"), ("snow", "white"), ("coal", "black"), ("sun", "yellow")]]  # fmt: skip
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 4))

    def config(name):
        raw = {"model": str(tiny_lm_dir), "data": {"train": "train.jsonl", "eval_split": 0.2},
               "methods": {"lora": {"type": "lora", "r": {"start": 2, "max": 8, "grow_by": 2, "every_steps": 3},
                                    "targets": ["q_proj", "v_proj"], "dropout": 0.1}},
               "training": {"batch_size": 4, "lr": 1e-2, "max_steps": 10, "save_every": 2, "seed": 1},
               "eval": {"metric": "none"}, "output": str(tmp_path / name)}  # fmt: skip
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return load_run_config(path)

    quiet = lambda *a, **k: None  # noqa: E731
    straight = train(config("a"), log=quiet)
    with pytest.raises(TrainingInterrupted):
        train(config("b"), log=quiet, stop_after_step=5)  # checkpoint at 4, at rank 4; stopped at rank 6
    resumed = train(config("b"), log=quiet)
    assert resumed.summary["final_train_loss"] == straight.summary["final_train_loss"]
    assert resumed.summary["after"] == straight.summary["after"]
    ranks = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lora"] for r in ranks if r["kind"] == "rank"] == [4, 6, 8]
