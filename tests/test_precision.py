"""Precision and quantized bases on a CPU machine: half-precision bases with fp32 branches, fp16
with loss scaling (accelerate's GPU path switched on for the CPU), and the clear refusals (a
quantized base without CUDA, fp16 without CUDA, merging into quantized weights)."""

import itertools
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

import hybridtune as ht
from conftest import enable_cpu_fp16, make_model, quiet, set_keys, write_config
from hybridtune.core.errors import MergeError, TargetError
from hybridtune.core.quantization import QuantizationConfig, is_quantized, prepare_for_kbit_training
from hybridtune.training.recipe import TrainingInterrupted, train
from hybridtune.training.run_config import ConfigError, load_run_config
from hybridtune.training.tracking import read_metrics

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without CUDA says")


def test_quantized_base_without_cuda_fails_before_loading(project, tiny_lm_dir):
    path = set_keys(write_config(project, tiny_lm_dir), model_quantization={"bits": 4, "type": "nf4"})
    config = load_run_config(path)
    config.model = str(project / "no-such-model")  # proves nothing is loaded: that would fail differently
    with pytest.raises(ConfigError, match="bitsandbytes, which needs a CUDA GPU"):
        train(config, log=quiet)
    assert not (project / "runs" / "run").exists()


def test_fp16_without_cuda_is_refused_with_the_alternatives(project, tiny_lm_dir):
    config = load_run_config(write_config(project, tiny_lm_dir, precision="fp16"))
    with pytest.raises(ConfigError, match="training.precision: fp16 .* use bf16 or fp32"):
        train(config, log=quiet)


@pytest.mark.parametrize(
    ("top", "message"),
    [
        ({"model_quantization": {"bits": 3}}, "model_quantization.bits"),
        ({"model_quantization": {"type": "int4"}}, "model_quantization.type"),
        ({"fsdp": {}, "deepspeed": {"zero_optimization": {"stage": 2}}}, "either 'fsdp' or 'deepspeed'"),
        ({"fsdp": {}, "model_quantization": {"bits": 4}}, "cannot be sharded"),
        ({"fsdp": {"wrap": "size"}}, "fsdp: unknown key 'wrap'"),
        ({"fsdp": {}, "training": {"base_dtype": "bf16"}}, "leave training.base_dtype at auto"),
    ],
)
def test_engine_sections_are_validated(project, tiny_lm_dir, top, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config(set_keys(write_config(project, tiny_lm_dir), **top))


def test_deepspeed_needs_its_package(project, tiny_lm_dir, monkeypatch):
    """Without deepspeed installed (simulated: it is a test dependency) the run stops before loading."""
    import importlib.util

    path = set_keys(write_config(project, tiny_lm_dir), deepspeed={"zero_optimization": {"stage": 2}})
    find_spec = importlib.util.find_spec
    hidden = lambda name, *rest: None if name == "deepspeed" else find_spec(name, *rest)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", hidden)
    with pytest.raises(ConfigError, match=r'pip install "hybridtune\[deepspeed\]"'):
        train(load_run_config(path), log=quiet)


def test_bnb_config_follows_the_yaml():
    four = QuantizationConfig(bits=4, type="fp4", double_quant=False, compute_dtype="fp16").bnb_config()
    assert four.load_in_4bit and four.bnb_4bit_quant_type == "fp4" and not four.bnb_4bit_use_double_quant
    assert four.bnb_4bit_compute_dtype == torch.float16
    assert QuantizationConfig(bits=8).bnb_config().load_in_8bit


def test_half_precision_base_trains_fp32_branches_and_saves_them_in_fp32(project, tiny_lm_dir):
    path = write_config(project, tiny_lm_dir, max_steps=6, precision="bf16", base_dtype="bf16")
    result = train(load_run_config(path), log=quiet)
    weights = load_file(result.adapters_dir / "hybridtune_model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}
    assert result.summary["after"]["eval_loss"] < result.summary["before"]["eval_loss"]


def small_quantized_model():
    """The tiny Llama with q_proj's weight stored as int8 (what bitsandbytes' 8-bit layers hold)."""
    model = make_model("llama")
    layer = model.model.layers[0].self_attn.q_proj
    layer.weight = nn.Parameter(torch.zeros_like(layer.weight, dtype=torch.int8), requires_grad=False)
    return model, layer


def test_merge_into_a_quantized_weight_is_refused_by_name():
    model, layer = small_quantized_model()
    assert is_quantized(layer) and not is_quantized(model.model.layers[0].self_attn.k_proj)
    hybrid = ht.inject(model, {"methods": {"lora": {"type": "lora", "r": 2, "targets": ["q_proj", "v_proj"]}}})
    for action in (hybrid.merge, hybrid.bake):
        with pytest.raises(MergeError, match=r"'lora' into 'model.layers.0.self_attn.q_proj'.*quantized"):
            action()
    assert not any(b.merged for *_, b in hybrid.branches())  # refused before touching any weight


def test_dora_on_a_quantized_layer_is_refused():
    model, _ = small_quantized_model()
    with pytest.raises(TargetError, match="DoRA needs the column norms of 'model.layers.0.self_attn.q_proj'"):
        ht.inject(model, {"methods": {"dora": {"type": "dora", "r": 2, "targets": ["q_proj"]}}})


def test_prepare_for_kbit_training_freezes_and_keeps_norms_in_fp32():
    model = make_model("llama").to(torch.bfloat16)
    prepare_for_kbit_training(model)
    assert not any(p.requires_grad for p in model.parameters())
    for name, param in model.named_parameters():
        expected = torch.float32 if "norm" in name else torch.bfloat16
        assert param.dtype == expected, name
    hybrid = ht.inject(model, {"methods": {"lora": {"type": "lora", "r": 2, "targets": ["q_proj"]}}})
    hybrid.cast_branches(torch.float32)
    out = hybrid(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]]))  # no autocast needed
    assert out.logits.dtype == torch.bfloat16  # fp32 norms hand the compute dtype on
    out.loss.backward()
    assert all(p.grad is not None and p.dtype == torch.float32 for p in hybrid.parameters_to_train())


@pytest.fixture
def fp16_on_cpu(monkeypatch):
    """The scaler starts too high for fp16 (the first steps overflow and are skipped) and grows every
    other step, so its state matters and differs from a fresh one's at any checkpoint."""
    return enable_cpu_fp16(monkeypatch.setattr, init_scale=2.0**22)


def test_fp16_trains_with_loss_scaling_and_resumes_at_the_same_scale(project, tiny_lm_dir, fp16_on_cpu):
    """An fp16 base with fp32 branches under autocast + loss scaling (what a GPU run does): the
    overflowing steps are skipped and recorded, the loss falls, weights are saved in fp32, and a
    run stopped and resumed continues with the scale it had (not a fresh one), ending equal."""
    keys = {"precision": "fp16", "base_dtype": "fp16", "max_steps": 10, "save_every": 5, "log_every": 1}
    straight = train(load_run_config(write_config(project, tiny_lm_dir, "a.yaml", **keys)), log=quiet)
    records = read_metrics(straight.run_dir / "metrics.jsonl")
    skipped = [r["step"] for r in records if r["kind"] == "skipped"]
    scales = [r["loss_scale"] for r in records if r["kind"] == "train"]
    backing_off = next(i for i in range(1, 11) if i not in skipped) - 1  # the first steps overflow, halving the scale
    assert backing_off >= 3 and len(skipped) < 10, skipped
    assert scales[:backing_off] == [2.0 ** (21 - i) for i in range(backing_off)]
    assert any(b > a for a, b in itertools.pairwise(scales)), scales  # and it grows again
    assert straight.summary["after"]["eval_loss"] < straight.summary["before"]["eval_loss"]
    assert straight.summary["skipped_steps"] == len(skipped)
    weights = load_file(straight.adapters_dir / "hybridtune_model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}

    cut = write_config(project, tiny_lm_dir, "b.yaml", **keys)
    with pytest.raises(TrainingInterrupted):
        train(load_run_config(cut), log=quiet, stop_after_step=7)  # checkpoint at 5
    resumed = train(load_run_config(cut), log=quiet)
    assert [r["loss_scale"] for r in read_metrics(resumed.run_dir / "metrics.jsonl") if r["kind"] == "train"] == scales
    assert fp16_on_cpu[-1].get_scale() == fp16_on_cpu[0].get_scale()
    assert resumed.summary["after"] == straight.summary["after"]
    again = load_file(resumed.adapters_dir / "hybridtune_model.safetensors")
    assert all(torch.equal(again[k], weights[k]) for k in weights)


def test_deepspeed_fp16_loss_scale_is_read_from_its_zero_optimizers():
    """DeepSpeed's fp16 needs a GPU (or a CPU with fp16 kernels), so this reads the attributes the
    recipe uses off DeepSpeed's own classes and runs the recipe's reader on a stand-in engine."""
    from types import SimpleNamespace

    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from hybridtune.training.recipe import Run

    assert callable(DeepSpeedEngine.fp16_enabled)
    assert isinstance(DeepSpeedZeroOptimizer.loss_scale, property)
    assert isinstance(DeepSpeedZeroOptimizer_Stage3.loss_scale, property)
    run = Run.__new__(Run)
    run.accelerator, run.deepspeed = SimpleNamespace(scaler=None), True
    engine = SimpleNamespace(fp16_enabled=lambda: True, optimizer=SimpleNamespace(loss_scale=1024))
    assert run._loss_scale(engine) == 1024.0
    assert run._loss_scale(SimpleNamespace(fp16_enabled=lambda: False)) is None  # bf16: nothing scales


@pytest.mark.parametrize(
    ("cuda", "bf16_units", "expected"),
    [(False, False, "no"), (True, True, "bf16"), (True, False, "fp16")],
)
def test_auto_precision_follows_the_hardware(project, tiny_lm_dir, monkeypatch, cuda, bf16_units, expected):
    """``auto``: bf16 where the GPU has bf16 units, fp16 with loss scaling on older GPUs (where torch
    would emulate bf16, slowly), full precision on the CPU; a quantized base's compute dtype wins."""
    from hybridtune.training.launch import mixed_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(
        torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16_units or including_emulation
    )
    config = load_run_config(write_config(project, tiny_lm_dir))
    assert mixed_precision(config) == expected
    config = load_run_config(set_keys(write_config(project, tiny_lm_dir), model_quantization={"compute_dtype": "fp16"}))
    assert mixed_precision(config) == "fp16"


def test_every_method_trains_in_fp16_with_gradient_checkpointing(project, tiny_lm_dir, monkeypatch):
    """All the branch kinds in one model on an fp16 base, computing in fp16 under loss scaling, with
    gradient checkpointing (prefix tuning's cache, DoRA's norms, IA3 on FFN inputs, prompt tuning's
    embeddings): finite losses, no overflow at a sane scale, and the eval loss falls."""
    enable_cpu_fp16(monkeypatch.setattr, init_scale=2.0**10)
    keys = {"precision": "fp16", "base_dtype": "fp16", "max_steps": 8, "gradient_checkpointing": True}
    path = write_config(project, tiny_lm_dir, **keys)
    raw = yaml.safe_load(path.read_text())
    raw["methods"] = {
        "dora": {"type": "dora", "r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]},
        "ia3": {"type": "ia3", "targets": ["k_proj", "down_proj"], "feedforward": ["down_proj"]},
        "prompt": {"type": "prompt_tuning", "num_virtual_tokens": 3, "init": "vocab"},
        "prefix": {"type": "prefix_tuning", "num_virtual_tokens": 2},
        "parallel": {"type": "parallel_adapter", "after": "mlp", "bottleneck_size": 8},
        "adapter": {"type": "adapter", "after": "self_attn", "bottleneck_size": 8},
        "lora": {"type": "lora", "r": 4, "alpha": 8, "targets": ["o_proj", "up_proj"]},
    }
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    result = train(load_run_config(path), log=quiet)
    records = read_metrics(result.run_dir / "metrics.jsonl")
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 8 and all(math.isfinite(loss) for loss in losses)
    assert not [r for r in records if r["kind"] == "skipped"] and "skipped_steps" not in result.summary
    assert result.summary["after"]["eval_loss"] < result.summary["before"]["eval_loss"] - 1


def test_the_report_says_how_many_steps_fp16_skipped(capsys, tmp_path):
    from types import SimpleNamespace

    from hybridtune.cli import _report

    summary = {"steps": 10, "train_seconds": 1.5, "adapters": "a", "after": {"eval_loss": 1.0}, "skipped_steps": 3}
    result = SimpleNamespace(summary=summary, generations=[], generations_before=[], run_dir=tmp_path)
    _report(result, show=0)
    assert "trained 10 steps in 1.5 s (3 skipped for fp16 overflow)" in capsys.readouterr().out
    _report(SimpleNamespace(**{**vars(result), "summary": {**summary, "skipped_steps": 0}}), show=0)
    assert "trained 10 steps in 1.5 s\n" in capsys.readouterr().out


def test_the_launchers_mixed_precision_is_auto_s_choice_and_must_agree(project, tiny_lm_dir, monkeypatch):
    """``accelerate launch --mixed_precision bf16`` decides ``precision: auto``; an explicit YAML
    precision that disagrees is an error naming both (its "no" is the launcher's default: no choice)."""
    from hybridtune.training.launch import environment_problems, mixed_precision

    auto = load_run_config(write_config(project, tiny_lm_dir))
    fp32 = load_run_config(write_config(project, tiny_lm_dir, "fp32.yaml", precision="fp32"))
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert mixed_precision(auto) == "no" and not environment_problems(fp32)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert mixed_precision(auto) == "bf16" and not environment_problems(auto)
    assert environment_problems(fp32) == [
        "training.precision: fp32, but accelerate launch asks for --mixed_precision bf16; make them agree "
        "(or leave training.precision at auto)"
    ]
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    assert environment_problems(auto) == [
        "accelerate launch --mixed_precision fp16 needs a CUDA GPU; use bf16 or no on this machine"
    ]
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    assert "hybridtune trains in fp32, bf16 or fp16" in environment_problems(auto)[0]
