"""A LLaMA-Factory training YAML (``stage: sft``, ``finetuning_type: lora``, ...) read as the
equivalent hybridtune run, with LLaMA-Factory's and transformers' Trainer defaults where a key
is absent, so the same file trains the same way. Every key is mapped, has no effect here (said
so in the mapping), or is refused once with what to do. ``adapter_after: mlp`` is our one-line
extension: it adds a bottleneck Adapter next to the LoRA, which LLaMA-Factory cannot train.
The method entries come from the methods themselves (``MethodConfig.from_llamafactory``, with the
keys and defaults each reads in ``llamafactory_defaults``); this module knows the rest of the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, get_args

import yaml

MARKERS = ("stage", "finetuning_type", "model_name_or_path")

# LLaMA-Factory's / transformers.TrainingArguments' defaults for what a hybridtune run needs (the
# methods' own keys: their llamafactory_defaults)
_DEFAULTS = {
    "cutoff_len": 2048, "dataset_dir": "data", "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
    "learning_rate": 5e-5, "num_train_epochs": 3.0, "lr_scheduler_type": "linear", "warmup_ratio": 0.0,
    "weight_decay": 0.0, "max_grad_norm": 1.0, "seed": 42, "logging_steps": 500, "save_steps": 500,
    "save_total_limit": None, "per_device_eval_batch_size": 8, "disable_gradient_checkpointing": False,
    "output_dir": "trainer_output", "packing": False, "use_unsloth_gc": False,
}  # fmt: skip
# key -> where it goes in the hybridtune YAML
_DIRECT = {
    "model_name_or_path": "model", "dataset": "data.dataset", "eval_dataset": "data.eval_dataset",
    "dataset_dir": "data.dataset_dir", "cutoff_len": "data.max_length", "max_samples": "data.max_samples",
    "packing": "data.packing", "default_system": "data.system",
    "per_device_train_batch_size": "training.batch_size", "gradient_accumulation_steps": "training.grad_accum",
    "learning_rate": "training.lr", "num_train_epochs": "training.epochs", "warmup_ratio": "training.warmup_ratio",
    "weight_decay": "training.weight_decay", "max_grad_norm": "training.max_grad_norm", "seed": "training.seed",
    "logging_steps": "training.log_every", "save_steps": "training.save_every", "eval_steps": "training.eval_every",
    "save_total_limit": "training.keep_checkpoints", "per_device_eval_batch_size": "eval.batch_size",
    "output_dir": "output", "deepspeed": "deepspeed", "enable_liger_kernel": "training.liger_kernels",
}  # fmt: skip
# keys convert() reads itself
_READ = {
    "val_size", "max_steps", "lr_scheduler_type", "bf16", "fp16", "pure_bf16", "quantization_bit", "quantization_type",
    "double_quantization", "template", "disable_gradient_checkpointing", "neat_packing",
    "use_unsloth_gc",
}  # fmt: skip
# keys that change nothing a hybridtune run computes, at any value
_NO_EFFECT = {
    "trust_remote_code", "overwrite_cache", "preprocessing_num_workers", "preprocessing_batch_size",
    "dataloader_num_workers", "plot_loss", "overwrite_output_dir", "save_only_model", "report_to", "ddp_timeout",
    "logging_dir", "run_name", "eval_strategy", "evaluation_strategy", "use_fast_tokenizer", "low_cpu_mem_usage",
    "print_param_status", "flash_attn", "tf32", "use_cache", "do_eval",
}  # fmt: skip
# keys accepted only at these values (what hybridtune does); anything else is refused with what to do
_ONLY: dict[str, tuple] = {
    "stage": ("sft",), "finetuning_type": ("lora",), "do_train": (True,), "do_predict": (False,),
    "resume_from_checkpoint": (None,), "save_strategy": ("steps",), "logging_strategy": ("steps",),
    "mix_strategy": ("concat",), "train_on_prompt": (False,), "mask_history": (False,), "streaming": (False,),
    "quantization_method": ("bnb", "bitsandbytes"), "create_new_adapter": (False,), "additional_target": (None,),
    "pissa_init": (False,), "loraplus_lr_ratio": (None,), "use_unsloth": (False,),
    "tokenized_path": (None,), "adapter_name_or_path": (None,),
    "upcast_layernorm": (False,), "use_galore": (False,), "use_badam": (False,), "use_apollo": (False,),
    "use_llama_pro": (False,), "load_best_model_at_end": (False,), "warmup_steps": (0,),
}  # fmt: skip
_WHAT_TO_DO = {
    "stage": "hybridtune trains supervised fine-tuning (stage: sft) only",
    "finetuning_type": "hybridtune trains adapters (finetuning_type: lora); full and freeze tuning are not supported",
    "do_train": "for evaluation only, use `hybridtune eval CONFIG --adapters DIR`",
    "adapter_name_or_path": "training on top of existing adapters: not supported from this YAML yet",
    "resume_from_checkpoint": "a run resumes by itself: train the same YAML again with the same output_dir",
    "pissa_init": "PiSSA rewrites the base weights; not supported",
    "loraplus_lr_ratio": "LoRA+ learning rates are not supported; remove the key",
    "additional_target": "extra fully trained modules (modules_to_save) are not supported",
    "train_on_prompt": "hybridtune trains on assistant turns only",
    "mask_history": "hybridtune trains every assistant turn, history included",
    "quantization_method": "hybridtune quantizes with bitsandbytes only",
    "warmup_steps": "give warmup_ratio instead (the share of the run's steps)",
}


def is_llamafactory(raw: dict[str, Any]) -> bool:
    """A LLaMA-Factory config has its own top-level keys and none of hybridtune's ``methods``."""
    return "methods" not in raw and any(key in raw for key in MARKERS)


def _put(out: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for part in parents:
        out = out.setdefault(part, {})
    out[last] = value


def _schedulers() -> tuple[str, ...]:
    """The LR schedules training.scheduler takes (run_config imports this module, hence here)."""
    from .run_config import TrainingConfig

    return get_args(TrainingConfig.model_fields["scheduler"].annotation)


def _targets(value: Any) -> str | list[str]:
    names = [n.strip() for n in value.split(",")] if isinstance(value, str) else list(value)
    return "all-linear" if names == ["all"] else names


def _method_keys() -> dict[str, Any]:
    """Every registered method's LLaMA-Factory keys with their defaults."""
    from ..methods import METHODS

    return {k: v for cls in METHODS.values() for k, v in cls.llamafactory_defaults.items()}


def _methods(values: dict[str, Any], given: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """The method entries the YAML asks for, each built by its method."""
    from ..methods import METHODS

    methods: dict[str, Any] = {}
    for cls in METHODS.values():
        try:
            found = cls.from_llamafactory(values, given)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        if found is not None:
            methods[found[0]] = found[1]
    return methods


def convert(raw: dict[str, Any]) -> tuple[dict[str, Any], list[str], list[str]]:
    """(hybridtune YAML mapping, the mapping lines to show, problems each with what to do)."""
    given = dict(raw)
    method_keys = _method_keys()
    values = {**_DEFAULTS, **method_keys, **given}
    out: dict[str, Any] = {}
    shown: list[str] = []
    problems: list[str] = []
    for key, value in given.items():
        if key in _DIRECT or key in _READ or key in _NO_EFFECT or key in method_keys:
            continue
        if key in _ONLY:
            if value not in _ONLY[key]:
                problems.append(f"{key}: {value!r}: {_WHAT_TO_DO.get(key, 'it has no equivalent in hybridtune')}")
            continue
        problems.append(f"{key}: a LLaMA-Factory key with no equivalent in hybridtune; remove it")
    for key, path in _DIRECT.items():
        if values.get(key) is not None:
            _put(out, path, values[key])
    out["methods"] = _methods(values, given, problems)
    if values.get("neat_packing"):  # packing without cross-attention: what data.packing does
        _put(out, "data.packing", True)
    elif given.get("packing"):
        shown.append("packing: true -> packed rows without cross-attention between examples (LLaMA-Factory's "
                     "neat_packing; its plain packing lets packed examples attend to each other)")  # fmt: skip
    if values.get("val_size"):
        _put(out, "data.eval_split", values["val_size"])
    if (values.get("max_steps") or -1) > 0:
        _put(out, "training.max_steps", values["max_steps"])
    scheduler, supported = values["lr_scheduler_type"], _schedulers()
    if scheduler not in supported:
        problems.append(f"lr_scheduler_type: {scheduler!r}: supported are {', '.join(supported)}")
    _put(out, "training.scheduler", scheduler)
    bf16 = bool(values.get("bf16") or values.get("pure_bf16"))
    precision = "bf16" if bf16 else "fp16" if values.get("fp16") else "fp32"
    _put(out, "training.precision", precision)
    if values.get("pure_bf16"):
        _put(out, "training.base_dtype", "bf16")
    _put(out, "training.gradient_checkpointing", not values["disable_gradient_checkpointing"])
    if values["use_unsloth_gc"] and values["disable_gradient_checkpointing"]:  # read only with checkpointing
        shown.append("use_unsloth_gc: true has no effect with disable_gradient_checkpointing: true (LLaMA-Factory)")
    elif values["use_unsloth_gc"]:  # Unsloth's checkpointing keeps each layer's input in CPU memory
        _put(out, "training.offload_activations", True)
        shown.append("use_unsloth_gc: true -> training.offload_activations: the checkpointed layer inputs wait in "
                     "CPU memory, as in Unsloth's gradient checkpointing")  # fmt: skip
    if values.get("quantization_bit"):
        _put(out, "model_quantization", {
            "bits": values["quantization_bit"], "type": values.get("quantization_type") or "nf4",
            "double_quant": values.get("double_quantization", True),
            "compute_dtype": precision})  # fmt: skip
    _put(out, "eval.metric", "none")  # LLaMA-Factory's SFT evaluates the loss only, after training
    _put(out, "eval.before_training", False)
    if given.get("eval_strategy", given.get("evaluation_strategy")) == "steps" and "eval_steps" not in given:
        _put(out, "training.eval_every", values["logging_steps"])  # Trainer's default for eval_steps
    if "template" in given:
        shown.append(f"template: {given['template']!r} -> the tokenizer's own chat template (LLaMA-Factory's named "
                     "templates are its code; set data.system if you relied on its default system prompt)")  # fmt: skip
    defaults = {**_DEFAULTS, **method_keys}
    for key in sorted(set(defaults) - set(given)):
        if defaults[key] is not None and (key in _DIRECT or key in method_keys or key in (
                "lr_scheduler_type", "disable_gradient_checkpointing")):  # fmt: skip
            shown.append(f"{key} not given: LLaMA-Factory's default {defaults[key]!r}")
    mapped = [f"{k} -> {_DIRECT[k]}" for k in given if k in _DIRECT]
    entries = [f"{name} ({entry['type']})" for name, entry in out["methods"].items()]
    used = sorted(k for k in given if k in method_keys)
    shown.insert(0, f"read as: {', '.join(mapped)}; method entries {', '.join(entries)} from "
                    f"{', '.join(used) or 'LLaMA-Factory defaults'}")  # fmt: skip
    ignored = sorted(k for k in given if k in _NO_EFFECT or (k in _ONLY and given[k] in _ONLY[k]))
    if ignored:
        shown.append(f"no effect on what hybridtune computes: {', '.join(ignored)}")
    return out, shown, problems


def write_converted(config: Path, out: Path) -> list[str]:
    """Convert the LLaMA-Factory YAML ``config`` into a hybridtune YAML at ``out`` (its paths, which
    LLaMA-Factory reads from the current directory, rewritten relative to ``out``); the notes."""
    from ..core.adapter_io import atomic_write
    from .run_config import ConfigError, load_run_config, read_yaml

    raw = read_yaml(config)
    if not is_llamafactory(raw):
        raise ConfigError([f"not a LLaMA-Factory config (none of its keys {', '.join(MARKERS)})"], str(config))
    converted, notes, refused = convert(raw)
    if refused:
        raise ConfigError(refused, f"{config} (a LLaMA-Factory config)")
    here = Path.cwd()

    def relative(value: str) -> str:
        return os.path.relpath(here / value, out.resolve().parent)

    data = converted.get("data", {})
    for key in ("dataset_dir",):
        if isinstance(data.get(key), str) and not Path(data[key]).is_absolute():
            data[key] = relative(data[key])
    if isinstance(converted.get("deepspeed"), str) and not Path(converted["deepspeed"]).is_absolute():
        converted["deepspeed"] = relative(converted["deepspeed"])
    text = f"# converted from {config} by hybridtune convert\n" + yaml.safe_dump(converted, sort_keys=False)
    atomic_write(out, text.encode())
    load_run_config(out, check_data=False)  # what was written is a valid run
    return notes
