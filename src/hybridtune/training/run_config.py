"""The run YAML: model, methods, data, stages, training, eval, output — validated before any model loads."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import AliasChoices, Field, PrivateAttr, SerializeAsAny, ValidationError, field_validator, model_validator

from ..core.base_models import EMBEDDED_NAME
from ..core.chunked_loss import LossKernel
from ..core.config import HybridConfig
from ..core.errors import HybridTuneError
from ..core.quantization import QuantizationConfig
from ..core.validation import StrictModel, accepted_keys, describe_errors
from ..methods import METHODS, MethodConfig
from .data import PLAIN_TEXT, DataError, read_examples
from .dataset_info import read_datasets
from .llamafactory_yaml import convert, is_llamafactory

DATA_PATH_KEYS = ("train", "eval", "dataset_dir", "template")  # the data keys that name files or folders


class DataConfig(StrictModel):
    """Where the examples come from: files (``train``/``eval``: JSON, JSONL, CSV or parquet, one or
    a list) and/or datasets named in LLaMA-Factory's ``dataset_dir/dataset_info.json``."""

    train: list[Path] = Field(default_factory=list)
    eval: list[Path] = Field(default_factory=list)
    dataset: list[str] = Field(default_factory=list)  # LLaMA-Factory's names, "a,b" or a list
    eval_dataset: list[str] = Field(default_factory=list)
    dataset_dir: Path = Path("data")
    max_samples: int | None = Field(None, ge=1)  # the first N records of each file / dataset
    eval_split: float | None = Field(None, gt=0, lt=1, validation_alias=AliasChoices("eval_split", "val_size"))
    format: Literal["auto", "alpaca", "sharegpt"] = "auto"
    max_length: int = Field(512, ge=8, validation_alias=AliasChoices("max_length", "cutoff_len"))
    packing: bool = False
    system: str | None = None  # system prompt added to records that have none
    # the tokenizer's own chat template by default; a Jinja file; or "none" for plain text
    template: str | None = None

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _one_file_is_a_list(cls, value: Any) -> Any:
        return [] if value is None else [value] if isinstance(value, str | Path) else value

    @field_validator("dataset", "eval_dataset", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return [] if value is None else value

    @model_validator(mode="after")
    def _sources(self) -> DataConfig:
        if not self.train and not self.dataset:
            raise ValueError("give data.train (files) or data.dataset (names in dataset_info.json)")
        if (self.eval or self.eval_dataset) and self.eval_split is not None:
            raise ValueError("give either 'eval' / 'eval_dataset' or 'eval_split' (a fraction of train), not both")
        return self

    @field_validator("template")
    @classmethod
    def _template_file_or_none(cls, value: str | None) -> str | None:
        if value is None or value == PLAIN_TEXT or Path(value).is_file():
            return value
        named = "" if "/" in value or "." in value else " (LLaMA-Factory's named templates are its own code)"
        raise ValueError(
            f"template '{value}' is not a file{named}: give a Jinja file (e.g. template.jinja), "
            f"'{PLAIN_TEXT}' for plain text, or leave it out for the tokenizer's own chat template"
        )


class StageConfig(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    train: list[str] = Field(min_length=1)
    epochs: float = Field(1, gt=0)
    max_steps: int | None = Field(None, ge=1)
    lr: float | None = Field(None, gt=0)
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] | None = None
    warmup_ratio: float | None = Field(None, ge=0, lt=1)

    @field_validator("train", mode="before")
    @classmethod
    def _one_name_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class TrainingConfig(StrictModel):
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(2e-4, gt=0)
    epochs: float = Field(1, gt=0)
    max_steps: int | None = Field(None, ge=1)
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # compute (autocast); fp16 adds loss scaling
    base_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # storage of the frozen base weights
    gradient_checkpointing: bool = False
    offload_activations: bool = False  # the inputs checkpointing keeps wait in CPU memory (core/activation_offload.py)
    chunked_loss: bool = True  # the LM head + loss in chunks, never all logits at once (core/chunked_loss.py)
    loss_kernel: LossKernel = "auto"  # who computes that loss: auto = liger-kernel's on CUDA where installed
    liger_kernels: bool = False  # liger-kernel's RMSNorm, rotary and SwiGLU in the base model (core/liger.py)
    compile: bool = False
    seed: int = 0
    save_every: int | None = Field(None, ge=1)
    eval_every: int | None = Field(None, ge=1)
    log_every: int = Field(1, ge=1)
    keep_checkpoints: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _offload_with_checkpointing(self) -> TrainingConfig:
        if self.offload_activations and not self.gradient_checkpointing:
            raise ValueError("offload_activations: true moves the layer inputs that gradient checkpointing keeps to "
                             "CPU memory; set gradient_checkpointing: true too")  # fmt: skip
        if self.offload_activations and self.compile:
            raise ValueError("offload_activations: true cannot be combined with compile: true (torch.compile does "
                             "not trace the offload's saved-tensor hooks); drop one of them")  # fmt: skip
        return self


class EvalConfig(StrictModel):
    metric: Literal["exact_match", "none"] = "exact_match"
    max_new_tokens: int = Field(32, ge=1)
    max_samples: int | None = Field(200, ge=1)
    batch_size: int = Field(16, ge=1)
    before_training: bool = True
    show: int = Field(3, ge=0)  # generations printed after training


class FSDPConfig(StrictModel):
    """``fsdp:``: shard every transformer layer (and the rest of the model) over the processes
    with PyTorch's FSDP2 ``fully_shard``."""

    reshard_after_forward: bool = True  # False: ZeRO-2-like (keep gathered weights until backward)
    cpu_offload: bool = False  # keep the sharded parameters (and their gradients) in CPU memory


class RunConfig(StrictModel):
    model: str = EMBEDDED_NAME
    model_quantization: QuantizationConfig | None = None
    methods: dict[str, SerializeAsAny[MethodConfig]] = Field(min_length=1)
    data: DataConfig
    stages: list[StageConfig] | None = None
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: Path = Path("runs/run")
    fsdp: FSDPConfig | None = None
    deepspeed: Path | dict[str, Any] | None = None  # a DeepSpeed JSON config (file or mapping), passed through
    _notes: list[str] = PrivateAttr(default_factory=list)  # how a LLaMA-Factory YAML was read

    @property
    def notes(self) -> list[str]:
        """What the user should see before the run: how a LLaMA-Factory config was mapped."""
        return self._notes

    @field_validator("methods", mode="before")
    @classmethod
    def _build_entries(cls, value: Any) -> Any:
        return HybridConfig.build_entries(value)

    @model_validator(mode="after")
    def _stages_name_known_entries(self) -> RunConfig:
        problems = stage_problems(self.stages or [], list(self.methods))
        if self.data.packing:
            problems += [f"data.packing: entry '{e}' ({c.type}) cannot train on packed rows; set packing: false"
                         for e, c in self.methods.items() if not c.supports_packing]  # fmt: skip
        if self.model_quantization is not None:
            problems += [f"methods.{e}: {c.type} needs the full-precision weights of its targets, and "
                         "model_quantization loads them quantized; use lora on a quantized base"
                         for e, c in self.methods.items() if not c.supports_quantized_base]  # fmt: skip
        if self.fsdp is not None and self.deepspeed is not None:
            problems.append("give either 'fsdp' or 'deepspeed', not both: each is a whole distribution engine")
        if self.fsdp is not None and self.training.base_dtype not in ("auto", "fp32"):
            problems.append(
                "fsdp shards each layer's weights as one group of one dtype, so the base stays fp32 and FSDP "
                "computes in training.precision: leave training.base_dtype at auto (or fp32)"
            )
        if self.model_quantization is not None and (self.fsdp is not None or self.deepspeed is not None):
            problems.append(
                "model_quantization is for one GPU per process (DDP); it cannot be sharded by fsdp/deepspeed"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def stage_list(self) -> list[StageConfig]:
        """The stages to run; without ``stages`` one stage trains every entry."""
        if self.stages:
            return self.stages
        return [
            StageConfig(
                name="train", train=list(self.methods), epochs=self.training.epochs, max_steps=self.training.max_steps
            )
        ]

    def hybrid_config(self) -> HybridConfig:
        return HybridConfig(methods=self.methods)

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


def stage_problems(stages: list[StageConfig], entries: list[str]) -> list[str]:
    problems = []
    names = [s.name for s in stages]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"stages: the stage name '{dup}' is used twice")
    for i, stage in enumerate(stages):
        for entry in stage.train:
            if entry not in entries:
                close = difflib.get_close_matches(entry, entries, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                problems.append(
                    f"stages.{i}.train: stage '{stage.name}' trains '{entry}', which is not a method entry{hint} "
                    f"(entries: {', '.join(entries)})"
                )
    return problems


class ConfigError(HybridTuneError, ValueError):
    """A run config has problems; ``problems`` lists every one of them."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        super().__init__(f"{source} has {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``key.sub=value`` strings applied to the raw YAML mapping (values parsed as YAML)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError([f"override '{item}' must look like key.path=value"], "command line")
        key, value = item.split("=", 1)
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError([f"override '{item}': '{part}' is not a mapping"], "command line")
        for other in same_option_keys(node, parts[-1]):  # lora_alpha in the YAML, alpha on the command line
            node.pop(other)
        node[parts[-1]] = yaml.safe_load(value)
    return raw


def same_option_keys(node: dict[str, Any], key: str) -> list[str]:
    """Other keys of a method entry that name the same option as ``key`` (its peft alias, say)."""
    kind = node.get("type")
    config_class = METHODS.get(kind) if isinstance(kind, str) else None
    if config_class is None:
        return []
    accepted = accepted_keys(config_class)
    field = accepted.get(key)
    return [k for k in node if k != key and field is not None and accepted.get(k) == field]


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file '{path}' does not exist"], str(path))
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {exc}"], str(path)) from None
    if not isinstance(raw, dict):
        raise ConfigError(["the top level must be a mapping of keys (model, methods, data, ...)"], str(path))
    return raw


def load_run_config(path: str | Path, overrides: list[str] = (), check_data: bool = True) -> RunConfig:
    """Parse, validate and (by default) check the data files; raise ConfigError listing every problem.

    Relative file paths (data, a DeepSpeed JSON) written in the file are resolved against the
    file's folder, those given in ``overrides`` (the command line) against the current directory,
    where the person typing them is; ``output`` always against the current directory.
    """
    raw, base, notes = read_yaml(path), Path(path).resolve().parent, []
    if is_llamafactory(raw):  # a LLaMA-Factory YAML: read as the equivalent run
        raw, notes, refused = convert(raw)
        if refused:
            raise ConfigError(refused, f"{path} (a LLaMA-Factory config)")
        base = Path.cwd()  # LLaMA-Factory resolves its paths against the current directory
    raw = _resolve_paths(raw, base)
    raw = _resolve_paths(apply_overrides(raw, list(overrides)), Path.cwd())  # only the overrides' are left relative
    problems: list[str] = []
    config = None
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as exc:
        entry_problems = method_problems(raw.get("methods"))  # every entry's, not only the first's
        problems += [p for p in describe_errors(exc) if not (entry_problems and p.startswith("methods:"))]
        problems += entry_problems
        # a field error stops pydantic before the cross-field stage check: run it on its own
        problems += [p for p in _raw_stage_problems(raw) if not any(p in q for q in problems)]
    if check_data:
        problems += data_problems(raw.get("data"))
    if problems:
        raise ConfigError(problems, str(path))
    config._notes = notes
    return config


def _resolve_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make the config's relative file paths absolute against ``base`` (in place; returns ``raw``)."""

    def absolute(value: Any) -> Any:
        if isinstance(value, str) and not Path(value).is_absolute():
            return str(base / value)
        return [absolute(v) for v in value] if isinstance(value, list) else value

    data = raw.get("data")
    if isinstance(data, dict):
        for key in DATA_PATH_KEYS:
            value = data.get(key)
            if key == "template" and not (isinstance(value, str) and ("/" in value or Path(value).suffix)):
                continue  # a template's name (or none), not a file
            if key in data:
                data[key] = absolute(value)
    if isinstance(raw.get("deepspeed"), str):
        raw["deepspeed"] = absolute(raw["deepspeed"])
    return raw


def method_problems(methods: Any) -> list[str]:
    """One line per method entry that does not validate (each entry checked on its own)."""
    if not isinstance(methods, dict):
        return []
    problems = []
    for name, entry in methods.items():
        try:
            HybridConfig.build_entries({name: entry})
        except ValueError as exc:
            problems.append(f"methods.{name}: {str(exc).removeprefix(f'method entry {name!r}: ')}")
    return problems


def _raw_stage_problems(raw: dict[str, Any]) -> list[str]:
    try:  # the entry names are known even when an entry itself is broken
        entries = list(raw["methods"]) if isinstance(raw.get("methods"), dict) else []
        stages = [StageConfig.model_validate(s) for s in raw.get("stages") or []]
    except (ValidationError, ValueError, TypeError):
        return []  # those sections are broken themselves, and already reported
    return stage_problems(stages, entries)


def data_problems(data: Any) -> list[str]:
    """Problems with the data themselves (missing or empty files, malformed records, datasets
    that dataset_info.json does not describe or describes as something hybridtune cannot train)."""
    try:
        cfg = DataConfig.model_validate(data)
    except ValidationError:
        return []  # already reported by the structural check
    problems = []
    for key in ("train", "eval"):
        for path in getattr(cfg, key):
            try:
                if not read_examples(path, cfg.format):
                    problems.append(f"data.{key}: '{path}' has no records")
            except DataError as exc:
                problems.append(f"data.{key}: {exc}")
    for key in ("dataset", "eval_dataset"):
        for name in getattr(cfg, key):
            try:
                if not read_datasets([name], cfg.dataset_dir, cfg.max_samples, seed=0):
                    problems.append(f"data.{key}: dataset '{name}' has no records")
            except DataError as exc:
                problems.append(f"data.{key}: {exc}")
    return problems
