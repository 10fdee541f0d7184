"""The training recipe and the CLI verbs, end to end on a tiny model saved to disk."""

import copy
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from accelerate.utils import set_seed
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import hybridtune as ht
from conftest import quiet, write_config
from hybridtune.cli import app
from hybridtune.core.base_models import load_base
from hybridtune.core.chunked_loss import resolve_loss_kernel
from hybridtune.training.data import render_prompt
from hybridtune.training.evaluation import generate_batch
from hybridtune.training.recipe import TrainingInterrupted, train
from hybridtune.training.run_config import ConfigError, load_run_config
from hybridtune.training.tracking import read_metrics


def test_train_lowers_loss_and_writes_the_run_directory(project, tiny_lm_dir):
    config = load_run_config(write_config(project, tiny_lm_dir, **{"max_steps": 20, "keep_checkpoints": 2}))
    result = train(config, log=quiet)
    s = result.summary
    assert s["after"]["eval_loss"] < 0.6 * s["before"]["eval_loss"]
    assert 0 <= s["before"]["exact_match"] <= 1 and s["steps"] == 20
    run = result.run_dir
    names = {p.name for p in run.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "loss_curve.png", "summary.json", "adapters", "stages"} <= names
    assert len(list((run / "checkpoints").iterdir())) == 2  # keep_checkpoints
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["kind"] == "train"]
    assert train_steps == list(range(1, 21))
    assert all({"loss", "lr", "tokens_per_s"} <= set(r) for r in records if r["kind"] == "train")
    from datetime import datetime

    times = [datetime.fromisoformat(r["time"]) for r in records]  # every record: when, and since when
    assert times == sorted(times) and all(r["elapsed_s"] >= 0 for r in records)
    trains = [r for r in records if r["kind"] == "train"]
    assert [r["remaining_steps"] for r in trains] == list(range(19, -1, -1))
    assert "eta_s" not in trains[0] and all(r["eta_s"] >= 0 for r in trains[1:]) and trains[-1]["eta_s"] == 0
    assert (run / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    final, last_stage = run / "adapters" / "hybridtune_model.safetensors", run / "stages" / "train"
    assert final.stat().st_ino == (last_stage / "hybridtune_model.safetensors").stat().st_ino  # stored once
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    ht.load(base, result.adapters_dir)  # the saved adapters load on the base they were trained on


def test_stages_change_only_their_own_entries(project, tiny_lm_dir):
    path = write_config(project, tiny_lm_dir)
    raw = yaml.safe_load(path.read_text())
    raw["stages"] = [{"name": "domain", "train": ["adapter"], "max_steps": 4, "lr": 3e-3},
                     {"name": "task", "train": ["lora"], "max_steps": 4, "lr": 1e-2}]  # fmt: skip
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    config = load_run_config(path)
    set_seed(config.training.seed)  # what the recipe does before it injects: the same initial weights
    initial = ht.inject(load_base(config.model)[0], config.hybrid_config())
    start = {f"{e}.{t}.{n}": v.clone() for e, t, _, b in initial.branches() for n, v in b.state_dict().items()}

    result = train(config, log=quiet)
    domain = load_file(result.run_dir / "stages" / "domain" / "hybridtune_model.safetensors")
    task = load_file(result.run_dir / "stages" / "task" / "hybridtune_model.safetensors")
    assert domain.keys() == task.keys() == start.keys()
    for key in start:
        if key.startswith("lora."):
            assert torch.equal(domain[key], start[key]), key  # frozen during "domain"
        else:
            assert torch.equal(task[key], domain[key]), key  # frozen during "task"
    assert any(not torch.equal(domain[k], start[k]) for k in start if k.startswith("adapter."))
    assert any(not torch.equal(task[k], domain[k]) for k in start if k.startswith("lora."))
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records if r["kind"] == "stage_start"] == ["domain", "task"]


def test_resume_after_an_interruption_reaches_the_same_result(project, tiny_lm_dir):
    straight = train(load_run_config(write_config(project, tiny_lm_dir, "a.yaml")), log=quiet)
    cut_path = write_config(project, tiny_lm_dir, "b.yaml")
    with pytest.raises(TrainingInterrupted):
        train(load_run_config(cut_path), log=quiet, stop_after_step=7)  # checkpoint at 6, one step lost
    resumed = train(load_run_config(cut_path), log=quiet)
    for key in ("after", "final_train_loss", "steps"):
        assert resumed.summary[key] == straight.summary[key], key
    a = load_file(straight.adapters_dir / "hybridtune_model.safetensors")
    b = load_file(resumed.adapters_dir / "hybridtune_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_finished_run_made_longer_continues_from_its_last_step(project, tiny_lm_dir):
    """max_steps raised on a finished run: it continues from its last checkpoint (optimizer and
    data position included), reaching what an uninterrupted longer run reaches (a constant LR,
    whose schedule does not depend on the length)."""
    straight = train(load_run_config(write_config(project, tiny_lm_dir, "a.yaml", max_steps=9, scheduler="constant")),
                     log=quiet)  # fmt: skip
    path = write_config(project, tiny_lm_dir, "b.yaml", max_steps=5, scheduler="constant")
    first = train(load_run_config(path), log=quiet)
    assert first.summary["steps"] == 5
    longer = load_run_config(path, ["training.max_steps=9"])
    extended = train(longer, log=quiet)
    assert extended.summary["steps"] == 9 and extended.summary["before"] == first.summary["before"]
    a = load_file(straight.adapters_dir / "hybridtune_model.safetensors")
    b = load_file(extended.adapters_dir / "hybridtune_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in read_metrics(extended.run_dir / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == list(range(1, 10))  # no step twice, none missing
    for change in (["training.max_steps=7"], ["training.max_steps=12", "training.lr=0.5"]):
        with pytest.raises(ConfigError, match="holds a run with a different config"):
            train(load_run_config(path, change), log=quiet)  # shorter, or something else changed too


def test_from_checkpoint_resumes_a_run_from_a_chosen_checkpoint(project, tiny_lm_dir):
    path = write_config(project, tiny_lm_dir)  # 12 steps, a checkpoint every 3, the last 2 kept
    first = train(load_run_config(path), log=quiet)
    checkpoints = project / "runs" / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-0000009", "step-0000012"]
    with pytest.raises(ConfigError, match=r"is not a checkpoint of .* \(it has: step-0000009, step-0000012\)"):
        train(load_run_config(path), log=quiet, from_checkpoint=project / "nope")
    result = CliRunner().invoke(app, ["train", str(path), "--from-checkpoint", str(checkpoints / "step-0000009")])
    assert result.exit_code == 0, result.output
    assert "resuming from" in result.output and "step 9" in result.output
    again = load_file(first.adapters_dir / "hybridtune_model.safetensors")
    before = load_file(checkpoints / "superseded" / next(iter(os.listdir(checkpoints / "superseded"))) / "adapters"
                       / "hybridtune_model.safetensors")  # fmt: skip
    assert all(torch.equal(again[k], before[k]) for k in again)  # step 12 again, exactly; the old one kept
    steps = [r["step"] for r in read_metrics(first.run_dir / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == list(range(1, 13))


@pytest.mark.slow
def test_resume_after_a_real_kill(project, tiny_lm_dir):
    """SIGKILL a `hybridtune train` process once its first checkpoint exists, run it again, and
    compare with an uninterrupted run of the same config."""
    straight = train(load_run_config(write_config(project, tiny_lm_dir, "a.yaml", max_steps=60, save_every=2)),
                     log=quiet)  # fmt: skip
    path = write_config(project, tiny_lm_dir, "b.yaml", max_steps=60, save_every=2)
    run_dir = project / "runs" / "b"
    cmd = [sys.executable, "-m", "hybridtune", "train", str(path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "checkpoints").is_dir() and any(
            p.name.startswith("step-") for p in (run_dir / "checkpoints").iterdir()
        ):
            break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "summary.json").exists(), "the run finished before it could be killed"
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("after", "final_train_loss", "steps"):
        assert summary[key] == straight.summary[key], key


def test_cli_train_eval_generate_merge_export(project, tiny_lm_dir, tmp_path):
    runner = CliRunner()
    path = write_config(project, tiny_lm_dir, max_steps=15)
    result = runner.invoke(app, ["train", str(path), "training.lr=2e-2"])
    assert result.exit_code == 0, result.output
    assert "exact_match: " in result.output and "eval_loss: " in result.output and "-> " in result.output
    assert "adapters:" in result.output and "loss curve:" in result.output
    adapters = project / "runs" / "run" / "adapters"

    again = runner.invoke(app, ["train", str(path), "training.lr=2e-2"])
    assert again.exit_code == 2 and "holds a finished run" in again.output
    other = runner.invoke(app, ["train", str(path), "training.lr=1e-3"])
    assert other.exit_code == 2 and "different config (differs in: training)" in other.output

    result = runner.invoke(app, ["eval", str(path), "--adapters", str(adapters)])
    assert result.exit_code == 0, result.output
    summary = json.loads((project / "runs" / "run" / "summary.json").read_text())
    expected = resolve_loss_kernel("auto", torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    assert summary["loss_kernel"] == expected  # auto: the torch kernel on the CPU
    lines = dict(re.findall(r"^(\w+): ([-\d.e]+)$", result.output, flags=re.M))
    assert "eval_loss" in lines, result.output
    assert float(lines["eval_loss"]) == pytest.approx(summary["after"]["eval_loss"], rel=1e-4)
    assert float(lines["exact_match"]) == pytest.approx(summary["after"]["exact_match"])

    result = runner.invoke(app, ["generate", "--adapters", str(adapters), "--max-new-tokens", "3",
                                 "what color is the sky?"])  # fmt: skip
    assert result.exit_code == 0, result.output
    hybrid, tok = load_trained_for_test(adapters, tiny_lm_dir)
    messages = [{"role": "user", "content": "what color is the sky?"}]
    (expected_text,) = generate_batch(hybrid, tok, [render_prompt(tok, messages)], max_new_tokens=3)
    assert result.output.strip() == expected_text.strip()

    merged = runner.invoke(app, ["merge", "--adapters", str(adapters), "--out", str(tmp_path / "m")])
    assert merged.exit_code == 2 and "not mergeable" in merged.output and "--keep-adapters" in merged.output
    kept = runner.invoke(app, ["merge", "--adapters", str(adapters), "--out", str(tmp_path / "k"), "--keep-adapters"])
    assert kept.exit_code == 0, kept.output
    hybrid, _ = load_trained_for_test(adapters, tiny_lm_dir)
    ids = torch.tensor([[1, 5, 9, 20, 33]])
    expected = hybrid(ids).logits
    merged_base = AutoModelForCausalLM.from_pretrained(tmp_path / "k" / "base")
    rest = ht.load(merged_base, tmp_path / "k" / "adapters")
    assert list(rest.entries) == ["adapter"]
    torch.testing.assert_close(rest(ids).logits, expected, atol=1e-5, rtol=1e-5)

    refused = runner.invoke(app, ["export", "--adapters", str(adapters), "--format", "peft", "--out",
                                  str(tmp_path / "p")])  # fmt: skip
    assert refused.exit_code == 2 and "'adapter' (adapter) have no equivalent in peft's format" in refused.output
    assert "--only lora" in refused.output and not (tmp_path / "p").exists()
    peft_out = runner.invoke(app, ["export", "--adapters", str(adapters), "--format", "peft", "--out",
                                   str(tmp_path / "p"), "--only", "lora"])  # fmt: skip
    assert (
        peft_out.exit_code == 0 and "left out as asked, so it computes less than the hybrid: adapter" in peft_out.output
    )
    assert (tmp_path / "p" / "adapter_config.json").is_file()


def test_cli_merge_of_a_lora_only_run(project, tiny_lm_dir, tmp_path):
    path = write_config(project, tiny_lm_dir, max_steps=3)
    raw = yaml.safe_load(path.read_text())
    del raw["methods"]["adapter"]
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    runner = CliRunner()
    assert runner.invoke(app, ["train", str(path)]).exit_code == 0
    adapters = project / "runs" / "run" / "adapters"
    result = runner.invoke(app, ["export", "--adapters", str(adapters), "--format", "merged", "--out",
                                 str(tmp_path / "plain")])  # fmt: skip
    assert result.exit_code == 0, result.output
    hybrid, _ = load_trained_for_test(adapters, tiny_lm_dir)
    ids = torch.tensor([[1, 5, 9, 20, 33]])
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    torch.testing.assert_close(plain(ids).logits, hybrid(ids).logits, atol=1e-5, rtol=1e-5)


def load_trained_for_test(adapters, tiny_lm_dir):
    from hybridtune.training.trained_sets import load_trained

    model, tok = load_trained(adapters)
    model.eval()
    return model, tok


def test_gradient_checkpointing_option_gives_the_same_run(project, tiny_lm_dir):
    plain = train(load_run_config(write_config(project, tiny_lm_dir, "a.yaml", max_steps=3)), log=quiet)
    other = write_config(project, tiny_lm_dir, "b.yaml", max_steps=3, gradient_checkpointing=True)
    result = train(load_run_config(other), log=quiet)
    assert result.summary["final_train_loss"] == pytest.approx(plain.summary["final_train_loss"], rel=1e-5)
    assert result.summary["after"]["eval_loss"] == pytest.approx(plain.summary["after"]["eval_loss"], rel=1e-5)


@pytest.mark.slow
def test_compile_option_trains(project, tiny_lm_dir):
    """torch.compile on CPU (about a minute of compiling); dropout off, since compiled dropout draws
    its masks differently."""
    configs = []
    for name, compile_ in [("a.yaml", False), ("b.yaml", True)]:
        path = write_config(project, tiny_lm_dir, name, max_steps=3, compile=compile_)
        raw = yaml.safe_load(path.read_text())
        raw["methods"]["lora"]["dropout"] = 0.0
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        configs.append(load_run_config(path))
    plain, compiled = (train(c, log=quiet) for c in configs)
    assert compiled.summary["final_train_loss"] == pytest.approx(plain.summary["final_train_loss"], rel=1e-4)


def test_generate_interactive(project, tiny_lm_dir):
    runner = CliRunner()
    path = write_config(project, tiny_lm_dir, max_steps=2)
    assert runner.invoke(app, ["train", str(path)]).exit_code == 0
    adapters = project / "runs" / "run" / "adapters"
    result = runner.invoke(app, ["generate", "--adapters", str(adapters), "-i", "--max-new-tokens", "2"],
                           input="what color is the sky?\nand the grass?\n\n")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.output.count("> ") == 3  # two questions answered, then the empty line ends the chat


def test_bf16_mixed_precision_trains_on_cpu(project, tiny_lm_dir):
    result = train(load_run_config(write_config(project, tiny_lm_dir, max_steps=3, precision="bf16")), log=quiet)
    assert result.summary["steps"] == 3 and result.summary["final_train_loss"] < 10


def test_stop_file_stops_cleanly_with_a_checkpoint_and_the_run_resumes(project, tiny_lm_dir):
    import threading

    from hybridtune.training.checkpoints import list_checkpoints, read_position
    from hybridtune.training.recipe import STOP_FILE, TrainingStopped

    config = load_run_config(write_config(project, tiny_lm_dir, max_steps=300, save_every=1000))
    run_dir = project / "runs" / "run"

    def stop_at_step_3():
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.is_file() and '"step": 3' in metrics.read_text()):
            time.sleep(0.005)
        (run_dir / STOP_FILE).touch()

    watcher = threading.Thread(target=stop_at_step_3)
    watcher.start()
    with pytest.raises(TrainingStopped) as stopped:
        train(config, log=quiet)
    watcher.join()
    assert 3 <= stopped.value.step < 300
    assert read_position(list_checkpoints(run_dir)[-1]).global_step == stopped.value.step  # saved at the stop
    assert not (run_dir / "summary.json").exists()
    assert not (run_dir / STOP_FILE).exists()  # the stop was served
    result = train(config, log=quiet)  # the same config resumes
    assert result.summary["steps"] == 300


def test_an_fp16_overflow_skips_the_update_and_holds_the_schedule():
    """accelerate's optimizer with a real GradScaler (torch's CPU one): an inf gradient skips the
    update and halves the scale, and the schedule waits; the next finite step applies both."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from transformers import get_scheduler

    from hybridtune.training.recipe import apply_step

    Accelerator()  # the process state accelerate's optimizer reads
    weight = torch.nn.Parameter(torch.ones(3))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    optimizer = AcceleratedOptimizer(torch.optim.AdamW([weight], lr=0.1), device_placement=False, scaler=scaler)
    scheduler = get_scheduler("linear", optimizer.optimizer, num_warmup_steps=0, num_training_steps=10)
    lr = scheduler.get_last_lr()[0]

    scaler.scale((weight * torch.tensor([float("inf"), 1.0, 1.0])).sum()).backward()
    assert apply_step(optimizer, scheduler) is False
    assert torch.equal(weight.detach(), torch.ones(3)) and weight.grad is None  # untouched, gradients cleared
    assert scheduler.get_last_lr()[0] == lr and scaler.get_scale() == 512.0

    scaler.scale(weight.sum()).backward()
    assert apply_step(optimizer, scheduler) is True
    assert (weight.detach() < 1).all() and scheduler.get_last_lr()[0] < lr


def test_what_counts_as_making_a_run_longer():
    from hybridtune.training.run_dir import extends

    base = {"model": "m", "training": {"max_steps": 10, "epochs": 1}}
    longer = {"model": "m", "training": {"max_steps": 20, "epochs": 1}}
    assert extends(base, longer) and not extends(longer, base)
    assert not extends(base, {"model": "x", "training": {"max_steps": 20, "epochs": 1}})  # something else too
    by_epochs = {"model": "m", "training": {"epochs": 3}}
    assert extends({"model": "m", "training": {"epochs": 2}}, by_epochs)
    assert not extends(by_epochs, {"model": "m", "training": {"epochs": 3, "max_steps": 100}})  # may be shorter
    staged = {
        "model": "m",
        "training": {"epochs": 1},
        "stages": [{"name": "a", "max_steps": 5}, {"name": "b", "max_steps": 5}],
    }
    longer_last = copy.deepcopy(staged)
    longer_last["stages"][-1]["max_steps"] = 9
    assert extends(staged, longer_last)
    first_longer = copy.deepcopy(staged)
    first_longer["stages"][0]["max_steps"] = 9
    assert not extends(staged, first_longer)  # an earlier stage: not a continuation
    no_effect = copy.deepcopy(staged)
    no_effect["training"]["epochs"] = 5  # with stages, training.epochs trains nothing
    assert not extends(staged, no_effect)


def test_a_run_saved_by_an_earlier_version_still_resumes(project, tiny_lm_dir):
    from hybridtune.training.run_dir import check_run_dir

    config = load_run_config(write_config(project, tiny_lm_dir))
    old = config.dump()
    old["data"]["train"] = old["data"]["train"][0]  # one file as a string, new keys absent
    for key in ("eval_dataset", "dataset"):
        old["data"].pop(key)
    old["training"].pop("chunked_loss")
    run_dir = project / "runs" / "old"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(old))
    assert check_run_dir(run_dir, config, overwrite=False) is False  # no checkpoint yet, but no refusal
    with pytest.raises(ConfigError, match="--overwrite deletes the run that --from-checkpoint resumes"):
        check_run_dir(run_dir, config, overwrite=True, from_checkpoint=run_dir / "checkpoints" / "x")
    assert (run_dir / "config.yaml").is_file()  # nothing was deleted
