"""Automatic rank search: a short generous-rank probe, then ranks per module that fit a budget.

1. Probe: train the run for a few steps with every LoRA entry at ``probe_rank``.
2. Importance: the singular values σ of each module's learned update s·B A; direction i of module
   m is worth σ_i² (the energy it carries) and costs in_m + out_m parameters.
3. Allocation: every module keeps at least rank 1; the remaining parameter budget goes to the
   directions with the most energy per parameter, greedily. The result is a ``rank_pattern`` per
   module (per layer and per projection).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from .run_config import ConfigError


def parse_budget(budget: str | float, base_params: int) -> int:
    """'0.5%' or 0.005 (a fraction of the base) or 120000 (parameters) -> a parameter count."""
    text = str(budget).strip()
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise ConfigError([f"budget '{budget}': expected like 0.5%, 0.005 or 120000"]) from None
    if value <= 0:
        raise ConfigError([f"budget '{budget}' must be positive"])
    return int(value * base_params) if value < 1 else int(value)


@dataclass
class ModuleSpectrum:
    entry: str
    module: str
    cost: int  # parameters per rank unit: in + out
    energy: list[float]  # σ_i², largest first


def spectra(model: Any) -> list[ModuleSpectrum]:
    """Singular-value energy of every LoRA module's learned update."""
    found = []
    for entry, cfg in model.entries.items():
        if not cfg.linear_low_rank:
            continue
        for _, target, _, branch in model.branches(entry):
            if branch.per_expert:
                why = "the rank search covers LoRA on linear layers only (give those tensors a rank in rank_pattern)"
                raise ConfigError([f"entry '{entry}' adapts the MoE expert tensors of {target}; {why}"])
            delta = branch.delta_weight()
            sigma = torch.linalg.svdvals(delta.float())
            found.append(ModuleSpectrum(entry, target, sum(branch.lora_A.shape[1:]) + branch.lora_B.shape[0],
                                        (sigma[: branch.rank] ** 2).tolist()))  # fmt: skip
    return found


def allocate(modules: list[ModuleSpectrum], budget: int) -> dict[str, dict[str, int]]:
    """Ranks per entry and module: rank 1 everywhere, then the best energy per parameter."""
    floor = sum(m.cost for m in modules)
    if budget < floor:
        raise ConfigError([f"a budget of {budget:,} parameters is below rank 1 on every module ({floor:,})"])
    ranks = {(m.entry, m.module): 1 for m in modules}
    left = budget - floor
    candidates = sorted(
        ((m.energy[i] / m.cost, m, i) for m in modules for i in range(1, len(m.energy))),
        key=lambda c: c[0],
        reverse=True,
    )
    for _, module, _ in candidates:
        if module.cost <= left:
            ranks[(module.entry, module.module)] += 1
            left -= module.cost
    result: dict[str, dict[str, int]] = {}
    for (entry, name), rank in ranks.items():
        result.setdefault(entry, {})[name] = rank
    return result


def uniform_rank(modules: list[ModuleSpectrum], budget: int) -> int:
    """The largest uniform rank that fits the same budget (for comparison)."""
    return max(1, budget // sum(m.cost for m in modules))


def searched_config(raw: dict[str, Any], ranks: dict[str, dict[str, int]]) -> dict[str, Any]:
    """The run YAML with each LoRA entry's ranks set per module."""
    out = yaml.safe_load(yaml.safe_dump(raw))
    for entry, per_module in ranks.items():
        common = max(set(per_module.values()), key=list(per_module.values()).count)
        method = out["methods"][entry]
        method["r"] = common
        method.pop("rank_pattern", None)
        method["rank_pattern"] = {name: r for name, r in per_module.items() if r != common}
    return out


def search(config_path: str | Path, budget: str | float, probe_steps: int = 20, probe_rank: int = 16,
           log=print) -> dict[str, Any]:  # fmt: skip
    """Run the probe for the run at ``config_path`` and return {ranks, budget, uniform, config}."""
    from .recipe import train
    from .run_config import load_run_config, read_yaml
    from .trained_sets import load_trained

    raw = read_yaml(config_path)
    config = load_run_config(config_path)
    loras = [e for e, c in config.methods.items() if c.linear_low_rank]
    if not loras:
        raise ConfigError([f"{config_path} has no LoRA entry whose ranks could be searched"])
    overrides = [f"output={config.output}-rank-probe", f"training.max_steps={probe_steps}", "stages=null",
                 "eval.before_training=false", "eval.metric=none", "training.save_every=null"]  # fmt: skip
    overrides += [f"methods.{e}.r={probe_rank}" for e in loras] + [f"methods.{e}.rank_pattern={{}}" for e in loras]
    probe = train(load_run_config(config_path, overrides), overwrite=True, log=log)
    model, _ = load_trained(probe.adapters_dir)
    modules = spectra(model)
    others = sum(c["total"] for e, c in model.trainable_parameters()["entries"].items() if e not in loras)
    total = parse_budget(budget, model.trainable_parameters()["base"])
    lora_budget = total - others
    ranks = allocate(modules, lora_budget)
    return {
        "ranks": ranks,
        "budget": total,
        "lora_budget": lora_budget,
        "uniform_rank": uniform_rank(modules, lora_budget),
        "used": sum(m.cost * ranks[m.entry][m.module] for m in modules),
        "config": searched_config(raw, ranks),
    }
