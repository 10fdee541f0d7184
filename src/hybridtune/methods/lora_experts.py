"""LoRA on the fused expert tensors of a mixture-of-experts block: one low-rank delta per expert.

For a projection W of shape [experts, out, in], expert e gets ΔW_e = s · B_e A_e with A [experts,
r, in] (Kaiming-uniform per expert, as LoRA's A) and B [experts, out, r] (zero, so the model is
unchanged at init). The delta is applied inside the expert computation (core/experts.py), to the
tokens routed to each expert only: two grouped matmuls of rank r, never a full [experts, out, in]
delta per step. Merging adds ΔW to the 3-D tensor; an exact unmerge restores a saved copy.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from ..core.experts import PROJECTIONS, expert_projections, experts_forward, grouped_linear, projection_features
from .base import Branch, param_like
from .dropout import SharedDropout


class ExpertFactors(nn.Module):
    """The factors of one projection: lora_A [experts, r, in], lora_B [experts, out, r]."""

    def __init__(self, experts: int, in_features: int, out_features: int, rank: int, alpha: float, scale: float,
                 dtype: torch.dtype, device: torch.device) -> None:  # fmt: skip
        super().__init__()
        self.rank, self.alpha, self.scale = rank, alpha, scale
        self.lora_A = nn.Parameter(torch.empty(experts, rank, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(experts, out_features, rank, dtype=dtype, device=device))
        for a in self.lora_A.data:  # each expert's A as a LoRA A of its own (nn.Linear's default init)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def delta_weight(self, transposed: bool) -> torch.Tensor:
        """s · B_e A_e for every expert, in the layout of the 3-D base tensor, in fp32."""
        delta = torch.bmm(self.lora_B.float(), self.lora_A.float()) * self.scale
        return delta.transpose(-2, -1) if transposed else delta

    def extra_repr(self) -> str:
        return f"experts={self.lora_A.shape[0]}, rank={self.rank}, alpha={self.alpha}, scale={self.scale:g}"


class ExpertLoRABranch(Branch):
    """The LoRA factors of one entry on one experts module (one ExpertFactors per adapted projection)."""

    runs_inside: ClassVar[bool] = True
    run_target = staticmethod(experts_forward)
    per_expert: ClassVar[bool] = True

    def __init__(self, module: nn.Module, ranks: dict[str, tuple[int, float, float]], dropout: SharedDropout) -> None:
        """``ranks``: projection name -> (rank, alpha, scale)."""
        super().__init__()
        self.transposed = bool(getattr(module, "is_transposed", False))
        self.factors = nn.ModuleDict()
        for name, (rank, alpha, scale) in ranks.items():
            experts, fan_in, fan_out = projection_features(module, name)
            self.factors[name] = ExpertFactors(experts, fan_in, fan_out, rank, alpha, scale, **param_like(module))
        self.input_dropout = dropout
        self._originals: dict[str, torch.Tensor] = {}

    def forward(self, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise RuntimeError("an expert LoRA branch runs inside its experts module (run_target), not after it")

    def expert_delta(
        self, projection: str, x: torch.Tensor, expert_ids: torch.Tensor, offsets: torch.Tensor
    ) -> torch.Tensor | None:
        """s · B_e A_e dropout(x) for pairs ``x`` sorted by expert (see core/experts.py)."""
        if projection not in self.factors:
            return None
        factors = self.factors[projection]
        x = self.input_dropout(x.to(factors.lora_A.dtype), self.training)
        hidden = grouped_linear(x, factors.lora_A, offsets, transposed=False)
        return grouped_linear(hidden, factors.lora_B, offsets, transposed=False) * factors.scale

    @torch.no_grad()
    def merge_into(self, module: nn.Module, keep_original: bool) -> None:
        if self.merged:
            return
        params = expert_projections(module)
        for name, factors in self.factors.items():
            weight = params[name]
            if keep_original:
                self._originals[name] = weight.detach().to("cpu", copy=True)
            weight.copy_((weight.float() + factors.delta_weight(self.transposed).to(weight.device)).to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge_from(self, module: nn.Module) -> None:
        if not self.merged:
            return
        params = expert_projections(module)
        for name, factors in self.factors.items():
            weight = params[name]
            original = self._originals.pop(name, None)
            if original is None:
                original = weight.float() - factors.delta_weight(self.transposed).to(weight.device)
            weight.copy_(original.to(weight.device, weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        drop = f", dropout={self.input_dropout.p}" if self.input_dropout.p else ""
        return f"projections={list(self.factors)}{drop}"


# ---- peft's format (``target_parameters``) ----------------------------------------------------
# peft wraps each targeted tensor of a module in a ParamWrapper, the first defined innermost, so
# the k-th of n targeted tensors' factors sit under "base_layer." * (n - 1 - k). Its factors are
# flat: lora_A [r·E, in] (expert e's rows e·r .. e·r+r-1) and lora_B [out, r·E] (expert e's
# column for direction k is k·E + e).


def peft_prefixes(projections: list[str]) -> dict[str, str]:
    """The key prefix of each projection's factors in peft's files, for these targeted projections
    of one module (in the module's order)."""
    return {p: "base_layer." * (len(projections) - 1 - i) for i, p in enumerate(projections)}


def expert_to_peft(branches: list[ExpertLoRABranch]) -> dict[str, torch.Tensor]:
    """One experts module's tensors in peft's layout; several entries may share the module when
    each adapts other tensors (peft then holds them as one adapter)."""
    by_name: dict[str, ExpertFactors] = {}
    for branch in branches:
        for name, factors in branch.factors.items():
            if name in by_name:
                raise ValueError(f"two LoRA entries adapt the expert tensor {name} of one module; one peft "
                                 "adapter holds one LoRA per tensor")  # fmt: skip
            by_name[name] = factors
    ordered = [p for p in PROJECTIONS if p in by_name]
    tensors = {}
    for name, prefix in peft_prefixes(ordered).items():
        factors = by_name[name]
        a, b = factors.lora_A.detach(), factors.lora_B.detach()
        experts, rank, fan_in = a.shape
        tensors[f"{prefix}lora_A.weight"] = a.reshape(experts * rank, fan_in)
        tensors[f"{prefix}lora_B.weight"] = b.permute(1, 2, 0).reshape(b.shape[1], rank * experts)
    return tensors


def expert_from_peft(branch: ExpertLoRABranch, tensors: dict[str, torch.Tensor]) -> None:
    """Copy one experts module's peft tensors into ``branch``; ValueError naming what does not fit."""
    prefixes = peft_prefixes(list(branch.factors))
    expected = {f"{prefix}lora_{x}.weight" for prefix in prefixes.values() for x in "AB"}
    if set(tensors) != expected:
        raise ValueError(f"the adapter holds {sorted(tensors)}, but the targeted expert tensors "
                         f"{list(branch.factors)} need {sorted(expected)}")  # fmt: skip
    for name, prefix in prefixes.items():
        factors = branch.factors[name]
        experts, rank, fan_in = factors.lora_A.shape
        fan_out = factors.lora_B.shape[1]
        a, b = tensors[f"{prefix}lora_A.weight"], tensors[f"{prefix}lora_B.weight"]
        if tuple(a.shape) != (experts * rank, fan_in) or tuple(b.shape) != (fan_out, rank * experts):
            raise ValueError(
                f"{name}: lora_A {list(a.shape)} / lora_B {list(b.shape)}, but {experts} experts of rank {rank} "
                f"on {fan_in} -> {fan_out} need {[experts * rank, fan_in]} / {[fan_out, rank * experts]}"
            )
        factors.lora_A.copy_(a.reshape(experts, rank, fan_in))
        factors.lora_B.copy_(b.reshape(fan_out, rank, experts).permute(2, 0, 1))
