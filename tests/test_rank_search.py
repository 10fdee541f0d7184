"""Automatic rank search: budget parsing, the greedy allocation, and the CLI end to end."""

import pytest
import yaml
from typer.testing import CliRunner

from conftest import write_config
from hybridtune.cli import app
from hybridtune.training.rank_search import ModuleSpectrum, allocate, parse_budget, uniform_rank
from hybridtune.training.run_config import ConfigError, load_run_config


def test_parse_budget():
    assert parse_budget("0.5%", 1_000_000) == 5000
    assert parse_budget(0.01, 1_000_000) == 10000
    assert parse_budget("2500", 1_000_000) == 2500
    with pytest.raises(ConfigError, match="expected like 0.5%"):
        parse_budget("half", 10)


def test_allocation_follows_energy_per_parameter_within_budget():
    modules = [
        ModuleSpectrum("lora", "a", cost=10, energy=[9.0, 8.0, 7.0, 6.0]),
        ModuleSpectrum("lora", "b", cost=10, energy=[5.0, 0.1, 0.01, 0.001]),
        ModuleSpectrum("lora", "c", cost=20, energy=[9.0, 8.5, 0.2, 0.1]),  # costly: 8.5/20 < 6/10
    ]
    ranks = allocate(modules, budget=10 + 10 + 20 + 30)["lora"]
    assert ranks == {"a": 4, "b": 1, "c": 1}
    assert allocate(modules, budget=10 + 10 + 20 + 50)["lora"] == {"a": 4, "b": 1, "c": 2}
    assert uniform_rank(modules, 80) == 2
    with pytest.raises(ConfigError, match="below rank 1 on every module"):
        allocate(modules, budget=30)


def test_search_rank_command_writes_a_valid_config(project, tiny_lm_dir):
    path = write_config(project, tiny_lm_dir)
    raw = yaml.safe_load(path.read_text())
    raw["methods"]["lora"]["targets"] = "all-linear"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    result = CliRunner().invoke(app, ["search-rank", str(path), "--budget", "20%", "--probe-steps", "3",
                                      "--probe-rank", "8"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "lora: 14 modules" in result.output
    searched = load_run_config(project / "run.searched.yaml")
    lora = searched.methods["lora"]
    ranks = [lora.rank_for(f"model.layers.{i}.{m}") for i in range(2)
             for m in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                       "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]]  # fmt: skip
    assert min(ranks) >= 1 and max(ranks) <= 8 and len(set(ranks)) > 1
    adapter = searched.methods["adapter"]
    assert adapter.bottleneck_size == 8  # other entries are carried over unchanged
