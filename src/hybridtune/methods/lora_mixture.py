"""Multi-task LoRA mixture: K LoRA experts on the same targets, combined per example or per token.

- ``mode: hard``: each row of the batch uses the expert of its task (``task_ids``, one per row,
  passed to the model call; the YAML names the tasks and the data's ``task`` field picks one).
  Row k equals a plain LoRA holding expert k's weights.
- ``mode: soft``: experts are mixed by softmax weights. ``gate: token`` (the default) computes the
  weights per token from the layer input with a small linear router, so the mixture specialises
  per input and needs no task label at inference; ``gate: global`` learns one weight vector per
  layer, which makes the mixture a fixed combination (as expressive as one LoRA of rank K·r) —
  useful as a baseline, cheaper, and it needs no router.

Experts' B start at zero, so the model is unchanged until trained. Not mergeable: the combination
depends on the input.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import nn

from ..core.routing import current as current_routing
from ..core.targeting import is_linear, linear_features, select_modules
from .base import LINEAR_TARGETS, Branch, MethodConfig, first_input, for_weights, param_like
from .dropout import InputDropout, SharedDropout


class LoRAMixtureConfig(InputDropout, MethodConfig):
    type: Literal["lora_mixture"] = "lora_mixture"

    @classmethod
    def example(cls) -> LoRAMixtureConfig:
        """A small config for a Llama-style model (the contract test suite runs every method with it)."""
        return cls(mode="soft", experts=2, r=4, targets=["q_proj", "v_proj"])

    tasks: list[str] | None = None  # hard mode: one expert per task, in this order
    experts: int | None = Field(None, ge=1)  # soft mode: how many experts (or len(tasks))
    mode: Literal["hard", "soft"] = "hard"
    gate: Literal["token", "global"] = "token"
    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    targets: list[str] = Field(min_length=1, json_schema_extra=LINEAR_TARGETS)
    exclude: list[str] = Field(default_factory=list)
    use_rslora: bool = False

    @field_validator("targets", "exclude", mode="before")
    @classmethod
    def _one_pattern_is_a_list(cls, value):
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _experts_known(self) -> LoRAMixtureConfig:
        if self.mode == "hard" and not self.tasks:
            raise ValueError("mode 'hard' routes by task: list the task names in 'tasks'")
        if self.tasks and len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"task names must be unique: {self.tasks}")
        if self.tasks and self.experts is not None and self.experts != len(self.tasks):
            raise ValueError(f"experts={self.experts} but {len(self.tasks)} tasks are named; give one or the other")
        if not self.tasks and self.experts is None:
            raise ValueError("give 'experts' (how many) or 'tasks' (their names)")
        return self

    def routing_tasks(self) -> list[str] | None:
        return list(self.tasks) if self.mode == "hard" else None

    @property
    def num_experts(self) -> int:
        return len(self.tasks) if self.tasks else int(self.experts)

    def select_targets(self, model: nn.Module, entry: str) -> list[tuple[str, nn.Module]]:
        return select_modules(
            model, self.targets, entry=entry, accept=is_linear,
            accepted_what="linear layers (nn.Linear or transformers' Conv1D)", exclude=self.exclude,
        )  # fmt: skip

    def build_branch(self, entry: str, name: str, module: nn.Module, model: nn.Module) -> LoRAMixtureBranch:
        fan_in, fan_out = linear_features(module)
        scale = self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r
        return LoRAMixtureBranch(
            fan_in, fan_out, experts=self.num_experts, rank=self.r, scale=scale, dropout=self.entry_dropout(),
            mode=self.mode, gate=self.gate, **param_like(module),
        )  # fmt: skip


class LoRAMixtureBranch(Branch):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        experts: int,
        rank: int,
        scale: float,
        dropout: SharedDropout | float,
        mode: str,
        gate: str,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.experts, self.rank, self.scale, self.mode, self.gate = experts, rank, scale, mode, gate
        self.lora_A = nn.Parameter(torch.empty(experts, rank, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(experts, out_features, rank, dtype=dtype, device=device))
        for k in range(experts):
            nn.init.kaiming_uniform_(self.lora_A[k], a=math.sqrt(5))
        if mode == "soft" and gate == "token":
            self.router = nn.Linear(in_features, experts, dtype=dtype, device=device)
            nn.init.zeros_(self.router.weight)  # uniform mixture at the start
            nn.init.zeros_(self.router.bias)
        elif mode == "soft":
            self.gate_logits = nn.Parameter(torch.zeros(experts, dtype=dtype, device=device))
        self.input_dropout = dropout if isinstance(dropout, SharedDropout) else SharedDropout(dropout)

    def gate_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Soft mode: mixing weights, [..., K] per token or [K] globally."""
        if self.gate == "token":
            return torch.softmax(self.router(x), dim=-1)
        return torch.softmax(self.gate_logits, dim=-1)

    def expert_delta(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """What expert ``k`` alone adds (a plain LoRA with its weights)."""
        return F.linear(F.linear(x, self.lora_A[k]), self.lora_B[k]) * self.scale

    def forward(self, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        x = self.input_dropout(for_weights(first_input(args, kwargs), self.lora_A), self.training)
        if self.mode == "hard":
            routing = current_routing()
            if routing is None or routing.task_ids is None:
                raise ValueError("a hard lora_mixture needs task_ids: call model(..., task_ids=[...]) (one per row)")
            ids = routing.task_ids_for(x.shape[0])
            if int(ids.max()) >= self.experts or int(ids.min()) < 0:
                raise ValueError(f"task_ids must be in 0..{self.experts - 1}, got {ids.tolist()}")
            a, b = self.lora_A[ids], self.lora_B[ids]  # [batch, r, in], [batch, out, r]
            hidden = torch.einsum("b...i,bri->b...r", x, a)
            delta = torch.einsum("b...r,bor->b...o", hidden, b) * self.scale
        else:
            hidden = F.linear(x, self.lora_A.flatten(0, 1))  # [..., K*r]
            weights = self.gate_weights(x)
            hidden = (hidden.unflatten(-1, (self.experts, self.rank)) * weights.unsqueeze(-1)).flatten(-2)
            delta = F.linear(hidden, self.lora_B.permute(1, 0, 2).flatten(1)) * self.scale
        return output + delta.to(output.dtype)

    def extra_repr(self) -> str:
        return f"experts={self.experts}, rank={self.rank}, mode={self.mode}, gate={self.gate}, scale={self.scale:g}"
