"""The run YAML: every bad config gets its own message, and `validate` lists them all at once."""

import json
import re

import pytest
import yaml
from typer.testing import CliRunner

from hybridtune.cli import app
from hybridtune.training.run_config import ConfigError, load_run_config


@pytest.fixture
def project(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"instruction": "say red", "output": "red"}) + "\n")
    return tmp_path


def write_config(project, **changes):
    config = {
        "model": "smollm2-135m",
        "methods": {"lora": {"type": "lora", "r": 4, "targets": ["q_proj"]}, "adapter": {"type": "adapter"}},
        "data": {"train": "train.jsonl"},
        "stages": [{"name": "a", "train": ["adapter"]}, {"name": "b", "train": "lora", "lr": "3e-4"}],
        "training": {"lr": "1e-4", "batch_size": 2},
    }
    for key, value in changes.items():
        node = config
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        if value is None:
            del node[last]
        else:
            node[last] = value
    path = project / "run.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def problems(path, overrides=()):
    with pytest.raises(ConfigError) as info:
        load_run_config(path, list(overrides))
    return "\n".join(info.value.problems)


def test_good_config_parses_numbers_and_resolves_data_paths(project):
    config = load_run_config(write_config(project))
    assert config.training.lr == 1e-4 and isinstance(config.training.lr, float)
    assert config.stages[1].lr == 3e-4 and config.stages[1].train == ["lora"]
    assert config.data.train == [project / "train.jsonl"]
    assert [s.name for s in config.stage_list()] == ["a", "b"]
    config = load_run_config(write_config(project, stages=None), ["training.lr=2e-3", "training.max_steps=5"])
    assert config.training.lr == 2e-3 and config.stage_list()[0].train == ["lora", "adapter"]


def test_paths_in_the_file_follow_the_file_and_paths_on_the_command_line_the_current_directory(project, monkeypatch):
    """``hybridtune train configs/run.yaml data.eval=my_eval.jsonl`` means ./my_eval.jsonl, as any
    command-line tool would; the file's own ``data.train: train.jsonl`` stays next to the file."""
    (project / "configs").mkdir()
    path = write_config(project, **{"data.train": "../train.jsonl"}).rename(project / "configs" / "run.yaml")
    cwd = project / "work"
    cwd.mkdir()
    (cwd / "my_eval.jsonl").write_text((project / "train.jsonl").read_text())
    (cwd / "ds.json").write_text("{}")
    monkeypatch.chdir(cwd)
    config = load_run_config(path, ["data.eval=my_eval.jsonl", "deepspeed=ds.json"])
    assert [p.resolve() for p in config.data.train] == [project / "train.jsonl"]
    assert config.data.eval == [cwd / "my_eval.jsonl"] and config.deepspeed == cwd / "ds.json"


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"trainig": {}}, "unknown key 'trainig' for a RunConfig; did you mean 'training'?"),
        ({"training.learning_rate": 1}, "training: unknown key 'learning_rate' for a TrainingConfig"),
        ({"training.batch_size": "eight"}, "training.batch_size: Input should be a valid integer"),
        ({"methods.lora.rank": 8}, "methods.lora: unknown key 'rank'"),
        ({"methods.adapter.type": "adaptor"}, "unknown method type 'adaptor'; did you mean 'adapter'"),
        ({"stages": [{"name": "a", "train": ["lroa"]}]}, "'lroa', which is not a method entry; did you mean 'lora'"),
        ({"data.train": "missing.jsonl"}, "data.train: data file '.*missing.jsonl' does not exist"),
        ({"data.format": "sharegpt"}, "data.train: .*train.jsonl, record 1: sharegpt record needs"),
        ({"data.eval_split": 0.1, "data.eval": "train.jsonl"}, "give either 'eval' .* or 'eval_split'"),
    ],
)  # fmt: skip
def test_each_bad_config_has_its_message(project, changes, expected):
    text = problems(write_config(project, **changes))
    assert re.search(expected, text), text


def test_empty_data_file(project):
    (project / "empty.jsonl").write_text("")
    assert "data.train: data file '" in problems(write_config(project, **{"data.train": "empty.jsonl"}))


def test_validate_lists_every_problem_at_once(project):
    (project / "bad.jsonl").write_text('{"instruction": "x", "output": "y"}\n{oops\n')
    path = write_config(project, **{"training.batch_size": 0, "data.train": "bad.jsonl", "eval": {"metrik": "x"},
                                     "stages": [{"name": "a", "train": ["nope"]}]})  # fmt: skip
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    out = result.output
    assert "4 problem(s)" in out, out
    for expected in ["training.batch_size", "unknown key 'metrik'", "bad.jsonl: line 2 is not valid JSON", "'nope'"]:
        assert expected in out, out


def test_validate_reports_every_entry_and_the_stages_when_one_entry_is_broken(project):
    methods = {"lora": {"type": "lora", "r": 4, "targets": ["q_proj"], "lora_alph": 3},
               "other": {"type": "lorra"}, "adapter": {"type": "adapter"}}  # fmt: skip
    path = write_config(project, methods=methods, stages=[{"name": "a", "train": ["nope"]}])
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and "3 problem(s)" in result.output, result.output
    for expected in [
        "methods.lora: unknown key 'lora_alph' for a LoRAConfig; did you mean 'lora_alpha'?",
        "methods.other: unknown method type 'lorra'; did you mean 'lora'?",
        "stage 'a' trains 'nope', which is not a method entry (entries: lora, other, adapter)",
    ]:
        assert expected in result.output, result.output


def test_validate_checks_every_target_against_the_models_config(project, tiny_lm_dir):
    """What train would fail on, found without loading weights: LLaMA-Factory's `lora_target: all`
    gets its name here, a misspelt placement its closest module."""
    methods = {"lora": {"type": "lora", "targets": "all"}, "adapter": {"type": "adapter", "after": "mlpp"},
               "ok": {"type": "ia3", "targets": ["k_proj"]}}  # fmt: skip
    path = write_config(project, model=str(tiny_lm_dir), methods=methods, stages=None)
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and "2 problem(s)" in result.output, result.output
    assert "methods.lora: entry 'lora': pattern 'all' matched no module of the model; did you mean 'all-linear'?" in (
        result.output
    )
    assert "methods.adapter: entry 'adapter': pattern 'mlpp' matched no module" in result.output
    assert "close module names in this model: mlp" in result.output
    methods["lora"]["targets"], methods["adapter"]["after"] = "all-linear", "mlp"
    path = write_config(project, model=str(tiny_lm_dir), methods=methods, stages=None)
    assert CliRunner().invoke(app, ["validate", str(path)]).exit_code == 0


def test_unknown_keys_are_grouped_per_section_with_one_suggestion_each(project):
    path = write_config(project, **{"data.trian": "x", "data.maxlen": 3, "training.bathc_size": 2,
                                     "training.epochz": 3, "training.foo": 1, "stage": "sft"})  # fmt: skip
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and "3 problem(s)" in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("  - ")]
    assert lines[0].startswith("  - unknown key 'stage' for a RunConfig; did you mean 'stages'?")
    assert lines[1].startswith("  - data: unknown keys for a DataConfig: 'trian' (did you mean 'train'?), "
                               "'maxlen' (did you mean 'max_length'?); valid keys: ")  # fmt: skip
    assert "'bathc_size' (did you mean 'batch_size'?), 'epochz' (did you mean 'epochs'?), 'foo'; valid keys" in lines[2]
    assert all(line.count("valid keys") == 1 for line in lines)


def test_a_method_that_needs_full_precision_weights_is_refused_on_a_quantized_base(project):
    methods = {"dora": {"type": "dora", "r": 4, "targets": ["q_proj"]}, "lora": {"type": "lora", "targets": ["v_proj"]}}
    path = write_config(project, methods=methods, stages=None, model_quantization={"bits": 4})
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and "1 problem(s)" in result.output, result.output
    assert "methods.dora: dora needs the full-precision weights of its targets" in result.output


def test_validate_ok(project):
    result = CliRunner().invoke(app, ["validate", str(write_config(project))])
    assert result.exit_code == 0 and "ok" in result.output


def test_an_override_replaces_the_option_under_its_other_name(tmp_path):
    """peft's name in the YAML, hybridtune's on the command line (or the other way): one option."""
    (tmp_path / "train.jsonl").write_text('{"instruction": "hi", "output": "yo"}\n')
    path = tmp_path / "run.yaml"
    path.write_text(
        "methods:\n  lora: {type: lora, lora_alpha: 16, target_modules: [q_proj]}\ndata: {train: train.jsonl}\n"
    )
    config = load_run_config(path, ["methods.lora.alpha=4", "methods.lora.targets=[v_proj]"])
    assert config.methods["lora"].alpha == 4 and config.methods["lora"].targets == ["v_proj"]
