"""LoRA: h = W x + s · B A dropout(x), with s = alpha/r (or alpha/sqrt(r) for rsLoRA).

A starts Kaiming-uniform and B at zero, so an injected model computes exactly what the base
model computes until the first optimizer step. Merging adds s · B A to W (transposed for GPT-2's
Conv1D); an exact unmerge restores a saved copy instead of subtracting, so no rounding is left.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import AliasChoices, Field, field_validator, model_validator
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..core.errors import TargetError
from ..core.experts import check_supported, is_fused_experts, is_router, reweighted_forward
from ..core.targeting import (
    any_experts,
    describe_expert_tensors,
    first_match,
    in_model_order,
    is_linear,
    linear_features,
    matches,
    named_projections,
    select_expert_tensors,
    select_modules,
)
from ..core.validation import StrictModel
from .base import LINEAR_TARGETS, PER_TARGET, Branch, MethodConfig, first_input, for_weights, param_like
from .dropout import InputDropout, SharedDropout
from .lora_experts import ExpertLoRABranch
from .low_rank_exchange import LowRankExchange


class RankSchedule(StrictModel):
    """A rank that grows during training: ``start``, then ``+grow_by`` every ``every_steps``
    optimizer steps (or ``every_epochs`` epochs) of the stage that trains the entry, up to ``max``.

    Parameters are allocated at ``max`` once, so growing never re-creates them and the optimizer
    keeps its state; new directions have B = 0, so a growth step leaves the function unchanged.
    The scale stays alpha/start (alpha/sqrt(start) with rsLoRA) for the same reason.
    """

    start: int = Field(ge=1)
    max: int = Field(ge=1)
    grow_by: int = Field(ge=1)
    every_steps: int | None = Field(None, ge=1)
    every_epochs: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> RankSchedule:
        if self.max < self.start:
            raise ValueError(f"max ({self.max}) must be >= start ({self.start})")
        if (self.every_steps is None) == (self.every_epochs is None):
            raise ValueError("give exactly one of every_steps and every_epochs")
        return self

    def rank_at(self, step: int, epoch: float) -> int:
        done = step // self.every_steps if self.every_steps else int(epoch // self.every_epochs)
        return min(self.max, self.start + self.grow_by * done)


class LowRankConfig(LowRankExchange, InputDropout, MethodConfig):
    """Fields and target rules shared by the low-rank methods (LoRA, DoRA); their peft format
    and exact combinations come from LowRankExchange.

    ``rank_pattern``/``alpha_pattern`` map a pattern (same rules as ``targets``) to a per-module
    rank/alpha; the first pattern that matches a module, in the order written, wins.
    """

    @classmethod
    def example(cls) -> LowRankConfig:
        """A small config for a Llama-style model (the contract test suite runs every method with it)."""
        return cls(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"])

    r: int | RankSchedule = 8
    # peft's names are accepted too, as a peft user types them
    alpha: float = Field(16.0, gt=0, validation_alias=AliasChoices("alpha", "lora_alpha"))
    targets: list[str] = Field(
        min_length=1, validation_alias=AliasChoices("targets", "target_modules"), json_schema_extra=LINEAR_TARGETS
    )
    exclude: list[str] = Field(default_factory=list, validation_alias=AliasChoices("exclude", "exclude_modules"))
    rank_pattern: dict[str, int] = Field(default_factory=dict, json_schema_extra=PER_TARGET)
    alpha_pattern: dict[str, float] = Field(default_factory=dict)
    use_rslora: bool = False

    @field_validator("targets", "exclude", mode="before")
    @classmethod
    def _one_pattern_is_a_list(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("r")
    @classmethod
    def _positive_rank(cls, value: int | RankSchedule) -> int | RankSchedule:
        if isinstance(value, int) and value < 1:
            raise ValueError(f"r is {value}; ranks must be >= 1")
        return value

    @model_validator(mode="after")
    def _schedule_is_uniform(self) -> LowRankConfig:
        if isinstance(self.r, RankSchedule) and self.rank_pattern:
            raise ValueError("a growing rank (r: {start, max, ...}) cannot be combined with rank_pattern")
        return self

    @field_validator("rank_pattern")
    @classmethod
    def _positive_ranks(cls, value: dict[str, int]) -> dict[str, int]:
        for pattern, rank in value.items():
            if rank < 1:
                raise ValueError(f"rank_pattern['{pattern}'] is {rank}; ranks must be >= 1")
        return value

    def rank_at(self, step: int, epoch: float) -> int | None:
        return self.r.rank_at(step, epoch) if isinstance(self.r, RankSchedule) else None

    def rank_for(self, name: str) -> int:
        """The rank a module starts with."""
        if isinstance(self.r, RankSchedule):
            return self.r.start
        key = first_match(self.rank_pattern, name)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, name: str) -> float:
        key = first_match(self.alpha_pattern, name)
        return self.alpha_pattern[key] if key is not None else self.alpha

    def scale_for(self, rank: int, alpha: float) -> float:
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def select_targets(self, model: nn.Module, entry: str) -> list[tuple[str, nn.Module]]:
        chosen = select_modules(
            model,
            self.targets,
            entry=entry,
            accept=is_linear,
            accepted_what="linear layers (nn.Linear or transformers' Conv1D)",
            exclude=self.exclude,
        )
        self._check_patterns(entry, [n for n, _ in chosen])
        return chosen

    def _check_patterns(self, entry: str, names: list[str]) -> None:
        """Every rank_pattern/alpha_pattern key must select one of the targeted ``names``."""
        for field in ("rank_pattern", "alpha_pattern"):
            for pattern in getattr(self, field):
                if not any(first_match([pattern], n) for n in names):
                    raise ValueError(
                        f"entry '{entry}': {field} key '{pattern}' matches none of the targeted modules "
                        f"(e.g. {', '.join(names[:4])})"
                    )

    def branch_args(self, name: str, module: nn.Module) -> dict:
        """Constructor arguments of a low-rank branch for target ``name``."""
        rank, alpha = self.rank_for(name), self.alpha_for(name)
        fan_in, fan_out = linear_features(module)
        return dict(
            in_features=fan_in,
            out_features=fan_out,
            rank=rank,
            capacity=self.r.max if isinstance(self.r, RankSchedule) else rank,
            alpha=alpha,
            scale=self.scale_for(rank, alpha),
            dropout=self.entry_dropout(),
            transposed=isinstance(module, Conv1D),
            **param_like(module),
        )


class LoRAConfig(LowRankConfig):
    """Low-rank update of linear layers chosen by name pattern (see LowRankConfig), and of the
    fused expert tensors of MoE blocks: a pattern that names a parameter (``experts.gate_up_proj``,
    ``experts.down_proj``, or a regular expression over parameter names) gives each expert its own
    delta (methods/lora_experts.py). ``target_parameters`` (peft's key) takes patterns that must
    name such parameters."""

    type: Literal["lora"] = "lora"
    mergeable: ClassVar[bool] = True
    linear_low_rank: ClassVar[bool] = True
    targets: list[str] = Field(
        validation_alias=AliasChoices("targets", "target_modules"), json_schema_extra=LINEAR_TARGETS
    )
    target_parameters: list[str] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _parameters_alone_are_enough(cls, values):
        """peft's configs may name expert tensors only (``target_modules`` unset)."""
        named = isinstance(values, dict) and values.get("target_parameters")
        if named and values.get("targets", values.get("target_modules")) is None:
            values = {k: v for k, v in values.items() if k != "target_modules"} | {"targets": []}
        return values

    @model_validator(mode="after")
    def _something_targeted(self) -> LoRAConfig:
        if not self.targets and not self.target_parameters:
            raise ValueError("targets: give at least one module pattern (or target_parameters for expert tensors)")
        return self

    def select_targets(self, model: nn.Module, entry: str) -> list[tuple[str, nn.Module]]:
        experts = select_expert_tensors(model, self.targets, self.exclude, self.target_parameters, entry)
        for pattern in self.target_parameters:
            if not any(matches(pattern, f"{n}.{p}") for n, (_, names) in experts.items() for p in names):
                known = describe_expert_tensors(model) if any_experts(model) else "none: it has no fused MoE experts"
                raise TargetError(f"entry '{entry}': target_parameters pattern '{pattern}' names no expert tensor "
                                  f"of this model (its expert tensors: {known})")  # fmt: skip
        if experts and isinstance(self.r, RankSchedule):
            raise TargetError(f"entry '{entry}': a growing rank (r: {{start, max, ...}}) is not supported on expert "
                              "tensors; give an integer r")  # fmt: skip
        found = {p for p in self.targets if any(matches(p, f"{n}.{t}") for n, (_, ts) in experts.items() for t in ts)}
        chosen = []
        if self.targets:
            chosen = select_modules(model, self.targets, entry=entry, accept=lambda m: is_linear(m) or is_router(m),
                                    accepted_what="linear layers (nn.Linear or transformers' Conv1D) or MoE routers",
                                    exclude=self.exclude, selected_elsewhere=found)  # fmt: skip
        names = [n for n, _ in chosen] + [f"{n}.{p}" for n, (_, ps) in experts.items() for p in ps]
        self._check_patterns(entry, names)
        for name, (module, _) in experts.items():
            check_supported(module, name)
        routers = [n for n, m in chosen if is_router(m)]
        if routers and self.dropout:
            raise TargetError(f"entry '{entry}': dropout {self.dropout} cannot apply to the router {routers[0]} (its "
                              "LoRA acts through the router's weight, and peft refuses it too); put the router in an "
                              "entry of its own with dropout: 0")  # fmt: skip
        return in_model_order(model, chosen + [(n, m) for n, (m, _) in experts.items()])

    def build_branch(self, entry: str, name: str, module: nn.Module, model: nn.Module) -> Branch:
        if is_router(module):
            return RouterLoRABranch(**self.branch_args(name, module))
        if not is_fused_experts(module):
            return LoRABranch(**self.branch_args(name, module))
        ranks = {}  # select_targets refused ambiguous patterns: the module's own names decide
        for projection in named_projections(name, module, self.targets, self.exclude, self.target_parameters):
            full = f"{name}.{projection}"
            rank, alpha = self.rank_for(full), self.alpha_for(full)
            ranks[projection] = (rank, alpha, self.scale_for(rank, alpha))
        return ExpertLoRABranch(module, ranks, self.entry_dropout())


class LoRABranch(Branch):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rank: int,
        alpha: float,
        scale: float,
        dropout: SharedDropout | float,
        transposed: bool,
        dtype: torch.dtype,
        device: torch.device,
        capacity: int | None = None,
    ) -> None:
        super().__init__()
        # sizes kept as numbers: a partitioned weight (DeepSpeed ZeRO-3) has no shape outside forward
        self.capacity = capacity = capacity or rank
        self.rank, self.alpha, self.scale, self.transposed = rank, alpha, scale, transposed
        self.lora_A = nn.Parameter(torch.empty(capacity, in_features, dtype=dtype, device=device))
        # B is [out, r] like peft's (and in checkpoints), stored transposed in memory: Bᵀ is then a
        # contiguous [r, out] view, which is what both matmuls of the B path want (see ``forward``)
        self.lora_B = nn.Parameter(torch.zeros(capacity, out_features, dtype=dtype, device=device).t())
        if capacity != rank:  # a growing rank: its current value travels in checkpoints
            self.register_buffer("rank_active", torch.tensor(rank, dtype=torch.long))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own default init
        self.input_dropout = dropout if isinstance(dropout, SharedDropout) else SharedDropout(dropout)
        self.merged = False
        self._original_weight: torch.Tensor | None = None

    @property
    def A(self) -> torch.Tensor:
        """The active rows of lora_A (all of them unless the rank grows)."""
        return self.lora_A if self.rank == self.capacity else self.lora_A[: self.rank]

    @property
    def B(self) -> torch.Tensor:
        return self.lora_B if self.rank == self.capacity else self.lora_B[:, : self.rank]

    def set_rank(self, rank: int) -> None:
        """Use the first ``rank`` directions (up to the capacity allocated at injection)."""
        if not 1 <= rank <= self.capacity:
            raise ValueError(f"rank {rank} is outside 1..{self.capacity} for this LoRA branch")
        self.rank = rank
        if hasattr(self, "rank_active"):
            self.rank_active.fill_(rank)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        """``state_dict()`` gives lora_B as a contiguous tensor (in memory it is a transposed view,
        see __init__), so any saver takes it (safetensors refuses non-contiguous tensors)."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not keep_vars:
            destination[prefix + "lora_B"] = destination[prefix + "lora_B"].contiguous()

    def after_load(self) -> None:
        if hasattr(self, "rank_active"):
            self.rank = int(self.rank_active)

    def _hidden(self, x: torch.Tensor) -> torch.Tensor:
        """A·dropout(x): the rank-r activations."""
        x = for_weights(x, self.lora_A)
        return F.linear(self.input_dropout(x, self.training), self.A)

    def _up(self, hidden: torch.Tensor) -> torch.Tensor:
        """s · B h as a new tensor (DoRA, routed rows, mixed dtypes)."""
        return (hidden @ self.B.t().to(hidden.dtype)) * self.scale

    def _delta(self, x: torch.Tensor) -> torch.Tensor:
        return self._up(self._hidden(x))

    def forward(self, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        """Adds s · B h to the base output in place, on the output itself (not on a 2-D view of it,
        which made autograd clone the full output gradient at every layer). Measured on the CPU:
        the backward's ``grad @ B`` runs ~2.5x slower for r < 16 when B is laid out [out, r] than
        when it is the transpose of a contiguous [r, out] tensor, hence B's storage."""
        if self.merged:
            return output
        hidden = self._hidden(first_input(args, kwargs))
        if hidden.dtype == output.dtype and output.dim() in (2, 3):  # under autocast too: both in its dtype
            up = self.B.t().to(output.dtype)
            if output.dim() == 2:
                return output.addmm_(hidden, up, alpha=self.scale)
            return output.baddbmm_(hidden, up.expand(output.shape[0], *up.shape), alpha=self.scale)
        return output + self._up(hidden).to(output.dtype)

    def routed(self, args: tuple, kwargs: dict, output: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        delta = self._delta(first_input(args, kwargs).index_select(0, rows))
        # rows are unique: out[rows] + delta, as index_add computes it (which sorts its index
        # on the CPU: ~10x slower for a decoding step's few rows)
        return output.index_put((rows,), delta.to(output.dtype), accumulate=True)

    def delta_weight(self) -> torch.Tensor:
        """s · B A in the layout of the base weight, computed in fp32."""
        delta = (self.B.float() @ self.A.float()) * self.scale
        return delta.T if self.transposed else delta

    @torch.no_grad()
    def merge_into(self, module: nn.Module, keep_original: bool) -> None:
        if self.merged:
            return
        weight = module.weight
        self._original_weight = weight.detach().to("cpu", copy=True) if keep_original else None
        weight.copy_(self.merged_value(weight).to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge_from(self, module: nn.Module) -> None:
        if not self.merged:
            return
        weight = module.weight
        if self._original_weight is not None:
            weight.copy_(self._original_weight.to(weight.device))
        else:
            weight.copy_(self.unmerged_value(weight).to(weight.dtype))
        self._original_weight = None
        self.merged = False

    def merged_value(self, weight: torch.Tensor) -> torch.Tensor:
        """The base weight with this branch folded in (fp32)."""
        return weight.float() + self.delta_weight().to(weight.device)

    def unmerged_value(self, weight: torch.Tensor) -> torch.Tensor:
        """The base weight recovered from a merged one without the saved copy (fp32, inexact)."""
        return weight.float() - self.delta_weight().to(weight.device)

    def extra_repr(self) -> str:
        grows = f", capacity={self.capacity}" if self.capacity != self.rank else ""
        drop = f", dropout={self.input_dropout.p}" if self.input_dropout.p else ""
        return f"rank={self.rank}{grows}, alpha={self.alpha}, scale={self.scale:g}{drop}, transposed={self.transposed}"


class RouterLoRABranch(LoRABranch):
    """LoRA on an MoE router's weight: the router runs with W + s·B A (core/experts.py's
    reweighted_forward), so the delta acts before its softmax and top-k; otherwise a LoRA branch
    (merge, save, peft's tensors). Routers are adapted only where a target names them."""

    runs_inside: ClassVar[bool] = True
    run_target = staticmethod(reweighted_forward)

    def forward(self, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise RuntimeError("a router LoRA branch runs inside its router (run_target), not after it")
