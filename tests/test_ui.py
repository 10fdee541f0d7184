"""`hybridtune ui`: the JSON API through FastAPI's test client, and the page end to end in headless
Chromium (Debian's chromium + chromium-driver, driven by selenium)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from conftest import COLORS, free_port, serving, wait_for
from hybridtune.ui import create_app

# the entries of the trainable-parameters table, read in one go (every check replaces its rows)
ENTRY_NAMES = "return [...document.querySelectorAll('#params td:first-child')].map((td) => td.textContent)"
SCREENSHOTS = Path(os.environ.get("HYBRIDTUNE_SCREENSHOTS", "")) if os.environ.get("HYBRIDTUNE_SCREENSHOTS") else None


@pytest.fixture
def workdir(tmp_path, tiny_lm_dir):
    shutil.copytree(tiny_lm_dir, tmp_path / "models" / "tiny")
    rows = [{"instruction": f"what color is the {thing}?", "output": color} for thing, color in COLORS.items()]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 3))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:6]))
    return tmp_path


def page_config(name="run1", steps=6, **training):
    return {
        "name": name,
        "model": "models/tiny",
        "methods": {
            "lora": {
                "type": "lora",
                "r": 4,
                "alpha": 8,
                "targets": ["q_proj", "v_proj"],
                "rank_pattern": {"v_proj": 2},
            },
            "adapter": {"type": "adapter", "after": ["mlp"], "bottleneck_size": 8},
        },
        "data": {"train": "train.jsonl", "eval": "eval.jsonl", "max_length": 64},
        "training": {"batch_size": 4, "lr": 1e-2, "max_steps": steps, "save_every": 2, **training},
        "eval": {"max_new_tokens": 3, "max_samples": 6},
    }


def test_check_gives_yaml_problems_and_parameter_counts(workdir):
    import hybridtune as ht
    from hybridtune.core.base_models import load_base

    client = TestClient(create_app(workdir))
    assert client.get("/api/options").json()["data_files"] == ["eval.jsonl", "train.jsonl"]
    modules = client.get("/api/modules", params={"model": "models/tiny"}).json()
    assert [m["name"] for m in modules["linear"]][:3] == ["q_proj", "k_proj", "v_proj"] and "mlp" in modules["blocks"]
    checked = client.post("/api/check", json=page_config()).json()
    assert checked["problems"] == []
    hybrid = ht.inject(load_base(str(workdir / "models" / "tiny"))[0], {"methods": page_config()["methods"]})
    counts = hybrid.trainable_parameters()["entries"]
    assert checked["parameters"]["lora"] == counts["lora"]["trainable"] > 0
    assert checked["parameters"]["adapter"] == counts["adapter"]["trainable"] > 0
    assert "output: runs/run1" in checked["yaml"] and "rank_pattern" in checked["yaml"]
    staged = {**page_config(), "stages": [{"name": "domain", "train": ["adapter"], "max_steps": 3},
                                          {"name": "task", "train": ["lora"], "max_steps": 3, "lr": 1e-3}]}  # fmt: skip
    checked = client.post("/api/check", json=staged).json()
    assert checked["problems"] == [] and "- name: domain" in checked["yaml"]
    staged["stages"][1]["train"] = ["lroa"]
    assert "did you mean 'lora'" in client.post("/api/check", json=staged).json()["problems"][0]
    bad = page_config()
    bad["methods"]["lora"]["targets"] = ["q_prj"]
    bad["training"]["batch_size"] = 0
    problems = client.post("/api/check", json=bad).json()["problems"]
    assert any("training.batch_size" in p for p in problems) and not any("q_prj" in p for p in problems)
    bad["training"]["batch_size"] = 4
    assert "'q_prj' matched no module" in client.post("/api/check", json=bad).json()["problems"][0]


def test_the_method_catalog_has_what_the_page_builds_its_forms_from(workdir):
    from hybridtune.methods import METHODS, method_config

    catalog = TestClient(create_app(workdir)).get("/api/methods").json()
    assert list(catalog) == list(METHODS)
    assert [kind for kind, info in catalog.items() if info["enabled_by_default"]] == list(METHODS)[:2]
    lora, adapter = catalog["lora"]["schema"]["properties"], catalog["adapter"]["schema"]["properties"]
    assert lora["targets"]["ui"] == "linear_targets" and lora["rank_pattern"]["ui"] == "per_target"
    assert adapter["after"]["ui"] == "blocks" and adapter["after"]["default"] == ["mlp"]  # a default_factory's
    for kind, info in catalog.items():  # every form starts from a valid entry
        assert method_config(info["start"]).model_dump(mode="json") == info["start"], kind


@pytest.mark.parametrize("path", ["../outside.jsonl", "/etc/passwd", "models/../../x.jsonl"])
@pytest.mark.parametrize("key", ["train", "train_list", "eval", "dataset_dir", "template", "deepspeed"])
def test_paths_typed_into_the_page_stay_in_the_work_directory(workdir, path, key):
    client = TestClient(create_app(workdir))
    config = page_config()
    if key == "deepspeed":
        config["deepspeed"] = path
    elif key == "train_list":  # several files: each is checked
        config["data"]["train"] = ["train.jsonl", path]
    else:
        config["data"][key] = path
    assert client.post("/api/check", json=config).json()["problems"] == [f"'{path}' is outside the work directory"]
    response = client.post("/api/runs", json={**config, "name": "escape"})
    assert response.status_code == 400 and "outside the work directory" in response.json()["detail"]
    assert client.get("/api/runs/..%2F..%2Fetc").status_code in (400, 404)


def test_train_stop_resume_export_and_chat_through_the_api(workdir):
    client = TestClient(create_app(workdir))
    assert client.post("/api/runs", json=page_config("long", steps=400, save_every=1000)).json()["status"] == "running"
    wait_for(lambda: any(r["kind"] == "train" for r in client.get("/api/runs/long").json()["metrics"]))
    assert client.post("/api/runs/long/stop").json()["status"] == "stopping"
    stopped = wait_for(lambda: (r := client.get("/api/runs/long").json())["status"] == "stopped" and r)
    assert (workdir / "runs" / "long" / "checkpoints").is_dir()  # the stop kept a checkpoint
    step = next(r for r in stopped["metrics"] if r["kind"] == "stopped")["step"]
    assert client.post("/api/runs/long/resume").json()["status"] == "running"
    client.post("/api/runs/long/stop")  # and once more: resume went on from the checkpoint
    again = wait_for(lambda: (r := client.get("/api/runs/long").json())["status"] == "stopped" and r, timeout=180)
    assert "resuming from" in again["log_tail"] and max(m["step"] for m in again["metrics"]) >= step

    client.post("/api/runs", json=page_config("short"))
    wait_for(lambda: client.get("/api/runs/short").json()["status"] == "finished")
    exported = client.post("/api/runs/short/export/merged").json()
    assert "out" in exported, exported
    assert (workdir / exported["out"] / "base" / "config.json").is_file()  # LoRA merged, adapter kept live
    assert (workdir / exported["out"] / "adapters" / "hybridtune_config.json").is_file()
    answers = client.post("/api/chat", json={"prompt": "what color is the sky?", "runs": ["short"],
                                             "max_new_tokens": 4}).json()  # fmt: skip
    assert set(answers) == {"base", "short"}
    runs = {r["name"]: r for r in client.get("/api/runs").json()}
    assert runs["short"]["status"] == "finished" and runs["short"]["has_adapters"]


def test_page_end_to_end_in_chromium(workdir, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "hybridtune", "ui", "--workdir", str(workdir), "--port",
                               str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    shots = SCREENSHOTS or tmp_path
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_for(lambda: _up(url), timeout=60)
        browser.get(url)
        find = browser.find_element
        wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#method-lora-targets .module-option"))
        enabled = [b.get_attribute("value") for b in browser.find_elements(By.CSS_SELECTOR, ".method-enable:checked")]
        assert enabled == ["lora", "adapter"]  # the starter config; every other method is a form to enable
        Select(find(By.ID, "model")).select_by_value("models/tiny")
        wait_for(lambda: "llama, 2 layers" in find(By.ID, "modules").text)
        targets = browser.find_elements(By.CSS_SELECTOR, "#method-lora-targets .module-option:checked")
        assert [b.get_attribute("value") for b in targets] == ["q_proj", "v_proj"]
        places = browser.find_elements(By.CSS_SELECTOR, "#method-adapter-after .module-option:checked")
        assert [b.get_attribute("value") for b in places] == ["mlp"]
        find(By.ID, "method-lora-rank_pattern-v_proj").send_keys("2")  # a rank of its own for one target
        for field, value in {"run-name": "e2e", "max-steps": "30", "eval-every": "10", "batch-size": "4",
                             "lr": "0.01", "max-length": "64"}.items():  # fmt: skip
            find(By.ID, field).clear()
            find(By.ID, field).send_keys(value)
        wait_for(lambda: "output: runs/e2e" in (yaml := find(By.ID, "yaml").text) and "max_steps: 30" in yaml)
        yaml = find(By.ID, "yaml").text  # the rank and the ticked targets, as the form's own fields
        assert "rank_pattern:\n      v_proj: 2" in yaml and "targets:\n    - q_proj\n    - v_proj" in yaml
        wait_for(lambda: find(By.ID, "problems").text == "no problems")
        find(By.ID, "add-stage").click()  # a stage editor: adapter first, then LoRA
        find(By.ID, "add-stage").click()
        wait_for(lambda: "- name: stage2" in find(By.ID, "yaml").text)
        assert "train:\n  - adapter" in find(By.ID, "yaml").text
        for remove in browser.find_elements(By.CSS_SELECTOR, ".stage-remove"):
            remove.click()  # this run trains everything in one stage
        wait_for(lambda: "stages:" not in find(By.ID, "yaml").text)
        assert {"lora", "adapter", "base"} <= set(browser.execute_script(ENTRY_NAMES))
        browser.save_screenshot(str(shots / "ui-configure.png"))

        find(By.ID, "start").click()

        def points():
            return len((find(By.CSS_SELECTOR, "#curve polyline.train-line").get_attribute("points") or "").split())

        wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#curve polyline.train-line") and points() >= 2)
        first = points()
        wait_for(lambda: find(By.ID, "run-status").text == "finished", timeout=180)
        assert points() > first  # the curve kept growing while the run trained
        assert browser.find_elements(By.CSS_SELECTOR, "#curve circle.eval-dot")  # eval losses plotted
        browser.save_screenshot(str(shots / "ui-trained.png"))

        wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#runs-table tr[data-run='e2e']"))
        find(By.CSS_SELECTOR, "#runs-table tr[data-run='e2e'] .compare-run").click()
        assert "max_steps: 30" in find(By.ID, "config-a").text
        find(By.ID, "chat-prompt").clear()
        find(By.ID, "chat-prompt").send_keys("what color is the sky?")
        find(By.ID, "chat-send").click()
        wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, ".answer[data-model='e2e']"), timeout=60)
        answers = {a.get_attribute("data-model"): a.text for a in browser.find_elements(By.CSS_SELECTOR, ".answer")}
        assert set(answers) == {"base", "e2e"}
        browser.save_screenshot(str(shots / "ui-chat.png"))
        for name in ("ui-configure.png", "ui-trained.png", "ui-chat.png"):
            assert (shots / name).stat().st_size > 20_000  # a rendered page, not a blank one
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_every_method_form_starts_as_a_valid_entry(workdir, browser):
    """Each registered method, enabled alone, gives a config the check accepts as the form starts."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from hybridtune.methods import METHODS

    def entries():
        return set(browser.execute_script(ENTRY_NAMES))

    with serving(create_app(workdir)) as url:
        browser.get(url)
        find = browser.find_element
        boxes = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, ".method-enable"))
        assert [b.get_attribute("value") for b in boxes] == list(METHODS)  # every registered method, in order
        Select(find(By.ID, "model")).select_by_value("models/tiny")
        wait_for(lambda: "llama, 2 layers" in find(By.ID, "modules").text)
        for kind in METHODS:
            for box in browser.find_elements(By.CSS_SELECTOR, ".method-enable"):
                if box.is_selected() != (box.get_attribute("value") == kind):
                    box.click()
            assert list(browser.execute_script("return buildConfig()")["methods"]) == [kind]
            wait_for(lambda: entries() == {kind, "base"}, timeout=60)  # noqa: B023 (called at once)
            assert find(By.ID, "problems").text == "no problems", kind


def _up(url: str) -> bool:
    try:
        return httpx.get(url).status_code == 200
    except httpx.TransportError:
        return False


def test_ui_binds_to_loopback_by_default():
    from typer.main import get_command

    from hybridtune.cli import app

    ui = get_command(app).commands["ui"]
    assert next(p for p in ui.params if p.name == "host").default == "127.0.0.1"
