"""The shipped examples stay true: the Python tour runs, every example YAML validates."""

import runpy
from pathlib import Path

import pytest

from hybridtune.run_config import load_run_config

EXAMPLES = Path(__file__).parents[1] / "examples"


def test_beyond_one_adapter_tour_runs(capsys):
    runpy.run_path(str(EXAMPLES / "beyond_one_adapter.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "sets after merging: ['medical', 'legal', 'general', 'blend', 'blend_r4']" in out
    assert "rank at step 25: {'lora': 6}" in out


@pytest.mark.parametrize("config", sorted(EXAMPLES.glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_example_configs_validate(config):
    load_run_config(config)
