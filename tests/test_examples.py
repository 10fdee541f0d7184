"""The shipped examples stay true: the Python tour runs, every example run YAML validates, the
DeepSpeed configs fill from the YAML."""

import runpy
from pathlib import Path

import pytest

from hybridtune.training.run_config import load_run_config

EXAMPLES = Path(__file__).parents[1] / "examples"


def test_beyond_one_adapter_tour_runs(capsys):
    runpy.run_path(str(EXAMPLES / "beyond_one_adapter.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "sets after merging: ['medical', 'legal', 'general', 'blend', 'blend_r4']" in out
    assert "rank at step 25: {'lora': 6}" in out


RUN_CONFIGS = sorted(
    p for p in EXAMPLES.glob("*/*.yaml") if not p.name.startswith("accelerate_")
)  # not launcher configs


@pytest.mark.parametrize("config", RUN_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_example_configs_validate(config):
    load_run_config(config)


@pytest.mark.parametrize("name", ["ds_zero2.json", "ds_zero3.json"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_example_deepspeed_configs_take_the_yamls_settings(name, precision):
    """Every "auto" in the shipped DeepSpeed configs is one the recipe fills from the YAML (the
    ZeRO-2 one also trains in tests/test_distributed.py, the FSDP accelerate config there too)."""
    from hybridtune.training.launch import deepspeed_config

    overrides = [f"deepspeed={EXAMPLES / 'scale' / name}", f"training.precision={precision}"]
    config = load_run_config(EXAMPLES / "sentiment" / "config.yaml", overrides)
    filled = deepspeed_config(config, processes=2)
    t = config.training
    assert filled["train_micro_batch_size_per_gpu"] == t.batch_size
    assert filled["train_batch_size"] == t.batch_size * t.grad_accum * 2
    assert filled["gradient_clipping"] == t.max_grad_norm
    assert filled["zero_optimization"]["stage"] == int(name[len("ds_zero")])
    assert {key for key, value in filled.items() if value == "auto"} == set()
    assert [filled[half]["enabled"] for half in ("bf16", "fp16")] == ["auto", "auto"]  # accelerate's to fill
