"""A LLaMA-Factory training YAML, pasted as its users write it (examples/train_lora/*_lora_sft.yaml's
keys), runs with `hybridtune train` with the same hyperparameters, LLaMA-Factory's defaults where a
key is absent; keys without an equivalent are refused once each, with what to do."""

import json

import pytest
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from hybridtune.cli import app
from hybridtune.training.run_config import ConfigError, load_run_config


def lf_yaml(tiny_lm_dir, **changes):
    config = {
        "model_name_or_path": str(tiny_lm_dir), "trust_remote_code": True,
        "stage": "sft", "do_train": True, "finetuning_type": "lora", "lora_rank": 4, "lora_target": "all",
        "dataset": "colors,chat", "template": "qwen", "cutoff_len": 64, "max_samples": 1000,
        "overwrite_cache": True, "preprocessing_num_workers": 16, "dataloader_num_workers": 4,
        "output_dir": "saves/tiny/lora/sft", "logging_steps": 1, "save_steps": 2, "plot_loss": True,
        "overwrite_output_dir": True, "save_only_model": False, "report_to": "none",
        "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "learning_rate": 1.0e-2,
        "num_train_epochs": 3.0, "lr_scheduler_type": "cosine", "warmup_ratio": 0.1, "bf16": False,
        "ddp_timeout": 180000000, "resume_from_checkpoint": None, "max_steps": 4,
        "val_size": 0.2, "per_device_eval_batch_size": 4, "eval_strategy": "steps", "eval_steps": 2,
    }  # fmt: skip
    config.update(changes)
    return {k: v for k, v in config.items() if v != "DROP"}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """LLaMA-Factory's layout: the YAML under examples/, data/ with dataset_info.json, run from the root."""
    (tmp_path / "data").mkdir()
    (tmp_path / "examples").mkdir()
    colors = [{"instruction": f"what color is the {t}?", "input": "", "output": c}
              for t, c in {"sky": "blue", "grass": "green", "snow": "white", "coal": "black"}.items()]  # fmt: skip
    (tmp_path / "data" / "colors.json").write_text(json.dumps(colors * 4))
    chat = [{"conversations": [{"from": "human", "value": "say red"}, {"from": "gpt", "value": "red"}]}] * 4
    (tmp_path / "data" / "chat.json").write_text(json.dumps(chat))
    info = {"colors": {"file_name": "colors.json"}, "chat": {"file_name": "chat.json", "formatting": "sharegpt"}}
    (tmp_path / "data" / "dataset_info.json").write_text(json.dumps(info))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(path, config):
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_a_pasted_llamafactory_yaml_trains_with_its_settings_plus_an_adapter(workdir, tiny_lm_dir):
    path = write(workdir / "examples" / "tiny_lora_sft.yaml", lf_yaml(tiny_lm_dir, adapter_after="mlp"))
    config = load_run_config(path)
    lora, adapter = config.methods["lora"], config.methods["adapter"]
    assert (lora.type, lora.r, lora.alpha, lora.targets, lora.dropout) == ("lora", 4, 8, ["all-linear"], 0.0)
    assert adapter.type == "adapter" and adapter.after == ["mlp"]
    t, d = config.training, config.data
    assert (t.batch_size, t.grad_accum, t.lr, t.epochs, t.max_steps, t.scheduler, t.warmup_ratio) == (
        4, 2, 1e-2, 3.0, 4, "cosine", 0.1)  # fmt: skip
    assert (t.seed, t.save_every, t.eval_every, t.log_every, t.precision, t.gradient_checkpointing) == (
        42, 2, 2, 1, "fp32", True)  # fmt: skip
    assert (d.dataset, d.dataset_dir, d.max_length, d.max_samples, d.eval_split) == (
        ["colors", "chat"], workdir / "data", 64, 1000, 0.2)  # fmt: skip
    assert config.output.resolve() == workdir / "saves" / "tiny" / "lora" / "sft"  # from the current directory
    assert config.eval.metric == "none" and config.eval.batch_size == 4

    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 0, result.output
    assert "LLaMA-Factory config: read as: model_name_or_path -> model, dataset -> data.dataset" in result.output
    assert "method entries lora (lora), adapter (adapter) from adapter_after, lora_rank, lora_target" in result.output
    assert "template: 'qwen' -> the tokenizer's own chat template" in result.output
    assert "no effect on what hybridtune computes: dataloader_num_workers, ddp_timeout, do_train, eval_strategy" in (
        result.output
    )
    weights = load_file(workdir / "saves" / "tiny" / "lora" / "sft" / "adapters" / "hybridtune_model.safetensors")
    assert {k.split(".")[0] for k in weights} == {"lora", "adapter"}  # saved per entry
    assert any(k.startswith("lora.") and k.endswith("mlp.gate_proj.lora_A") for k in weights)  # all-linear


def test_llamafactory_defaults_fill_what_the_yaml_leaves_out(workdir, tiny_lm_dir):
    minimal = {"model_name_or_path": str(tiny_lm_dir), "stage": "sft", "finetuning_type": "lora",
               "dataset": "colors", "output_dir": "out"}  # fmt: skip
    config = load_run_config(write(workdir / "min.yaml", minimal))
    t, lora = config.training, config.methods["lora"]
    assert (t.lr, t.epochs, t.batch_size, t.grad_accum, t.scheduler, t.seed, t.gradient_checkpointing) == (
        5e-5, 3.0, 8, 1, "linear", 42, True)  # fmt: skip
    assert (lora.r, lora.alpha, lora.dropout, lora.targets) == (8, 16, 0.0, ["all-linear"])
    assert config.data.max_length == 2048 and config.data.eval_split is None
    assert "lora_target not given: LLaMA-Factory's default 'all'" in config.notes
    dora = load_run_config(write(workdir / "dora.yaml", {**minimal, "use_dora": True, "lora_alpha": 4,
                                                         "disable_gradient_checkpointing": True, "neat_packing": True,
                                                         "enable_liger_kernel": True,
                                                         "use_unsloth_gc": True}))  # fmt: skip
    assert dora.methods["lora"].type == "dora" and dora.methods["lora"].alpha == 4
    assert dora.training.liger_kernels is True and config.training.liger_kernels is False
    assert dora.training.gradient_checkpointing is False and dora.data.packing is True  # neat_packing: ours
    # Unsloth's checkpointing: offloaded layer inputs; without checkpointing LLaMA-Factory ignores it
    assert dora.training.offload_activations is False and config.training.offload_activations is False
    assert "use_unsloth_gc: true has no effect with disable_gradient_checkpointing: true (LLaMA-Factory)" in dora.notes
    unsloth = load_run_config(write(workdir / "unsloth.yaml", {**minimal, "use_unsloth_gc": True}))
    assert unsloth.training.gradient_checkpointing is True and unsloth.training.offload_activations is True


def test_keys_without_an_equivalent_are_listed_once_each_with_what_to_do(workdir, tiny_lm_dir):
    config = lf_yaml(tiny_lm_dir, stage="dpo", loraplus_lr_ratio=16.0, warmup_steps=10, some_new_key=1)
    result = CliRunner().invoke(app, ["validate", str(write(workdir / "bad.yaml", config))])
    assert result.exit_code == 2
    out = result.output
    assert "(a LLaMA-Factory config) has 4 problem(s)" in out, out
    for line in ["stage: 'dpo': hybridtune trains supervised fine-tuning (stage: sft) only",
                 "loraplus_lr_ratio: 16.0: LoRA+ learning rates are not supported",
                 "warmup_steps: 10: give warmup_ratio instead",
                 "some_new_key: a LLaMA-Factory key with no equivalent in hybridtune; remove it"]:  # fmt: skip
        assert out.count(line) == 1, out
    assert "valid keys" not in out  # no list of hybridtune's keys repeated per key


def test_convert_writes_the_equivalent_hybridtune_yaml(workdir, tiny_lm_dir):
    path = write(workdir / "examples" / "tiny_lora_sft.yaml", lf_yaml(tiny_lm_dir, adapter_after="mlp"))
    out = workdir / "examples" / "tiny.hybridtune.yaml"
    result = CliRunner().invoke(app, ["convert", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    written = yaml.safe_load(out.read_text())
    assert written["data"]["dataset_dir"] == "../data" and "methods" in written  # relative to the new file
    ours, theirs = load_run_config(out), load_run_config(path)
    assert ours.data.dataset_dir.resolve() == theirs.data.dataset_dir.resolve() == workdir / "data"
    ours.data.dataset_dir = theirs.data.dataset_dir
    assert ours.model_dump() == theirs.model_dump()
    not_lf = CliRunner().invoke(app, ["convert", str(out)])
    assert not_lf.exit_code == 2 and "not a LLaMA-Factory config" in not_lf.output
    with pytest.raises(ConfigError):
        load_run_config(write(workdir / "x.yaml", lf_yaml(tiny_lm_dir, finetuning_type="full")))
