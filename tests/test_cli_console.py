"""What a user sees on the console: one-line errors with exit code 2, flags that read as flags, no
third-party noise, eval lines of their own, one eval per step, and the files a run leaves."""

import json
import os
import stat
import subprocess
import sys

import pytest

from conftest import write_config
from hybridtune.cli import main
from hybridtune.training.checkpoints import CHECKPOINTS

# What optional engines print when they are imported though the run does not use them
NOISE = ("Setting accelerator to CPU", "kernels-community", "DeepSpeed", "bitsandbytes", "WARNING", "Warning")


def hybridtune(*args, cwd=None, env=None):
    """The console command itself, in a new process: what a user's terminal shows."""
    return subprocess.run(
        [sys.executable, "-m", "hybridtune", *map(str, args)],
        capture_output=True, text=True, timeout=300, cwd=cwd, env={**os.environ, **(env or {})},
    )  # fmt: skip


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_lm_dir):
    """One run of the test config from the console (eval every 4 steps, the last at step 8)."""
    from conftest import COLORS

    project = tmp_path_factory.mktemp("console")
    rows = [{"instruction": f"what color is the {thing}?", "output": color} for thing, color in COLORS.items()]
    (project / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 3))
    (project / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    path = write_config(project, tiny_lm_dir, max_steps=8, save_every=4, eval_every=4)
    leftover = project / "runs" / "run" / CHECKPOINTS / ".tmp-killed"  # what a kill -9 mid-save leaves
    leftover.mkdir(parents=True)
    (leftover / "optimizer.pt").write_bytes(b"half")
    old = os.umask(0o022)
    try:
        result = hybridtune("train", path, cwd=project)
    finally:
        os.umask(old)
    assert result.returncode == 0, result.stdout + result.stderr
    return project / "runs" / "run", result


def test_train_prints_no_third_party_noise(finished_run):
    _, result = finished_run
    for noise in NOISE:
        assert noise not in result.stdout + result.stderr, f"{noise!r} printed:\n{result.stderr}"


def test_eval_lines_have_lines_of_their_own_and_the_last_step_is_evaluated_once(finished_run):
    run, result = finished_run
    lines = result.stdout.replace("\r", "\n").splitlines() + result.stderr.replace("\r", "\n").splitlines()
    evals = [line for line in lines if "eval (" in line]
    assert evals and all(line.startswith("eval (") for line in evals), evals  # never after a bar's text
    assert [line.split(":")[0] for line in evals] == [
        "eval (before, step 0)", "eval (during, step 4)", "eval (after, step 8)",
    ]  # fmt: skip
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["when"], r["step"]) for r in records if r["kind"] == "eval"] == [
        ("before", 0), ("during", 4), ("after", 8),
    ]  # fmt: skip


def test_run_files_get_normal_modes_names_and_no_leftovers(finished_run):
    run, _ = finished_run
    files = [p for p in run.rglob("*") if p.is_file()]
    expected = {"adapters/hybridtune_model.safetensors", "config.yaml", "summary.json", "metrics.jsonl"}
    assert {p.relative_to(run).as_posix() for p in files} >= expected
    modes = {p.relative_to(run).as_posix(): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {"0o644"}, modes  # umask 022, like every file the user makes
    folders = {oct(stat.S_IMODE(p.stat().st_mode)) for p in run.rglob("*") if p.is_dir()}
    assert folders == {"0o755"}
    assert sorted(p.name for p in (run / CHECKPOINTS).iterdir()) == ["step-0000004", "step-0000008"]  # no -stage1


def test_a_run_directory_given_as_adapters_is_one_line_with_a_hint(finished_run, capsys):
    run, _ = finished_run
    code = main(["generate", "--adapters", str(run), "hi"])
    out = capsys.readouterr()
    assert code == 2
    assert out.err.strip().splitlines() == [
        f"error: no hybridtune_config.json in '{run}': not a hybridtune adapter directory; "
        f"did you mean {run / 'adapters'}?"
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "--adapters", "no/such/dir", "hi"], "not a hybridtune adapter directory (it does not exist)"),
        (["eval", "missing.yaml", "--adapters", "x"], "missing.yaml"),
        (["merge", "--adapters", "no/such/dir", "--out", "o"], "(it does not exist)"),
    ],
)
def test_expected_errors_are_one_line_and_exit_code_2(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and message in err and err.startswith("error: ")


def test_debug_shows_the_traceback(tmp_path):
    result = hybridtune("--debug", "generate", "--adapters", tmp_path / "nowhere", "hi")
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "CheckpointError" in result.stderr


def test_help_is_quick_and_flags_read_as_flags():
    result = hybridtune("--help")
    assert result.returncode == 0
    assert "--version" in result.stdout and "<bool>" not in result.stdout
    generate = hybridtune("generate", "--help").stdout
    assert "-i, --interactive" in generate and "<bool>" not in generate
    check = "import sys, hybridtune.cli; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    imported = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60)
    assert imported.stdout.strip() == "[]"  # --help never pays for torch and transformers
