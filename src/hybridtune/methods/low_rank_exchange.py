"""How low-rank entries (LoRA, and DoRA as peft's ``use_dora``) are exchanged: peft's LoRA adapter
format, and one exact LoRA for several (set merging).

Which keys of peft's LoraConfig an import reproduces and which it refuses by name, how a saved
adapter becomes one entry that targets exactly the saved modules, and how entries become one
adapter: several LoRA entries on one module are written as one LoRA whose rank is the sum (A
stacked, B side by side with each entry's scale folded in) — the same function exactly.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, ClassVar

import torch
from torch import nn

from ..core.experts import PROJECTIONS
from ..core.targeting import linear_features
from .base import peft_key_problems
from .lora_experts import expert_from_peft, expert_to_peft

# Every key of peft's LoraConfig and what an import does with it (tests/interop checks each against
# peft itself). Reproduced: the saved tensors and these keys give exactly peft's function.
_REPRODUCED = {
    "r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "lora_dropout", "fan_in_fan_out",
    # the saved tensors name exactly the modules these chose:
    "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
    "use_dora",  # chooses the method (LoRA or DoRA) that reads the adapter
    "target_parameters",  # LoRA on fused MoE expert tensors (methods/lora_experts.py)
}  # fmt: skip
# Run-time settings that do not change what the adapter computes.
_NO_EFFECT = {"runtime_config", "megatron_core", "qalora_group_size", "ensure_weight_tying", "eva_config"}
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
    "alora_invocation_tokens": (None, []),
    "use_qalora": (False, None),
    "trainable_token_indices": (None, [], {}),
    "layer_replication": (None, []),
    "lora_bias": (False, None),
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
}


def stack_deltas(parts: list[tuple[nn.Module, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of one scale-1 LoRA equal to Σ w·s·B A over ``parts`` (low-rank branches) exactly:
    A = [A1; A2; ...], B = [w1 s1 B1, w2 s2 B2, ...]. Its rank is the sum of the ranks."""
    a = torch.cat([branch.A.detach() for branch, _ in parts], dim=0)
    b = torch.cat([branch.B.detach() * (branch.scale * weight) for branch, weight in parts], dim=1)
    return a, b


def peft_alpha_for(branch: nn.Module, use_rslora: bool) -> float:
    """The lora_alpha with which peft computes this branch's scale at its current rank: its own
    alpha, except after a growing rank moved on (the scale stays alpha/start, see RankSchedule)."""
    own = branch.alpha / (branch.rank**0.5 if use_rslora else branch.rank)
    if abs(own - branch.scale) <= 1e-12 * abs(branch.scale):
        return float(branch.alpha)
    return float(branch.scale * (branch.rank**0.5 if use_rslora else branch.rank))


def _peft_value(peft_config: dict[str, Any], field: str, target: str, default: Any) -> Any:
    """peft's own rule: the first key of a pattern field that matches the end of the name."""
    for key, value in (peft_config.get(field) or {}).items():
        if re.match(rf"(.*\.)?({key})$", target):
            return value
    return default


def _peft_alpha(peft_config: dict[str, Any], target: str) -> float:
    return float(_peft_value(peft_config, "alpha_pattern", target, peft_config.get("lora_alpha", 8)))


def _peft_expert_tensors(peft_config: dict[str, Any], module: str) -> list[str]:
    """The tensors of ``module`` that peft's ``target_parameters`` adapts (peft's suffix rule): the
    expert projections in the order experts modules define them, or ``weight`` (a router)."""
    wanted = peft_config.get("target_parameters") or []
    full = {p: f"{module}.{p}" for p in (*PROJECTIONS, "weight")}
    return [p for p, name in full.items() if any(name == t or name.endswith("." + t) for t in wanted)]


def _most_common(values: dict[str, Any]) -> Any:
    return Counter(values.values()).most_common(1)[0][0]


class LowRankExchange:
    """The exchange side of a low-rank method config (mixed into LowRankConfig)."""

    peft_type: ClassVar[str | None] = "LORA"
    peft_tensor_names: ClassVar[tuple[str, ...]] = ("lora_A.weight", "lora_B.weight")
    peft_use_dora: ClassVar[bool] = False  # the value of peft's use_dora this method reads and writes

    stack_deltas = staticmethod(stack_deltas)
    # LLaMA-Factory's finetuning_type: lora (use_dora chooses LoRA or DoRA); lora_alpha None: rank * 2
    llamafactory_defaults: ClassVar[dict[str, Any]] = {
        "lora_rank": 8, "lora_alpha": None, "lora_dropout": 0.0, "lora_target": "all", "use_rslora": False,
        "use_dora": False,
    }  # fmt: skip

    @classmethod
    def from_llamafactory(cls, values: dict[str, Any], given: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
        if bool(values["use_dora"]) != cls.peft_use_dora:
            return None
        target = values["lora_target"]
        names = [n.strip() for n in target.split(",")] if isinstance(target, str) else list(target)
        rank = values["lora_rank"]
        return "lora", {
            "type": cls.model_fields["type"].default, "r": rank, "alpha": values["lora_alpha"] or 2 * rank,
            "dropout": values["lora_dropout"], "use_rslora": values["use_rslora"],
            "targets": "all-linear" if names == ["all"] else names,
        }  # fmt: skip

    @classmethod
    def exact(cls, ranks: dict[str, int], alphas: dict[str, float], **kwargs):
        """A config of this method that targets exactly these module names with these ranks and alphas."""
        r, alpha = _most_common(ranks), _most_common(alphas)
        return cls(
            r=r,
            alpha=alpha,
            targets=sorted(ranks),
            rank_pattern={t: v for t, v in ranks.items() if v != r},
            alpha_pattern={t: v for t, v in alphas.items() if v != alpha},
            **kwargs,
        )

    @classmethod
    def peft_accepts(cls, peft_config: dict[str, Any]) -> bool:
        return peft_config.get("peft_type") == cls.peft_type and bool(peft_config.get("use_dora")) == cls.peft_use_dora

    @classmethod
    def peft_problems(cls, peft_config: dict[str, Any]) -> list[str]:
        return peft_key_problems(peft_config, _REPRODUCED | _NO_EFFECT, _ONLY, _WHY)

    @classmethod
    def from_peft(cls, peft_config: dict[str, Any], tensors: dict[str, dict[str, torch.Tensor]]):
        ranks, alphas = {}, {}
        for target, named in tensors.items():
            experts = _peft_expert_tensors(peft_config, target)
            if experts == ["weight"]:  # a router's weight: plain LoRA tensors, keyed by the parameter
                ranks[target] = named["lora_A.weight"].shape[0]
                alphas[target] = _peft_alpha(peft_config, f"{target}.weight")
                continue
            if experts:  # per-expert factors: one target per tensor, its rank from peft's config
                for name in (f"{target}.{p}" for p in experts):
                    ranks[name] = int(_peft_value(peft_config, "rank_pattern", name, peft_config.get("r", 8)))
                    alphas[name] = _peft_alpha(peft_config, name)
                continue
            missing = [n for n in cls.peft_tensor_names if n not in named]
            if missing:
                raise ValueError(f"the adapter has no tensor {target}.{missing[0]}")
            ranks[target], alphas[target] = named["lora_A.weight"].shape[0], _peft_alpha(peft_config, target)
        named_tensors = [*ranks, *(f"{t}.weight" for t in ranks)]
        for pattern in peft_config.get("target_parameters") or []:
            if not any(name == pattern or name.endswith("." + pattern) for name in named_tensors):
                raise ValueError(f"'target_parameters': {pattern!r} names no tensor saved in the adapter")
        return cls.exact(
            ranks,
            alphas,
            dropout=float(peft_config.get("lora_dropout") or 0.0),
            use_rslora=bool(peft_config.get("use_rslora", False)),
        )

    def load_peft(self, branch: nn.Module, module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        if branch.per_expert:
            expert_from_peft(branch, tensors)
            return
        a, b = tensors["lora_A.weight"], tensors["lora_B.weight"]
        fan_in, fan_out = linear_features(module)
        if tuple(a.shape) != (branch.rank, fan_in) or tuple(b.shape) != (fan_out, branch.rank):
            raise ValueError(f"lora_A {list(a.shape)} / lora_B {list(b.shape)}, but the layer is {fan_in} -> {fan_out}")
        branch.lora_A.copy_(a)
        branch.lora_B.copy_(b)

    @classmethod
    def to_peft(cls, entries: list[tuple[Any, list[tuple[str, nn.Module]]]]):
        """(peft config keys, tensors per target) of these entries as one peft adapter."""
        per_module: dict[str, list[nn.Module]] = {}
        for _, branches in entries:
            for target, branch in branches:
                per_module.setdefault(target, []).append(branch)
        configs = [config for config, _ in entries]
        stacked = any(len(b) > 1 for b in per_module.values()) or len({c.use_rslora for c in configs}) > 1
        if stacked and cls.peft_use_dora:
            raise ValueError("DoRA entries on the same module cannot be written as one peft adapter")
        use_rslora = configs[0].use_rslora and not stacked
        tensors: dict[str, dict[str, torch.Tensor]] = {}
        ranks: dict[str, int] = {}
        alphas: dict[str, float] = {}
        parameters: list[str] = []  # peft's target_parameters: MoE expert tensors and router weights
        if any(b.runs_inside for bs in per_module.values() for b in bs) and max(c.dropout for c in configs):
            raise ValueError("peft refuses lora_dropout with target_parameters (MoE expert tensors and routers); "
                             "export an entry with dropout: 0")  # fmt: skip
        for target, branches in per_module.items():
            key = target  # a router's LoRA is peft's on its parameter: named, and keyed, by it
            if branches[0].runs_inside and not branches[0].per_expert:
                key = f"{target}.weight"
                parameters.append(key)
            if branches[0].per_expert:  # per-expert factors
                tensors[target] = expert_to_peft(branches)
                for projection, factors in ((p, f) for b in branches for p, f in b.factors.items()):
                    parameters.append(name := f"{target}.{projection}")
                    per_scale = factors.rank**0.5 if use_rslora else factors.rank
                    ranks[name], alphas[name] = factors.rank, float(factors.scale * per_scale)
                continue
            if stacked:
                a, b = stack_deltas([(branch, 1.0) for branch in branches])
                ranks[key], alphas[key] = a.shape[0], float(a.shape[0])
            else:
                (branch,) = branches
                a, b = branch.A.detach(), branch.B.detach()
                ranks[key], alphas[key] = branch.rank, peft_alpha_for(branch, use_rslora)
            tensors[target] = {"lora_A.weight": a, "lora_B.weight": b}
            if cls.peft_use_dora:
                tensors[target]["lora_magnitude_vector"] = branches[0].magnitude.detach()
        r, alpha = _most_common(ranks), _most_common(alphas)
        peft_config = {
            "r": r,
            "lora_alpha": alpha,
            "lora_dropout": max(c.dropout for c in configs),
            "target_modules": sorted(t for t, bs in per_module.items() if not bs[0].runs_inside) or None,
            "target_parameters": parameters or None,
            "rank_pattern": {re.escape(t): v for t, v in ranks.items() if v != r},
            "alpha_pattern": {re.escape(t): v for t, v in alphas.items() if v != alpha},
            "use_rslora": use_rslora,
            "use_dora": cls.peft_use_dora,
            "fan_in_fan_out": any(b.transposed for bs in per_module.values() for b in bs if not b.runs_inside),
            "bias": "none",
            "modules_to_save": None,
            "init_lora_weights": True,
        }
        return peft_config, tensors
