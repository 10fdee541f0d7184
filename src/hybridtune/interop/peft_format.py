"""Reading and writing peft's adapter format, so peft, vLLM and friends can use our entries.

This module knows peft's files and the keys every peft config has; each method with a
``peft_type`` (see methods/base.py) knows its own keys and tensors. One peft adapter holds one
peft method, so an export writes entries of one method (several LoRA entries become one LoRA of
summed rank); entries without a peft equivalent are refused unless left out explicitly.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import nn

from ..core.adapter_io import atomic_write
from ..core.base_models import EMBEDDED_NAME, resolve_model
from ..core.config import HybridConfig
from ..core.errors import CheckpointError
from ..core.model import HybridModel, inject
from ..methods import METHODS, MethodConfig

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
# the keys of peft's PeftConfig that every method's config has: metadata, no effect on the function
_GENERIC = {"peft_type", "task_type", "peft_version", "auto_mapping", "base_model_name_or_path", "revision",
            "inference_mode"}  # fmt: skip


def _method_for(peft_config: dict[str, Any]) -> type[MethodConfig] | None:
    """The registered method that reads this peft adapter (the first, in registry order)."""
    return next((cls for cls in METHODS.values() if cls.peft_type and cls.peft_accepts(peft_config)), None)


def peft_config_problems(peft_config: dict[str, Any]) -> list[str]:
    """Every key of a peft adapter config that ``import_peft`` cannot reproduce exactly, by name."""
    method = _method_for(peft_config)
    if method is None:
        known = sorted({cls.peft_type for cls in METHODS.values() if cls.peft_type})
        return [f"peft_type {peft_config.get('peft_type')!r} is not supported (supported: {', '.join(known)})"]
    return method.peft_problems({k: v for k, v in peft_config.items() if k not in _GENERIC})


def peft_exportable(model: HybridModel) -> list[str]:
    """The entries of the active set that have a peft equivalent."""
    return [e for e, cfg in model.hybrid_config.methods.items() if cfg.peft_type]


def _chosen_entries(model: HybridModel, entries: list[str] | None) -> list[str]:
    methods = model.hybrid_config.methods
    exportable = peft_exportable(model)
    if entries is None:
        others = [e for e in methods if e not in exportable]
        kinds = ", ".join(f"'{e}' ({methods[e].type})" for e in others)
        if others and not exportable:
            peft_methods = ", ".join(kind for kind, cls in METHODS.items() if cls.peft_type)
            raise ValueError(f"no entry of this model has a peft equivalent: {kinds} (peft holds: {peft_methods})")
        if others:  # a silent partial export would compute something else
            raise ValueError(
                f"entries {kinds} have no equivalent in peft's format, so the export would not compute what "
                f"this model computes; export the rest alone explicitly with entries={exportable} "
                f"(hybridtune export --only {','.join(exportable) or 'ENTRY'})"
            )
        entries = exportable
    wrong = [e for e in entries if e not in exportable]
    if wrong:
        raise ValueError(
            f"entries without a peft equivalent (or not in this model): {', '.join(wrong)} "
            f"(exportable entries: {', '.join(exportable) or 'none'})"
        )
    if not entries:
        raise ValueError("this model has no entry to export in peft's format")
    classes = {type(methods[e]) for e in entries}
    if len(classes) > 1:
        kinds = ", ".join(f"'{e}' ({methods[e].type})" for e in entries)
        raise ValueError(
            f"entries {kinds} are different peft methods, and one peft adapter holds one; "
            f"export them one method at a time (entries=[...], hybridtune export --only ...)"
        )
    return list(entries)


def export_peft(model: HybridModel, directory: str | Path, entries: list[str] | None = None) -> Path:
    """Write the active set as one peft adapter directory. Every entry must have a peft
    equivalent, of one peft method (entries of other methods would be lost, and the export would
    compute something else): refused, unless ``entries`` names the entries to export explicitly."""
    directory = Path(directory)
    chosen = _chosen_entries(model, entries)
    method = type(model.hybrid_config.methods[chosen[0]])
    branches: dict[str, list] = {e: [] for e in chosen}
    for entry, target, _, branch in model.branches():
        if entry in branches:
            branches[entry].append((target, branch))
    peft_keys, per_module = method.to_peft([(model.hybrid_config.methods[e], branches[e]) for e in chosen])
    peft_config = {
        "peft_type": method.peft_type,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": _resolvable(getattr(model.base_model.config, "_name_or_path", None)),
        **peft_keys,
        "inference_mode": True,
    }
    tensors = {
        f"{_PEFT_PREFIX}{target}.{name}": tensor.cpu().contiguous()
        for target, named in per_module.items()
        for name, tensor in named.items()
    }
    atomic_write(directory / PEFT_WEIGHTS, save(tensors, metadata={"format": "pt"}))
    atomic_write(directory / PEFT_CONFIG, (json.dumps(peft_config, indent=2) + "\n").encode())
    return directory


def _resolvable(name: str | None) -> str | None:
    """The base's name as other tools can open it: the embedded model's short name becomes its
    directory (a hub id or a path stays as it is)."""
    if name == EMBEDDED_NAME:
        return resolve_model(name)
    return name or None


def _per_module(raw: dict[str, torch.Tensor], method: type[MethodConfig], path: Path) -> dict[str, dict]:
    """Saved tensors grouped by module name: {module: {tensor name: tensor}}."""
    grouped: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in raw.items():
        key = re.sub(r"\.default(?=\.weight$|$)", "", key)  # a state dict saved with peft's adapter name
        name = next((n for n in method.peft_tensor_names if key.endswith(f".{n}")), None)
        if name is None:
            raise CheckpointError(
                f"{path}: key '{key}' is not a tensor of peft's {method.peft_type} "
                f"(expected MODULE.{{{', '.join(method.peft_tensor_names)}}})"
            )
        module = key.removeprefix(_PEFT_PREFIX).removesuffix(f".{name}")
        depth = 0  # peft nests its wrappers of one module's tensors (target_parameters) as base_layer.base_layer...
        while module.endswith(".base_layer"):
            module, depth = module.removesuffix(".base_layer"), depth + 1
        grouped[module]["base_layer." * depth + name] = tensor
    return grouped


def import_peft(model: nn.Module, directory: str | Path, entry: str = "lora", trainable: bool = False) -> HybridModel:
    """Load a peft adapter directory (LoRA, DoRA or IA3) as an entry named ``entry`` (added to a
    HybridModel or injected into a plain base model). Targets and ranks come from the weights."""
    directory = Path(directory)
    config_path, weights_path = directory / PEFT_CONFIG, directory / PEFT_WEIGHTS
    if not config_path.is_file():
        raise CheckpointError(f"no {PEFT_CONFIG} in '{directory}': not a peft adapter directory")
    if not weights_path.is_file():
        pickled = " (only a pickled adapter_model.bin is there, which hybridtune never loads)"
        raise CheckpointError(
            f"no {PEFT_WEIGHTS} in '{directory}'{pickled if (directory / 'adapter_model.bin').exists() else ''}"
        )
    peft_config = json.loads(config_path.read_text())
    problems = peft_config_problems(peft_config)
    if problems:
        raise CheckpointError(f"{config_path}: {'; '.join(problems)}")
    method = _method_for(peft_config)
    try:
        raw = load_file(str(weights_path))
    except Exception as exc:
        raise CheckpointError(f"{weights_path} is corrupt or truncated: {exc}") from exc
    tensors = _per_module(raw, method, weights_path)
    try:
        config = method.from_peft(peft_config, tensors)
    except ValueError as exc:
        raise CheckpointError(f"{weights_path}: {exc}") from exc
    hybrid = inject(model, HybridConfig(methods={entry: config}))
    with torch.no_grad():
        for _, target, module, branch in hybrid.branches(entry):
            try:
                config.load_peft(branch, module, tensors[target])
            except ValueError as exc:
                hybrid.delete_entry(entry)
                raise CheckpointError(f"{weights_path}: module '{target}': {exc}") from exc
            branch.requires_grad_(trainable)
    return hybrid
