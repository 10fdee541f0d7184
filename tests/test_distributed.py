"""Multi-process training on CPU (gloo): DDP and FSDP2 under torchrun give what one process gives."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import hybridtune as ht
from conftest import quiet, save_tiny_moe, write_config
from hybridtune.core.base_models import load_base
from hybridtune.training.recipe import train
from hybridtune.training.run_config import ConfigError, load_run_config
from hybridtune.training.tracking import read_metrics

pytestmark = pytest.mark.slow  # every test here starts processes under torchrun: the longest part of the suite

WEIGHTS = "hybridtune_model.safetensors"
EXAMPLES = Path(__file__).parents[1] / "examples"


def config(project, tiny_lm_dir, name, **changes):
    """The shared test run without dropout (masks are per process), four steps."""
    fsdp = changes.pop("fsdp", None)
    path = write_config(project, tiny_lm_dir, name, max_steps=4, save_every=2, **changes)
    raw = yaml.safe_load(path.read_text())
    raw["methods"]["lora"]["dropout"] = 0.0
    if fsdp is not None:
        raw["fsdp"] = fsdp
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def torchrun(*args, cwd, launcher=("torch.distributed.run", "--standalone", "--nproc_per_node", "2")):
    """Run under two processes; the timeout only guards against a hang (the first DeepSpeed run in a
    fresh venv also JIT-builds DeepSpeed's shared-memory op, which on 2 busy cores takes minutes)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, "-m", *launcher, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done.stdout


def assert_same_weights(a, b, atol=1e-5):
    first, second = load_file(a / WEIGHTS), load_file(b / WEIGHTS)
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], atol=atol, rtol=1e-4, msg=key)
    assert max(t.abs().max() for t in first.values()) > 1e-2  # they trained: equality is not trivial


def assert_loads_like(tiny_lm_dir, adapters, reference_adapters):
    """``adapters`` load into a plain single-process base and give ``reference_adapters``' logits."""
    model = ht.load(load_base(str(tiny_lm_dir))[0], adapters)
    reference = ht.load(load_base(str(tiny_lm_dir))[0], reference_adapters)
    ids = torch.tensor([[5, 9, 14, 3, 7]])
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.fixture
def single(project, tiny_lm_dir):
    """One process, global batch 8."""
    return train(load_run_config(config(project, tiny_lm_dir, "single.yaml", batch_size=8)), log=quiet)


EVAL_SHARE_SPY = """
import os, sys
import hybridtune.training.run_eval as run_eval
from hybridtune.cli import app
counts, sums = [], run_eval.loss_sums
def counted(model, encoded, *args):
    counts.append(len(encoded))
    return sums(model, encoded, *args)
run_eval.loss_sums = counted
try:
    app(["train", sys.argv[1]])
finally:
    open(f"eval-{os.environ['RANK']}.txt", "w").write(" ".join(map(str, counts)))
"""


def test_ddp_two_processes_equal_one_process_with_the_same_global_batch(project, tiny_lm_dir, single):
    """Training, and evaluation: each process evaluates half of the examples, and the eval loss
    and exact match of the whole set equal one process's."""
    path = config(project, tiny_lm_dir, "ddp.yaml", batch_size=4)
    driver = project / "driver.py"
    driver.write_text(textwrap.dedent(EVAL_SHARE_SPY))
    out = torchrun(str(driver), str(path), cwd=project)
    assert [(project / f"eval-{rank}.txt").read_text() for rank in (0, 1)] == ["3 3", "3 3"]  # 6 examples, twice
    run = project / "runs" / "ddp"
    evals = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "eval"]
    single_evals = [r for r in read_metrics(single.run_dir / "metrics.jsonl") if r["kind"] == "eval"]
    assert [r["when"] for r in evals] == ["before", "after"] == [r["when"] for r in single_evals]
    for ours, theirs in zip(evals, single_evals, strict=True):
        assert ours["eval_loss"] == pytest.approx(theirs["eval_loss"], rel=1e-5)
        assert ours["exact_match"] == theirs["exact_match"]
    assert_same_weights(single.adapters_dir, run / "adapters")
    assert out.count("adapters:") == 1  # one process reports; the other stays quiet
    records = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # written once, by rank 0
    single_losses = [r["loss"] for r in read_metrics(single.run_dir / "metrics.jsonl") if "loss" in r]
    assert [r["loss"] for r in records] == pytest.approx(single_losses, rel=1e-5)  # the global batch's loss


def test_nproc_runs_the_same_command_under_torchrun(project, tiny_lm_dir, single):
    """``hybridtune train --nproc 2`` is ``torchrun --standalone --nproc_per_node 2 -m hybridtune
    train``, overrides included: the adapters of one process with the same global batch, one report."""
    path = config(project, tiny_lm_dir, "nproc.yaml", batch_size=8)  # 2 x 4 rows with the override below
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "hybridtune", "train", str(path), "training.batch_size=4", "--nproc", "2"]
    done = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert_same_weights(single.adapters_dir, project / "runs" / "nproc" / "adapters")
    assert done.stdout.count("adapters:") == 1


def test_nproc_refuses_bad_counts_and_nested_launches(project, tiny_lm_dir, monkeypatch):
    from typer.testing import CliRunner

    from hybridtune.cli import app

    path = config(project, tiny_lm_dir, "nproc.yaml")
    bad = CliRunner().invoke(app, ["train", str(path), "--nproc", "0"])
    assert bad.exit_code == 2 and "--nproc: expected a number of processes (1 or more) or 'auto', got '0'" in bad.output
    monkeypatch.setenv("RANK", "0")
    nested = CliRunner().invoke(app, ["train", str(path), "--nproc", "2"])
    assert nested.exit_code == 2 and "already one process of a multi-process launch" in nested.output


def test_gradient_accumulation_equals_the_big_batch(project, tiny_lm_dir, single):
    """Micro-batches are weighted by their label tokens, so 2 x 4 rows train exactly like 8 rows."""
    path = config(project, tiny_lm_dir, "accum.yaml", batch_size=4, grad_accum=2)
    accumulated = train(load_run_config(path), log=quiet)
    assert_same_weights(single.adapters_dir, accumulated.adapters_dir)


FSDP_DRIVER = """
import sys
from hybridtune.training.recipe import TrainingInterrupted, train
from hybridtune.training.run_config import ConfigError, load_run_config
from hybridtune.training.tracking import read_metrics
try:
    train(load_run_config(sys.argv[1]), log=lambda *_: None, stop_after_step=int(sys.argv[2]))
except TrainingInterrupted:
    pass
"""


WEIGHT_LOADS_SPY = """
import os
import hybridtune.training.recipe as recipe
loads = []
def spy(load):
    def counted(*args, **kwargs):
        loads.append(load.__name__)
        return load(*args, **kwargs)
    return counted
recipe.load_base, recipe.load_skeleton = spy(recipe.load_base), spy(recipe.load_skeleton)
import atexit
atexit.register(lambda: open(f"loads-{os.environ['RANK']}.txt", "w").write(" ".join(loads)))
"""


@pytest.mark.parametrize("cpu_offload", [False, True])
def test_fsdp_trains_saves_resumes_and_loads(project, tiny_lm_dir, single, cpu_offload):
    """Only the first process loads the weights; the other builds the model on the meta device
    and receives its shards (and the buffers) from the first, before the eval before training."""
    fsdp = {"reshard_after_forward": True, "cpu_offload": cpu_offload}
    path = config(project, tiny_lm_dir, "fsdp.yaml", batch_size=4, fsdp=fsdp)
    driver = project / "driver.py"
    driver.write_text(textwrap.dedent(WEIGHT_LOADS_SPY) + textwrap.dedent(FSDP_DRIVER))
    torchrun(str(driver), str(path), "3", cwd=project)  # killed after step 3: checkpoint at step 2
    assert (project / "loads-0.txt").read_text() == "load_base"
    assert (project / "loads-1.txt").read_text() == "load_skeleton"
    run = project / "runs" / "fsdp"
    records = read_metrics(run / "metrics.jsonl")
    single_records = read_metrics(single.run_dir / "metrics.jsonl")
    assert records[0]["when"] == "before" and records[0]["eval_loss"] == pytest.approx(single_records[0]["eval_loss"])
    assert not (run / "adapters").exists() and (run / "checkpoints").is_dir()
    torchrun("-m", "hybridtune", "train", str(path), cwd=project)  # resumes at step 2, sharded moments
    assert_same_weights(single.adapters_dir, run / "adapters")
    # the gathered adapters load into a plain single-process model
    assert_loads_like(tiny_lm_dir, run / "adapters", single.adapters_dir)


FP16_DRIVER = f"""
import atexit, json, os, sys
sys.path.insert(0, {os.path.dirname(__file__)!r})
from conftest import enable_cpu_fp16
import hybridtune.training.recipe as recipe
scalers, steps = enable_cpu_fp16(init_scale=2.0**17), []
real_apply_step = recipe.apply_step
def apply_step(*args):
    applied = real_apply_step(*args)
    steps.append([applied, scalers[-1].get_scale()])
    return applied
recipe.apply_step = apply_step
atexit.register(lambda: open(f"steps-{{os.environ['RANK']}}.json", "w").write(json.dumps(steps)))
from hybridtune.cli import app
app(["train", sys.argv[1]])
"""


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_fp16_loss_scaling_on_two_processes(project, tiny_lm_dir, engine):
    """fp16 with loss scaling (accelerate's path switched on for the CPU, see conftest) on two
    processes: both take every skip decision and scale together (else their weights part; under
    FSDP each holds only its shards' gradients), the run trains, and what it logs is what they did.

    Not compared with one process: a process's share of the loss carries its share of the global
    batch, so its fp16 gradients are N times larger before averaging and overflow at a scale N
    times lower (as in any DDP fp16 run); the step where the scale settles may differ by one."""
    path = config(project, tiny_lm_dir, f"{engine}.yaml", batch_size=4, precision="fp16", log_every=1,
                  fsdp={"reshard_after_forward": True} if engine == "fsdp" else None)  # fmt: skip
    raw = yaml.safe_load(path.read_text())
    raw["training"]["max_steps"] = 6
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    driver = project / "driver.py"
    driver.write_text(FP16_DRIVER)
    torchrun(str(driver), str(path), cwd=project)

    first, second = (json.loads((project / f"steps-{rank}.json").read_text()) for rank in (0, 1))
    assert first == second and len(first) == 6
    assert not first[0][0] and any(applied for applied, _ in first), first  # skipped at first, then trains
    run = project / "runs" / engine
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "skipped"] == [i + 1 for i, (a, _) in enumerate(first) if not a]
    assert [r["loss_scale"] for r in records if r["kind"] == "train"] == [scale for _, scale in first]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
    model = ht.load(load_base(str(tiny_lm_dir))[0], run / "adapters")  # saved whole (gathered), loads, trained
    ids = torch.tensor([[5, 9, 14, 3, 7]])
    assert not torch.allclose(model(ids).logits, load_base(str(tiny_lm_dir))[0](ids).logits, atol=1e-3)


def test_fsdp_with_model_level_branches_and_checkpointing_equals_one_process(project, tiny_lm_dir):
    """Prompt and prefix tuning (weights on the root module, which FSDP shards last), IA3 on FFN
    inputs (an input hook), under gradient checkpointing and ``reshard_after_forward: false``
    (weights kept gathered between forward and backward): one process's adapters."""

    def mix(name, **changes):
        path = config(project, tiny_lm_dir, name, gradient_checkpointing=True, **changes)
        raw = yaml.safe_load(path.read_text())
        raw["methods"]["prompt"] = {"type": "prompt_tuning", "num_virtual_tokens": 3, "init": "vocab"}
        raw["methods"]["prefix"] = {"type": "prefix_tuning", "num_virtual_tokens": 2}
        raw["methods"]["ia3"] = {"type": "ia3", "targets": ["down_proj"], "feedforward": ["down_proj"]}
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path

    single = train(load_run_config(mix("single-mix.yaml", batch_size=8)), log=quiet)
    path = mix("fsdp-mix.yaml", batch_size=4, fsdp={"reshard_after_forward": False})
    torchrun("-m", "hybridtune", "train", str(path), cwd=project)
    assert_same_weights(single.adapters_dir, project / "runs" / "fsdp-mix" / "adapters")


def test_fsdp_from_accelerate_launch_is_the_yamls_fsdp(project, tiny_lm_dir, single):
    """``accelerate launch --use_fsdp`` instead of ``fsdp:`` in the YAML: hybridtune's own sharding
    with the launcher's offload and reshard settings (accelerate does not wrap the model as well),
    stopped and resumed, equal to one process."""
    path = config(project, tiny_lm_dir, "launched.yaml", batch_size=4)
    driver = project / "driver.py"
    driver.write_text(textwrap.dedent(WEIGHT_LOADS_SPY) + textwrap.dedent(FSDP_DRIVER))
    launch = ("accelerate.commands.launch", "--config_file", str(EXAMPLES / "scale" / "accelerate_fsdp.yaml"),
              "--fsdp_offload_params", "true", "--fsdp_reshard_after_forward", "false", "--num_processes", "2",
              "--mixed_precision", "no")  # the shipped example, with this machine's settings  # fmt: skip
    torchrun(str(driver), str(path), "3", cwd=project, launcher=launch)
    assert (project / "loads-1.txt").read_text() == "load_skeleton"  # sharded: the second process got its shards
    run = project / "runs" / "launched"
    assert yaml.safe_load((run / "config.yaml").read_text())["fsdp"] == {"reshard_after_forward": False,
                                                                       "cpu_offload": True}  # fmt: skip
    torchrun("-m", "hybridtune", "train", str(path), cwd=project, launcher=launch)
    assert_same_weights(single.adapters_dir, run / "adapters")


def test_launcher_fsdp_settings_and_refusals(project, tiny_lm_dir, monkeypatch):
    from hybridtune.training.launch import with_launcher_fsdp

    run = load_run_config(config(project, tiny_lm_dir, "twice.yaml", fsdp={}))
    assert with_launcher_fsdp(run) is run  # no launcher FSDP: the config as it is
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for flag, checkpointing in (("false", False), ("true", True)):
        monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", flag)
        adopted = with_launcher_fsdp(load_run_config(config(project, tiny_lm_dir, "plain.yaml")))
        assert adopted.fsdp is not None and adopted.training.gradient_checkpointing is checkpointing
    with pytest.raises(ConfigError, match="FSDP is set twice"):
        with_launcher_fsdp(run)
    for version, key, value, reshard in (("1", "FSDP_SHARDING_STRATEGY", "SHARD_GRAD_OP", False),
                                         ("1", "FSDP_SHARDING_STRATEGY", "1", True),
                                         ("2", "FSDP_RESHARD_AFTER_FORWARD", "false", False)):  # fmt: skip
        monkeypatch.setenv("FSDP_VERSION", version)
        monkeypatch.setenv(key, value)
        adopted = with_launcher_fsdp(load_run_config(config(project, tiny_lm_dir, "plain.yaml")))
        assert adopted.fsdp.reshard_after_forward is reshard, (version, value)
    monkeypatch.setenv("FSDP_VERSION", "1")
    monkeypatch.setenv("FSDP_SHARDING_STRATEGY", "NO_SHARD")
    with pytest.raises(ConfigError, match="--fsdp_sharding_strategy 'no_shard' is not one .* without --use_fsdp"):
        with_launcher_fsdp(load_run_config(config(project, tiny_lm_dir, "once.yaml")))
    monkeypatch.setenv("FSDP_SHARDING_STRATEGY", "FULL_SHARD")
    half = load_run_config(config(project, tiny_lm_dir, "half.yaml", base_dtype="bf16"))
    with pytest.raises(ConfigError, match="accelerate launch asks for FSDP: .*leave training.base_dtype"):
        with_launcher_fsdp(half)


def test_the_skeleton_has_the_loaded_models_parameters_tied_ones_included(tmp_path):
    """What FSDP's other processes build must be the first process's model without values: the
    same parameters, and tied embeddings one parameter in both (else the shards' collectives
    disagree: SmolLM2 aborted in gloo before this held)."""
    from conftest import save_tiny_lm
    from hybridtune.core.base_models import load_skeleton

    directory = save_tiny_lm(tmp_path / "tied", tied=True)
    loaded, skeleton = load_base(str(directory))[0], load_skeleton(str(directory))[0]
    assert [(n, p.shape) for n, p in skeleton.named_parameters()] == [
        (n, p.shape) for n, p in loaded.named_parameters()
    ]
    assert skeleton.lm_head.weight is skeleton.model.embed_tokens.weight and skeleton.lm_head.weight.is_meta
    assert all(not b.is_meta for b in skeleton.buffers())  # rotary frequencies are computed, not loaded


def deepspeed_config(project, tiny_lm_dir, name, zero, example=None, **changes):
    """``example``: a shipped DeepSpeed config of examples/scale instead of the bare stage."""
    path = config(project, tiny_lm_dir, name, **changes)
    raw = yaml.safe_load(path.read_text())
    raw["deepspeed"] = {"zero_optimization": {"stage": zero}, "train_micro_batch_size_per_gpu": "auto"}
    if example is not None:
        raw["deepspeed"] = str(EXAMPLES / "scale" / example)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.parametrize("zero", [1, 2])
def test_deepspeed_zero_trains_resumes_and_equals_one_process(project, tiny_lm_dir, single, zero):
    """DeepSpeed's engine on two CPU processes (gloo through its CPU accelerator): stopped after
    step 3, resumed from the step-2 checkpoint (each process's part of the ZeRO optimizer state),
    and the adapters equal the single-process run's."""
    pytest.importorskip("deepspeed")
    example = "ds_zero2.json" if zero == 2 else None  # the shipped one
    path = deepspeed_config(project, tiny_lm_dir, f"zero{zero}.yaml", zero, example, batch_size=2, grad_accum=2)
    driver = project / "driver.py"
    driver.write_text(textwrap.dedent(FSDP_DRIVER))
    torchrun(str(driver), str(path), "3", cwd=project)
    run = project / "runs" / f"zero{zero}"
    assert not (run / "adapters").exists()
    checkpoints = sorted((run / "checkpoints").iterdir())
    assert [c.name for c in checkpoints] == ["step-0000002"]  # no engine leftovers next to it
    assert (checkpoints[0] / "engine").is_dir() and not (checkpoints[0] / "optimizer.pt").exists()
    torchrun("-m", "hybridtune", "train", str(path), cwd=project)
    assert_same_weights(single.adapters_dir, run / "adapters")
    summary = yaml.safe_load((run / "summary.json").read_text())  # each process evaluated half: whole weights
    for when in ("before", "after"):
        assert summary[when]["eval_loss"] == pytest.approx(single.summary[when]["eval_loss"], rel=1e-5)


def test_deepspeed_from_accelerate_launch_trains_resumes_and_equals_one_process(project, tiny_lm_dir, single):
    """DeepSpeed asked for by ``accelerate launch --use_deepspeed`` instead of the YAML: the same
    engine, filled from the YAML the same way, stopped and resumed from its engine checkpoint."""
    pytest.importorskip("deepspeed")
    path = config(project, tiny_lm_dir, "launched.yaml", batch_size=2, grad_accum=2)
    driver = project / "driver.py"
    driver.write_text(textwrap.dedent(FSDP_DRIVER))
    launch = ("accelerate.commands.launch", "--use_deepspeed", "--zero_stage", "2", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no")  # fmt: skip
    torchrun(str(driver), str(path), "3", cwd=project, launcher=launch)
    run = project / "runs" / "launched"
    assert (run / "checkpoints" / "step-0000002" / "engine").is_dir()  # DeepSpeed's own files: it ran
    torchrun("-m", "hybridtune", "train", str(path), cwd=project, launcher=launch)
    assert_same_weights(single.adapters_dir, run / "adapters")


def test_deepspeed_given_twice_is_refused(project, tiny_lm_dir, monkeypatch):
    from hybridtune.training.run_config import ConfigError

    path = deepspeed_config(project, tiny_lm_dir, "twice.yaml", 2)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match="DeepSpeed is set twice, by the accelerate launch config and by the YAML"):
        train(load_run_config(path), log=quiet)


def test_a_quantized_base_under_the_launchers_deepspeed_is_refused(project, tiny_lm_dir, monkeypatch):
    """The YAML's own ``deepspeed:`` key with ``model_quantization`` is refused when the config is
    read; DeepSpeed asked for by ``accelerate launch`` is only known at run time."""
    from hybridtune.training.launch import environment_problems

    path = config(project, tiny_lm_dir, "quantized.yaml")
    run = load_run_config(path, ["model_quantization={bits: 4}"])
    assert not any("DeepSpeed" in p for p in environment_problems(run))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert any(
        "model_quantization is for one GPU per process (DDP); accelerate launch asks for DeepSpeed" in p
        for p in environment_problems(run)
    )


def staged_mix(project, tiny_lm_dir, name, deepspeed=None, **changes):
    """Every kind of branch hook: LoRA (with a growing rank), an adapter, IA3 on FFN inputs and
    prefix tuning (both read their weights in input hooks), trained in two stages of 3 steps."""
    path = config(project, tiny_lm_dir, name, **changes)
    raw = yaml.safe_load(path.read_text())
    raw["methods"]["ia3"] = {"type": "ia3", "targets": ["down_proj"], "feedforward": ["down_proj"]}
    raw["methods"]["prefix"] = {"type": "prefix_tuning", "num_virtual_tokens": 4}
    raw["methods"]["lora"]["r"] = {"start": 2, "max": 4, "grow_by": 2, "every_steps": 2}  # sized by numbers
    raw["training"].pop("max_steps")
    raw["stages"] = [
        {"name": "domain", "train": ["adapter", "ia3"], "max_steps": 3},
        {"name": "task", "train": ["lora", "prefix"], "max_steps": 3},
    ]
    if deepspeed is not None:
        raw["deepspeed"] = deepspeed
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


BASE_HELD_SPY = """
import os, sys
import hybridtune.training.recipe as recipe
load = recipe.load_base
def held(*args, **kwargs):
    base, tokenizer = load(*args, **kwargs)
    local = sum(getattr(p, "ds_tensor", p).numel() for p in base.parameters())
    full = sum(getattr(p, "ds_numel", p.numel()) for p in base.parameters())
    open(f"held-{os.environ['RANK']}.txt", "w").write(f"{local} {full}")
    return base, tokenizer
recipe.load_base = held
"""


def assert_base_loaded_partitioned(project):
    """Each process held about half of the base right after loading it (ZeRO-3 partitions it as it
    loads; before, each loaded it whole and the engine partitioned it later)."""
    for rank in (0, 1):
        local, full = map(int, (project / f"held-{rank}.txt").read_text().split())
        assert local <= full / 2 + 1000, (rank, local, full)  # rounding pads each weight's partitions


def test_deepspeed_zero3_partitions_everything_and_equals_one_process(project, tiny_lm_dir):
    """ZeRO-3 with every weight partitioned (no persistence threshold): the base is partitioned as
    it loads, saved adapters are gathered (not the empty local partitions), input hooks see
    gathered weights, a second stage makes a new engine on the partitioned model, and a run
    stopped in that stage resumes; adapters, the first stage's adapters and the eval before and
    after equal one process's."""
    pytest.importorskip("deepspeed")
    single = train(load_run_config(staged_mix(project, tiny_lm_dir, "staged.yaml", batch_size=8)), log=quiet)
    zero3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    path = staged_mix(project, tiny_lm_dir, "zero3.yaml", zero3, batch_size=2, grad_accum=2)
    driver = project / "driver.py"
    driver.write_text(textwrap.dedent(BASE_HELD_SPY) + textwrap.dedent(FSDP_DRIVER))
    torchrun(str(driver), str(path), "5", cwd=project)  # checkpoints at step 3 (stage end) and 4
    assert_base_loaded_partitioned(project)
    run = project / "runs" / "zero3"
    assert (run / "checkpoints" / "step-0000004-task" / "engine").is_dir()
    torchrun("-m", "hybridtune", "train", str(path), cwd=project)
    assert_same_weights(single.run_dir / "stages" / "domain", run / "stages" / "domain")
    assert_same_weights(single.adapters_dir, run / "adapters")
    summary = yaml.safe_load((run / "summary.json").read_text())
    for when in ("before", "after"):  # run on the engine's gathered weights, the whole set on every process
        assert summary[when]["eval_loss"] == pytest.approx(single.summary[when]["eval_loss"], rel=1e-5)


def test_deepspeed_zero3_initialises_from_partitioned_base_weights(project, tiny_lm_dir):
    """Branches whose initial values come from base weights, injected into a base that ZeRO-3
    partitioned as it loaded: DoRA's magnitudes (the base weight's norms) and prompt tuning's
    vocabulary init (rows of the embedding matrix) are read gathered; a parallel adapter and its
    sizes come from the full shapes. All three train, with gradient checkpointing, to one process's
    values, evaluated before training (on the engine's gathered weights) and after like one process."""
    pytest.importorskip("deepspeed")

    def mix(name, deepspeed=None, **changes):
        path = config(project, tiny_lm_dir, name, **changes)
        raw = yaml.safe_load(path.read_text())
        raw["methods"] = {
            "dora": {"type": "dora", "r": 4, "alpha": 8, "targets": ["q_proj", "v_proj", "down_proj"]},
            "prompt": {"type": "prompt_tuning", "num_virtual_tokens": 3, "init": "vocab"},
            "parallel": {"type": "parallel_adapter", "after": "mlp", "bottleneck_size": 8},
        }
        if deepspeed is not None:
            raw["deepspeed"] = deepspeed
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path

    single = train(load_run_config(mix("single-init.yaml", batch_size=8, gradient_checkpointing=True)), log=quiet)
    zero3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    path = mix("zero3-init.yaml", zero3, batch_size=4, gradient_checkpointing=True)
    driver = project / "driver.py"
    driver.write_text(textwrap.dedent(BASE_HELD_SPY) + "from hybridtune.cli import app\napp(['train', sys.argv[1]])\n")
    torchrun(str(driver), str(path), cwd=project)
    assert_base_loaded_partitioned(project)
    run = project / "runs" / "zero3-init"
    assert {key.split(".")[0] for key in load_file(run / "adapters" / WEIGHTS)} == {"dora", "prompt", "parallel"}
    assert_same_weights(single.adapters_dir, run / "adapters")
    # the checkpoint describes the targets by their full shapes: it loads into a plain model
    assert_loads_like(tiny_lm_dir, run / "adapters", single.adapters_dir)
    summary = yaml.safe_load((run / "summary.json").read_text())
    for when in ("before", "after"):
        assert summary[when]["eval_loss"] == pytest.approx(single.summary[when]["eval_loss"], rel=1e-5)


def engine_fp32_weights(checkpoint):
    """DeepSpeed's own fp32 reconstruction (zero_to_fp32) of the weights a checkpoint's engine
    trains, by adapter key."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    weights = get_fp32_state_dict_from_zero_checkpoint(
        str(checkpoint / "engine"), tag="state", exclude_frozen_parameters=True
    )
    by_key = {}
    for name, tensor in weights.items():
        if not tensor.is_floating_point():  # buffers come along (a growing rank's current value)
            continue
        target, branch = name.removeprefix("base_model.").split(".hybridtune.")
        entry, weight = branch.split(".", 1)
        by_key[f"{entry}.{target}.{weight}"] = tensor
    return by_key


@pytest.mark.parametrize("zero", [2, 3])
def test_deepspeed_bf16_saves_the_fp32_master_weights(project, tiny_lm_dir, zero):
    """DeepSpeed's bf16 mode casts the model to bf16 and keeps fp32 masters of what it trains:
    checkpoints hold those masters exactly (not the bf16 copies), and entries a later stage keeps
    frozen are saved as the bf16 values that stage computed with, in fp32."""
    pytest.importorskip("deepspeed")
    ds = {"zero_optimization": {"stage": zero, "stage3_param_persistence_threshold": 0}}
    path = staged_mix(project, tiny_lm_dir, f"bf16z{zero}.yaml", ds, batch_size=2, precision="bf16")
    driver = project / "driver.py"
    driver.write_text(textwrap.dedent(FSDP_DRIVER))
    torchrun(str(driver), str(path), "3", cwd=project)
    run = project / "runs" / f"bf16z{zero}"
    checkpoint = run / "checkpoints" / "step-0000002-domain"
    saved, masters = load_file(checkpoint / "adapters" / WEIGHTS), engine_fp32_weights(checkpoint)
    assert masters and {k.split(".")[0] for k in masters} == {"adapter", "ia3"}  # what stage "domain" trains
    for key, master in masters.items():
        assert saved[key].dtype == torch.float32 and torch.equal(saved[key], master), key
    assert any(not torch.equal(t, t.bfloat16().float()) for t in masters.values())  # more than bf16 holds
    torchrun("-m", "hybridtune", "train", str(path), cwd=project)
    domain, final = load_file(run / "stages" / "domain" / WEIGHTS), load_file(run / "adapters" / WEIGHTS)
    assert {t.dtype for t in final.values() if t.is_floating_point()} == {torch.float32}
    for key in masters:  # frozen during stage "task", which computed with their bf16 copies
        assert torch.equal(final[key], domain[key].bfloat16().float()), key
    summary = yaml.safe_load((run / "summary.json").read_text())
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]


def test_deepspeed_config_takes_the_yaml_values_and_names_conflicts(project, tiny_lm_dir):
    from hybridtune.training.launch import deepspeed_config as filled
    from hybridtune.training.run_config import ConfigError

    path = deepspeed_config(project, tiny_lm_dir, "ds.yaml", 2, batch_size=4, grad_accum=2)
    run = load_run_config(path)
    ds = filled(run, processes=2)
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 16 and ds["zero_optimization"] == {"stage": 2}
    run.deepspeed["gradient_accumulation_steps"] = 8
    with pytest.raises(ConfigError, match="'gradient_accumulation_steps' is 8 in the DeepSpeed config, but the YAML"):
        filled(run, processes=2)
    run.deepspeed = {"zero_optimization": {"stage": 4}}
    with pytest.raises(ConfigError, match=r"zero_optimization.stage 4 is not a ZeRO stage; use 0, 1, 2 or 3"):
        filled(run, processes=1)
    run.deepspeed = {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}  # the YAML says fp32 here
    with pytest.raises(ConfigError, match=r"'bf16.enabled' is True in the DeepSpeed config, but training.precision"):
        filled(run, processes=1)
    run.training.precision = "bf16"
    assert filled(run, processes=1)["bf16"] == {"enabled": True}
    run.deepspeed = {"zero_optimization": {"stage": 0}}
    with pytest.raises(ConfigError, match="ZeRO stage 0 in bf16 keeps its fp32 master weights where they cannot"):
        filled(run, processes=1)


def test_deepspeed_zero3_trains_expert_and_router_lora_like_one_process(project, tmp_path):
    """LoRA on an MoE model's router and fused expert tensors under ZeRO-3 with every weight
    partitioned: the targets are found by their full shapes, the factors (read by the experts'
    own forward, never called) are gathered with their target, and training equals one process."""
    pytest.importorskip("deepspeed")
    moe = save_tiny_moe(tmp_path / "moe")

    def moe_run(name, deepspeed=None, **changes):
        path = config(project, moe, name, **changes)
        raw = yaml.safe_load(path.read_text())
        targets = ["q_proj", "mlp.gate", "experts.gate_up_proj", "experts.down_proj"]
        raw["methods"] = {"lora": {"type": "lora", "r": 4, "alpha": 8, "targets": targets}}
        if deepspeed is not None:
            raw["deepspeed"] = deepspeed
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path

    single = train(load_run_config(moe_run("single-moe.yaml", batch_size=8)), log=quiet)
    zero3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    torchrun("-m", "hybridtune", "train", str(moe_run("zero3-moe.yaml", zero3, batch_size=4)), cwd=project)
    run = project / "runs" / "zero3-moe"
    assert_same_weights(single.adapters_dir, run / "adapters")
    assert_loads_like(moe, run / "adapters", single.adapters_dir)
