"""What the web UI does, as plain functions over a work directory — no training logic of its own.

Configs are validated by the same RunConfig the CLI uses; runs are real ``hybridtune train``
subprocesses; export calls ``hybridtune export``; chat uses the library's generate. Every path the
page sends is resolved inside the work directory, or refused.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import TypeAdapter, ValidationError

from ..core.base_models import EMBEDDED_NAME
from ..core.errors import HybridTuneError
from ..core.targeting import is_linear, named_base_modules
from ..core.validation import describe_errors
from ..training.data import PLAIN_TEXT
from ..training.run_config import DATA_PATH_KEYS, RunConfig, data_problems
from ..training.run_dir import STOP_FILE, SUMMARY
from ..training.tracking import METRICS_FILE, read_metrics

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
DATA_SUFFIXES = (".json", ".jsonl")
STARTER_METHODS = 2  # the page starts with the first methods of the registry enabled (METHOD_MODULES' order)


class UIError(HybridTuneError, ValueError):
    """A request the UI refuses, with a message for the page."""


def _is_path(key: str, value: Any) -> bool:
    """Whether ``value`` of data.``key`` names files (template: none is plain text, not a file).
    Stricter than the YAML reader: a bare template name is confined too."""
    return value not in (None, "", []) and not (key == "template" and value == PLAIN_TEXT)


def _each(value: str | list, change: Any) -> str | list:
    """``change`` applied to one path or to every path of a list."""
    return [change(str(v)) for v in value] if isinstance(value, list) else change(str(value))


class Workdir:
    """The folder the UI may read and write: data files, configs/, runs/, exports/, models/."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        for sub in ("configs", "runs", "exports", "models"):
            (self.root / sub).mkdir(exist_ok=True)
        self.processes: dict[str, subprocess.Popen] = {}

    def path(self, relative: str) -> Path:
        """``relative`` inside the work directory (symlinks followed), or UIError."""
        candidate = (self.root / relative).resolve()
        if not candidate.is_relative_to(self.root):
            raise UIError(f"'{relative}' is outside the work directory")
        return candidate

    def run_dir(self, name: str) -> Path:
        if not RUN_NAME.fullmatch(name):
            raise UIError(f"run name '{name}' must be letters, digits, '_', '.', '-'")
        return self.root / "runs" / name

    # ---- what the page offers ---------------------------------------------------------------
    def models(self) -> list[str]:
        local = [f"models/{p.name}" for p in sorted((self.root / "models").iterdir()) if (p / "config.json").is_file()]
        return [EMBEDDED_NAME, *local]

    def data_files(self) -> list[str]:
        """JSON/JSONL files of the work directory, outside models/ and what runs and exports write."""
        relative = (p.relative_to(self.root) for p in self.root.rglob("*") if p.suffix in DATA_SUFFIXES)
        written = {"runs", "exports", "models"}
        return sorted(str(r) for r in relative if r.parts[0] not in written and (self.root / r).is_file())

    def model_source(self, model: str) -> str:
        return model if model == EMBEDDED_NAME else str(self.path(model))

    # ---- configure ----------------------------------------------------------------------------
    def check(self, raw: dict[str, Any]) -> dict[str, Any]:
        """YAML text, problems (the CLI's validator) and trainable parameters per entry."""
        name = str(raw.pop("name", "") or "run")
        problems: list[str] = []
        try:
            config_dict = self._resolved(raw, name)
        except UIError as exc:
            return {"yaml": "", "problems": [str(exc)], "parameters": {}}
        try:
            config = RunConfig.model_validate(config_dict)
        except ValidationError as exc:
            problems += describe_errors(exc)
            config = None
        problems += data_problems(config_dict.get("data"))
        parameters = {}
        if config is not None:
            try:
                parameters = count_parameters(self.model_source(config.model), json.dumps(
                    {k: v.model_dump(mode="json") for k, v in config.methods.items()}))  # fmt: skip
            except Exception as exc:  # a target that matches nothing, a model that cannot load
                problems.append(str(exc))
        return {"yaml": self.yaml_text(raw, name), "problems": problems, "parameters": parameters}

    def yaml_text(self, raw: dict[str, Any], name: str) -> str:
        """The file saved as configs/<name>.yaml: data paths relative to it (as the CLI reads them),
        model and output relative to the work directory, where the run starts."""
        shown = json.loads(json.dumps({k: v for k, v in raw.items() if v not in (None, {}, [])}))
        data = shown.get("data") or {}
        for key in DATA_PATH_KEYS:
            if _is_path(key, data.get(key)):
                data[key] = _each(data[key], lambda v: f"../{v}")
        shown["output"] = f"runs/{name}"
        return yaml.safe_dump(shown, sort_keys=False)

    def _resolved(self, raw: dict[str, Any], name: str) -> dict[str, Any]:
        """The config with work-directory paths made absolute (and checked)."""
        config = json.loads(json.dumps(raw))
        data = config.get("data") or {}
        for key in DATA_PATH_KEYS:  # every file the run would read stays inside the work directory
            if _is_path(key, data.get(key)):
                data[key] = _each(data[key], lambda v: str(self.path(v)))
        if isinstance(config.get("deepspeed"), str):
            config["deepspeed"] = str(self.path(config["deepspeed"]))
        if config.get("model") and config["model"] != EMBEDDED_NAME:
            config["model"] = str(self.path(config["model"]))
        config["output"] = str(self.run_dir(name))
        return config

    # ---- train --------------------------------------------------------------------------------
    def config_path(self, name: str) -> Path:
        return self.root / "configs" / f"{name}.yaml"

    def start(self, raw: dict[str, Any]) -> dict[str, Any]:
        name = str(raw.get("name") or "")
        self._ensure_idle(name)  # before its config file is rewritten
        checked = self.check(dict(raw))
        if checked["problems"]:
            raise UIError("the config has problems: " + "; ".join(checked["problems"]))
        self.config_path(name).write_text(checked["yaml"])
        return self._launch(name)

    def resume(self, name: str) -> dict[str, Any]:
        if not self.config_path(name).is_file():
            raise UIError(f"no config for run '{name}'")
        self._ensure_idle(name)
        return self._launch(name)

    def _ensure_idle(self, name: str) -> None:
        self.run_dir(name)  # the name is checked first
        if name in self.processes and self.processes[name].poll() is None:
            raise UIError(f"run '{name}' is already running")

    def _launch(self, name: str) -> dict[str, Any]:
        run_dir = self.run_dir(name)
        run_dir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "hybridtune", "train", str(self.config_path(name).relative_to(self.root))]
        with open(run_dir / "train.log", "ab") as log:
            self.processes[name] = subprocess.Popen(command, cwd=self.root, stdout=log, stderr=subprocess.STDOUT)
        return {"name": name, "status": "running"}

    def stop(self, name: str) -> dict[str, Any]:
        """Ask the run to stop at its next step; it writes a checkpoint first (see STOP_FILE)."""
        run_dir = self.run_dir(name)
        if self.status(name) != "running":
            raise UIError(f"run '{name}' is not running")
        (run_dir / STOP_FILE).touch()
        return {"name": name, "status": "stopping"}

    def status(self, name: str) -> str:
        run_dir = self.run_dir(name)
        process = self.processes.get(name)
        if process is not None and process.poll() is None:
            return "stopping" if (run_dir / STOP_FILE).exists() else "running"
        if (run_dir / SUMMARY).is_file():
            return "finished"
        records = read_metrics(run_dir / METRICS_FILE) if (run_dir / METRICS_FILE).is_file() else []
        if records and records[-1].get("kind") == "stopped":
            return "stopped"
        return "failed" if process is not None else "interrupted"

    def run(self, name: str) -> dict[str, Any]:
        run_dir = self.run_dir(name)
        if not run_dir.is_dir():
            raise UIError(f"no run '{name}'")
        metrics = read_metrics(run_dir / METRICS_FILE) if (run_dir / METRICS_FILE).is_file() else []
        summary = json.loads((run_dir / SUMMARY).read_text()) if (run_dir / SUMMARY).is_file() else None
        config = self.config_path(name)
        log = run_dir / "train.log"
        return {
            "name": name,
            "status": self.status(name),
            "metrics": metrics,
            "summary": summary,
            "config": config.read_text() if config.is_file() else "",
            "log_tail": _tail(log) if log.is_file() else "",
        }

    def runs(self) -> list[dict[str, Any]]:
        found = []
        for run_dir in sorted((self.root / "runs").iterdir()):
            if run_dir.is_dir() and RUN_NAME.fullmatch(run_dir.name):
                info = self.run(run_dir.name)
                info["has_adapters"] = (run_dir / "adapters" / "hybridtune_config.json").is_file()
                found.append(info)
        return found

    # ---- export -------------------------------------------------------------------------------
    def export(self, name: str, fmt: str) -> dict[str, Any]:
        """The CLI's own commands: merged (LoRA folded in, adapters kept live next to the merged
        model), peft (the LoRA entries for peft/vLLM) or onnx."""
        commands = {"merged": ["merge", "--keep-adapters"], "peft": ["export", "--format", "peft"],
                    "onnx": ["export", "--format", "onnx"]}  # fmt: skip
        if fmt not in commands:
            raise UIError(f"unknown export format '{fmt}' ({', '.join(commands)})")
        adapters = self.run_dir(name) / "adapters"
        if not adapters.is_dir():
            raise UIError(f"run '{name}' has no final adapters yet")
        out = self.root / "exports" / f"{name}-{fmt}"
        command = [sys.executable, "-m", "hybridtune", *commands[fmt], "--adapters", str(adapters), "--out", str(out)]
        if fmt == "peft":  # the button exports the run's LoRA part; the CLI's message names what is left out
            command += ["--only", ",".join(peft_exportable(adapters))]
        done = subprocess.run(command, cwd=self.root, capture_output=True, text=True)
        if done.returncode != 0:
            raise UIError(f"export failed: {(done.stderr or done.stdout).strip()[-1000:]}")
        return {"out": str(out.relative_to(self.root)), "message": done.stdout.strip()}


def _tail(log: Path, lines: int = 25) -> str:
    """The end of a run's output, progress-bar redraws (carriage returns) as separate lines."""
    text = log.read_text(errors="replace")[-20_000:].replace("\r", "\n")
    return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])


@functools.lru_cache(maxsize=8)
def inspect_model(source: str) -> dict[str, Any]:
    """Linear layers (by name suffix, with shapes) and the blocks of a layer, from the model's
    config alone (no weights are loaded)."""
    model = _empty_model(source)
    linears: dict[str, dict[str, Any]] = {}
    for name, module in named_base_modules(model):
        if is_linear(module) and module is not model.get_output_embeddings():
            suffix = name.rsplit(".", 1)[-1]
            entry = linears.setdefault(suffix, {"name": suffix, "count": 0, "example": name})
            entry["count"] += 1
    layers = next((m for m in model.modules() if isinstance(m, torch.nn.ModuleList)), None)
    blocks = sorted({child for child, _ in layers[0].named_children()}) if layers is not None and len(layers) else []
    return {"linear": list(linears.values()), "blocks": blocks, "type": model.config.model_type,
            "layers": len(layers) if layers is not None else 0}  # fmt: skip


def peft_exportable(adapters: Path) -> list[str]:
    """The entries of a saved adapter directory that one peft adapter can hold: those of the
    first entry's method that has a peft equivalent (one peft adapter holds one peft method)."""
    from ..core.adapter_io import read_meta
    from ..methods import METHODS

    kinds = [(entry, METHODS.get(cfg.get("type"))) for entry, cfg in read_meta(adapters)["methods"].items()]
    first = next((cls for _, cls in kinds if cls is not None and cls.peft_type), None)
    return [entry for entry, cls in kinds if first is not None and cls is first]


def method_catalog() -> dict[str, dict[str, Any]]:
    """Every registered method, in registry order, for the page to build its forms from: the
    config's JSON schema (fields, types, defaults, bounds, and the ``ui`` hints of methods/base.py),
    what the method can do, a small example entry, the values its form starts from, and whether
    the page starts with it enabled."""
    from ..methods import METHODS

    catalog = {}
    for position, (kind, config_class) in enumerate(METHODS.items()):
        try:
            example = config_class.example().model_dump(mode="json")
        except NotImplementedError:
            example = None
        catalog[kind] = {
            "schema": _schema_with_defaults(config_class),
            "doc": (config_class.__doc__ or "").strip().split("\n\n")[0],
            "mergeable": config_class.mergeable,
            "identity_at_init": config_class.identity_at_init,
            "supports_routing": config_class.supports_routing,
            "example": example,
            "start": _start(config_class, example),
            "enabled_by_default": position < STARTER_METHODS,
        }
    return catalog


def _start(config_class: type, example: dict[str, Any] | None) -> dict[str, Any] | None:
    """The values a form starts from: the defaults plus the example's required fields, or the
    whole example where those alone are not a valid config (a default that needs other fields)."""
    if example is None:
        return None
    fields = config_class.model_fields
    required = {k: v for k, v in example.items() if k in fields and fields[k].is_required()}
    try:
        return config_class.model_validate(required).model_dump(mode="json")
    except ValidationError:
        return example


def _schema_with_defaults(config_class: type) -> dict[str, Any]:
    """The config's JSON schema with the defaults of ``default_factory`` fields written in too
    (pydantic leaves them out), so the page knows every field's default."""
    schema = config_class.model_json_schema()
    properties = schema.get("properties", {})
    for name, field in config_class.model_fields.items():
        key = field.alias or name
        if key in properties and "default" not in properties[key] and field.default_factory is not None:
            with contextlib.suppress(TypeError):  # a factory that reads the other fields has no one default
                default = field.default_factory()
                properties[key]["default"] = TypeAdapter(field.annotation).dump_python(default, mode="json")
    return schema


@functools.lru_cache(maxsize=64)
def count_parameters(source: str, methods_json: str) -> dict[str, int]:
    """Trainable parameters per entry, computed on an empty-weights copy of the model."""
    from ..core.model import inject

    hybrid = inject(_empty_model(source), {"methods": json.loads(methods_json)})
    counts = hybrid.trainable_parameters()
    return {entry: c["trainable"] for entry, c in counts["entries"].items()} | {"base": counts["base"]}


def _empty_model(source: str):
    """The model with every tensor on the meta device, for its structure and sizes. torch's device
    context is per thread, unlike accelerate's init_empty_weights, which patches nn.Module for the
    whole process: the server answers in threads, and a chat loading real weights in another
    thread must not get meta ones."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..core.base_models import resolve_model

    config = AutoConfig.from_pretrained(resolve_model(source), local_files_only=True)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)
