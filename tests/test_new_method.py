"""A new PEFT method is one file plus one registry line: a method defined here, in the test, and
registered with ``register_method`` (what a line in METHOD_MODULES does for a module of the
package) goes through inject, save/load, training from YAML, the CLI, the web UI's method
catalog and config check, and the page's generated forms, with nothing else of hybridtune touched."""

import shutil
from typing import ClassVar, Literal

import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import Field
from torch import nn

import hybridtune as ht
from conftest import make_model, serving, wait_for, write_config
from hybridtune.cli import main
from hybridtune.core.targeting import is_linear, linear_features, select_modules
from hybridtune.methods import Branch, MethodConfig, register_method, unregister_method


class OutputShiftConfig(MethodConfig):
    """A learned vector added to the outputs of the target linear layers (zero at init)."""

    type: Literal["output_shift"] = "output_shift"
    mergeable: ClassVar[bool] = False

    targets: list[str] = Field(min_length=1)
    init: float = 0.0
    llamafactory_defaults: ClassVar[dict] = {"output_shift_targets": None}  # its own LLaMA-Factory YAML key

    @classmethod
    def from_llamafactory(cls, values: dict, given: dict):
        if not given.get("output_shift_targets"):
            return None
        return "shift", {"type": "output_shift", "targets": given["output_shift_targets"].split(",")}

    @classmethod
    def example(cls) -> "OutputShiftConfig":
        return cls(targets=["q_proj"])

    def select_targets(self, model: nn.Module, entry: str) -> list[tuple[str, nn.Module]]:
        return select_modules(model, self.targets, entry=entry, accept=is_linear, accepted_what="linear layers")

    def build_branch(self, entry: str, name: str, module: nn.Module, model: nn.Module) -> Branch:
        return OutputShift(linear_features(module)[1], self.init)


class OutputShift(Branch):
    def __init__(self, features: int, init: float) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.full((features,), float(init)))

    def forward(self, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        return output + self.shift.to(output.dtype)


@pytest.fixture
def registered():
    register_method(OutputShiftConfig)
    yield OutputShiftConfig
    unregister_method("output_shift")


def test_inject_save_load_and_the_public_names(registered, tmp_path, input_ids):
    base = make_model("llama")
    expected = base(input_ids).logits
    model = ht.inject(base, {"methods": {"shift": {"type": "output_shift", "targets": ["q_proj", "v_proj"]}}})
    torch.testing.assert_close(model(input_ids).logits, expected)  # identity at init
    with torch.no_grad():
        for p in model.parameters_to_train():
            p.normal_(0, 0.5)
    changed = model(input_ids).logits
    assert not torch.allclose(changed, expected)
    model.save_adapters(tmp_path / "a")
    reloaded = ht.load(make_model("llama"), tmp_path / "a")
    torch.testing.assert_close(reloaded(input_ids).logits, changed, rtol=0, atol=0)
    assert ht.OutputShiftConfig is OutputShiftConfig  # hybridtune.NameConfig, as for the built-in methods
    with pytest.raises(ht.MergeError, match="not mergeable"):
        reloaded.merge_and_unload()


def test_training_from_yaml_the_cli_and_the_ui(registered, project, tiny_lm_dir, capsys):
    import yaml

    from hybridtune.training.recipe import train
    from hybridtune.training.run_config import load_run_config
    from hybridtune.ui import create_app

    path = write_config(project, tiny_lm_dir, max_steps=4)
    raw = yaml.safe_load(path.read_text())
    raw["methods"] = {"shift": {"type": "output_shift", "targets": ["q_proj", "down_proj"], "init": 0.0},
                      "lora": raw["methods"]["lora"]}  # fmt: skip
    path.write_text(yaml.safe_dump(raw))
    result = train(load_run_config(path), log=lambda *_: None)
    assert result.summary["after"]["eval_loss"] < result.summary["before"]["eval_loss"]

    assert main(["validate", str(path)]) == 0
    assert main(["generate", "--adapters", str(result.adapters_dir), "--max-new-tokens", "2", "hi"]) == 0
    assert capsys.readouterr().out.strip()

    shutil.copytree(tiny_lm_dir, project / "models" / "tiny")  # the UI works inside its folder
    client = TestClient(create_app(project))
    catalog = client.get("/api/methods").json()
    assert catalog["output_shift"]["schema"]["properties"]["init"]["default"] == 0.0
    assert catalog["output_shift"]["example"] == {"type": "output_shift", "targets": ["q_proj"], "init": 0.0}
    assert set(catalog) >= {"lora", "adapter", "output_shift"}
    methods = {"shift": {"type": "output_shift", "targets": ["q_proj"]}}
    checked = client.post("/api/check", json={"model": "models/tiny", "methods": methods,
                                              "data": {"train": "train.jsonl"}}).json()  # fmt: skip
    assert checked["problems"] == [] and checked["parameters"]["shift"] == 2 * 32, checked


def test_the_page_builds_a_form_for_the_new_method(registered, project, tiny_lm_dir, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from hybridtune.core.base_models import load_base
    from hybridtune.ui import create_app

    shutil.copytree(tiny_lm_dir, project / "models" / "tiny")
    with serving(create_app(project)) as url:
        browser.get(url)
        find = browser.find_element
        enable = wait_for(lambda: browser.find_elements(By.ID, "method-output_shift-enable"))[0]
        assert not enable.is_selected() and not find(By.ID, "method-output_shift-init").is_displayed()
        Select(find(By.ID, "model")).select_by_value("models/tiny")
        wait_for(lambda: "llama, 2 layers" in find(By.ID, "modules").text)
        enable.click()
        targets, init = find(By.ID, "method-output_shift-targets"), find(By.ID, "method-output_shift-init")
        assert targets.get_attribute("value") == "q_proj"  # a required field starts from the example
        assert init.get_attribute("value") == "0" and init.get_attribute("type") == "number"  # the default
        targets.clear()
        targets.send_keys("q_proj, v_proj")
        init.clear()
        init.send_keys("0.5")
        posted = browser.execute_script("return buildConfig()")["methods"]  # what the page sends
        assert posted["output_shift"] == {"type": "output_shift", "targets": ["q_proj", "v_proj"], "init": 0.5}
        assert set(posted) == {"lora", "adapter", "output_shift"}
        wait_for(lambda: "init: 0.5" in find(By.ID, "yaml").text)
        wait_for(lambda: find(By.ID, "problems").text == "no problems")
        hybrid = ht.inject(load_base(str(project / "models" / "tiny"))[0], {"methods": posted})
        expected = hybrid.trainable_parameters()["entries"]["output_shift"]["trainable"]
        script = "return [...document.querySelectorAll('#params tr')].map((r) => [...r.cells].map((c) => c.innerText))"
        rows = dict(browser.execute_script(script))  # read in one go: every check replaces the rows
        assert rows["output_shift"] == f"{expected:,}"
        init.clear()
        init.send_keys("0")  # back at its default: left out of the config
        assert browser.execute_script("return buildConfig()")["methods"]["output_shift"] == {
            "type": "output_shift", "targets": ["q_proj", "v_proj"]}  # fmt: skip
        find(By.ID, "method-output_shift-enable").click()
        assert "output_shift" not in browser.execute_script("return buildConfig()")["methods"]


def test_a_llamafactory_yaml_can_ask_for_the_new_method(registered, tiny_lm_dir):
    from hybridtune.training.llamafactory_yaml import convert

    raw = {"stage": "sft", "finetuning_type": "lora", "model_name_or_path": str(tiny_lm_dir), "dataset": "d",
           "output_shift_targets": "q_proj,v_proj"}  # fmt: skip
    converted, _, problems = convert(raw)
    assert problems == []
    assert converted["methods"]["shift"] == {"type": "output_shift", "targets": ["q_proj", "v_proj"]}
    assert "lora" in converted["methods"]  # LLaMA-Factory's LoRA stays
    assert convert({**raw, "output_shift_targets": None})[0]["methods"].keys() == {"lora"}
