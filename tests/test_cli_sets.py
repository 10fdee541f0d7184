"""CLI for several adapter sets: merge-sets, generate --ensemble, generate --task."""

import json

import torch
import yaml
from typer.testing import CliRunner

from conftest import write_config
from hybridtune.cli import app
from hybridtune.interop.set_merging import Ensemble
from hybridtune.training.data import render_prompt
from hybridtune.training.trained_sets import load_sets

runner = CliRunner()


def lora_run(project, tiny_lm_dir, name, seed):
    path = write_config(project, tiny_lm_dir, f"{name}.yaml", max_steps=3, seed=seed)
    raw = yaml.safe_load(path.read_text())
    del raw["methods"]["adapter"]
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    result = runner.invoke(app, ["train", str(path)])
    assert result.exit_code == 0, result.output
    return project / "runs" / name / "adapters"


def test_merge_sets_and_ensemble_from_the_command_line(project, tiny_lm_dir, tmp_path):
    a, b = lora_run(project, tiny_lm_dir, "a", 1), lora_run(project, tiny_lm_dir, "b", 2)
    result = runner.invoke(app, ["merge-sets", f"{a}:0.25", f"{b}:0.75", "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    hybrid, _, _ = load_sets([(a, 1.0), (b, 1.0), (tmp_path / "m", 1.0)])
    deltas = {}
    for name in ["s0", "s1", "s2"]:
        with hybrid.using(name):
            deltas[name] = {t: br.delta_weight() for _, t, _, br in hybrid.branches()}
    for target, merged in deltas["s2"].items():
        torch.testing.assert_close(merged, 0.25 * deltas["s0"][target] + 0.75 * deltas["s1"][target],
                                   atol=1e-6, rtol=1e-5)  # fmt: skip
    meta = json.loads((tmp_path / "m" / "hybridtune_config.json").read_text())
    assert meta["methods"]["lora"]["r"] == 8  # 4 + 4, exact

    result = runner.invoke(app, ["generate", "--ensemble", f"{a}:0.5,{b}:0.5", "--max-new-tokens", "4",
                                 "what color is the sky?"])  # fmt: skip
    assert result.exit_code == 0, result.output
    hybrid, tok, weights = load_sets([(a, 0.5), (b, 0.5)])
    text = render_prompt(tok, [{"role": "user", "content": "what color is the sky?"}])
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = Ensemble(hybrid, weights).generate(ids, max_new_tokens=4, eos_token_id=tok.eos_token_id)
    assert result.output.strip() == tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()

    bad = runner.invoke(app, ["merge-sets", f"{a}:half", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "expected DIR:WEIGHT" in bad.output


def test_generate_task_needs_a_mixture(project, tiny_lm_dir):
    a = lora_run(project, tiny_lm_dir, "a", 1)
    result = runner.invoke(app, ["generate", "--adapters", str(a), "--task", "colors", "hi"])
    assert result.exit_code == 2 and "--task needs adapters with an entry that routes rows by task" in result.output
