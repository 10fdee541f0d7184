"""Reading and writing peft's LoRA adapter format, so peft, vLLM and friends can use our LoRA.

Only LoRA travels: other methods have no peft equivalent that loads into the same graph.
Several LoRA entries on the same module are exported as one LoRA whose rank is the sum
(A stacked, B side by side with each entry's scale folded in) — the same function exactly.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import nn

from ..core.adapter_io import atomic_write
from ..core.config import HybridConfig
from ..core.errors import CheckpointError
from ..core.model import HybridModel, inject
from ..core.targeting import linear_features
from ..methods.base import Branch
from ..methods.lora import exact_config, stack_deltas

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
# Every key of peft's LoraConfig, and what import_peft does with it (tests/interop checks each
# against peft itself). Reproduced: the saved tensors and these keys give exactly peft's function.
_REPRODUCED = {
    "r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "lora_dropout", "fan_in_fan_out",
    # the saved tensors name exactly the modules these chose:
    "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
}  # fmt: skip
# Metadata and run-time settings that do not change what the adapter computes.
_NO_EFFECT = {
    "task_type", "peft_version", "auto_mapping", "base_model_name_or_path", "revision", "inference_mode",
    "runtime_config", "megatron_core", "qalora_group_size", "ensure_weight_tying", "eva_config",
}  # fmt: skip
# Accepted only at these values; anything else changes the function in a way a plain LoRA entry
# does not reproduce, and is refused by name.
_ONLY = {
    "bias": ("none",),
    "modules_to_save": (None, []),
    # initialisations that leave the base weights alone (the saved A and B are what counts);
    # pissa, olora, corda, loftq and lora-ga rewrite the base weights too
    "init_lora_weights": (True, False, "gaussian", "eva", "orthogonal"),
    "loftq_config": (None, {}),
    "corda_config": (None,),
    "lora_ga_config": (None,),
    "use_dora": (False, None),
    "alora_invocation_tokens": (None, []),
    "use_qalora": (False, None),
    "trainable_token_indices": (None, [], {}),
    "layer_replication": (None, []),
    "lora_bias": (False, None),
    "target_parameters": (None, []),
    "megatron_config": (None,),
    "velora_config": (None,),
    "monteclora_config": (None,),
    "use_bdlora": (False, None),
    "arrow_config": (None,),
    "kasa_config": (None,),
}
_WHY = {
    "init_lora_weights": "this initialisation rewrites the base weights too, which the adapter files do not hold",
    "alora_invocation_tokens": "activated LoRA applies only after its invocation tokens, a LoRA entry everywhere",
    "use_dora": "importing DoRA adapters is not supported yet",
    "target_parameters": "LoRA on parameters (MoE experts) is not supported yet",
}


def peft_config_problems(peft_config: dict[str, Any]) -> list[str]:
    """Every key of a peft LoRA config that ``import_peft`` cannot reproduce exactly, by name."""
    problems = []
    for key, value in peft_config.items():
        if key == "peft_type" or key in _REPRODUCED or key in _NO_EFFECT:
            continue
        allowed = _ONLY.get(key)
        if allowed is None:  # a key this version does not know: harmless only when unset
            if value in (None, False, {}, [], ""):
                continue
            problems.append(f"'{key}': {value!r} is a peft option import_peft does not know")
        elif value not in allowed:
            why = _WHY.get(key, "a plain LoRA entry does not compute the same")
            problems.append(f"'{key}': {value!r} is not supported ({why}; supported: {list(allowed)})")
    return problems


def _lora_entries(model: HybridModel, entries: list[str] | None) -> list[str]:
    loras = [e for e, cfg in model.hybrid_config.methods.items() if cfg.linear_low_rank]
    others = [e for e in model.hybrid_config.methods if e not in loras]
    if entries is None and others:  # a silent partial export would compute something else
        kinds = ", ".join(f"'{e}' ({model.hybrid_config.methods[e].type})" for e in others)
        raise ValueError(
            f"entries {kinds} have no equivalent in peft's LoRA format, so the export would not compute what "
            f"this model computes; export the LoRA part alone explicitly with entries={loras} "
            f"(hybridtune export --only {','.join(loras) or 'ENTRY'})"
        )
    if entries is not None:
        wrong = [e for e in entries if e not in loras]
        if wrong:
            raise ValueError(f"not LoRA entries of this model: {', '.join(wrong)} (LoRA entries: {', '.join(loras)})")
        loras = list(entries)
    if not loras:
        raise ValueError("this model has no LoRA entry to export in peft's format")
    return loras


def export_peft(model: HybridModel, directory: str | Path, entries: list[str] | None = None) -> Path:
    """Write the active set as one peft LoRA adapter directory. Every entry must be LoRA (entries
    of other methods would be lost, and the export would compute something else): refused, unless
    ``entries`` names the LoRA entries to export explicitly."""
    directory = Path(directory)
    chosen = _lora_entries(model, entries)
    per_module: dict[str, list[Branch]] = defaultdict(list)
    transposed = False
    for entry, target, _, branch in model.branches():
        if entry in chosen:
            per_module[target].append(branch)
            transposed |= branch.transposed
    configs = [model.hybrid_config.methods[e] for e in chosen]
    stacked = any(len(b) > 1 for b in per_module.values()) or len({c.use_rslora for c in configs}) > 1
    use_rslora = configs[0].use_rslora and not stacked

    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for target, branches in per_module.items():
        if stacked:
            a, bb = stack_deltas([(b, 1.0) for b in branches])
            ranks[target], alphas[target] = a.shape[0], float(a.shape[0])
        else:
            (b,) = branches
            a, bb = b.A.detach(), b.B.detach()
            ranks[target], alphas[target] = b.rank, peft_alpha_for(b, use_rslora)
        tensors[f"{_PEFT_PREFIX}{target}.lora_A.weight"] = a.cpu().contiguous()
        tensors[f"{_PEFT_PREFIX}{target}.lora_B.weight"] = bb.cpu().contiguous()

    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    dropouts = {c.dropout for c in configs}
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": getattr(model.base_model.config, "_name_or_path", None) or None,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": max(dropouts),
        "target_modules": sorted(per_module),
        "rank_pattern": {re.escape(t): v for t, v in ranks.items() if v != r},
        "alpha_pattern": {re.escape(t): v for t, v in alphas.items() if v != alpha},
        "use_rslora": use_rslora,
        "fan_in_fan_out": transposed,
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    atomic_write(directory / PEFT_WEIGHTS, save(tensors, metadata={"format": "pt"}))
    atomic_write(directory / PEFT_CONFIG, (json.dumps(peft_config, indent=2) + "\n").encode())
    return directory


def peft_alpha_for(branch: Branch, use_rslora: bool) -> float:
    """The lora_alpha with which peft computes this branch's scale at its current rank: its own
    alpha, except after a growing rank moved on (the scale stays alpha/start, see RankSchedule)."""
    own = branch.alpha / (branch.rank**0.5 if use_rslora else branch.rank)
    if abs(own - branch.scale) <= 1e-12 * abs(branch.scale):
        return float(branch.alpha)
    return float(branch.scale * (branch.rank**0.5 if use_rslora else branch.rank))


def _peft_alpha(peft_config: dict[str, Any], target: str) -> float:
    """peft's own rule: the first alpha_pattern key that matches the end of the module name."""
    for key, value in (peft_config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", target):
            return float(value)
    return float(peft_config.get("lora_alpha", 8))


def import_peft(model: nn.Module, directory: str | Path, entry: str = "lora", trainable: bool = False) -> HybridModel:
    """Load a peft LoRA adapter directory as a LoRA entry named ``entry`` (added to a HybridModel
    or injected into a plain base model). Targets and ranks come from the weights themselves."""
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
    if peft_config.get("peft_type") != "LORA":
        raise CheckpointError(
            f"{config_path}: peft_type is {peft_config.get('peft_type')!r}; only LORA can be imported"
        )
    problems = peft_config_problems(peft_config)
    if problems:
        raise CheckpointError(f"{config_path}: {'; '.join(problems)}")
    try:
        raw = load_file(str(weights_path))
    except Exception as exc:
        raise CheckpointError(f"{weights_path} is corrupt or truncated: {exc}") from exc

    pairs: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in raw.items():
        match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if not match:
            raise CheckpointError(f"{weights_path}: key '{key}' is not a LoRA A/B weight")
        pairs[match.group(1)][match.group(2)] = tensor
    ranks = {t: ab["A"].shape[0] for t, ab in pairs.items()}
    alphas = {t: _peft_alpha(peft_config, t) for t in pairs}
    lora = exact_config(
        ranks,
        alphas,
        dropout=float(peft_config.get("lora_dropout", 0.0)),
        use_rslora=bool(peft_config.get("use_rslora", False)),
    )
    hybrid = inject(model, HybridConfig(methods={entry: lora}))
    with torch.no_grad():
        for _, target, module, branch in hybrid.branches(entry):
            a, b = pairs[target]["A"], pairs[target]["B"]
            fan_in, fan_out = linear_features(module)
            if tuple(a.shape) != (branch.rank, fan_in) or tuple(b.shape) != (fan_out, branch.rank):
                hybrid.delete_entry(entry)
                raise CheckpointError(
                    f"{weights_path}: module '{target}' has lora_A {list(a.shape)} / lora_B {list(b.shape)}, "
                    f"but the layer is {fan_in} -> {fan_out}"
                )
            branch.lora_A.copy_(a)
            branch.lora_B.copy_(b)
            branch.requires_grad_(trainable)
    return hybrid
