"""Bottleneck Adapter: out = f(x) + s · up(act(down(f(x)))) around a sub-module f.

``after="mlp"`` is the Pfeiffer placement, ``after=["self_attn", "mlp"]`` the Houlsby one. The
up-projection starts at zero, so the adapter is the identity until trained. Sub-modules that
return tuples (attention blocks return (hidden, weights, ...)) get the adapter on the first item.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator
from torch import nn
from transformers.activations import ACT2FN

from ..core.routing import map_hidden, replace_rows
from ..core.targeting import is_linear, linear_features, named_base_modules, select_modules
from .base import BLOCKS, Branch, MethodConfig, for_weights, param_like


class AdapterConfig(MethodConfig):
    """Sequential bottleneck adapter after the sub-modules named by ``after``.

    The bottleneck is ``bottleneck_size`` when given, else hidden_size // ``reduction_factor``.
    """

    type: Literal["adapter"] = "adapter"

    @classmethod
    def example(cls) -> AdapterConfig:
        """A small config for a Llama-style model (the contract test suite runs every method with it)."""
        return cls(after=["self_attn", "mlp"], reduction_factor=8)

    after: list[str] = Field(default_factory=lambda: ["mlp"], min_length=1, json_schema_extra=BLOCKS)
    reduction_factor: float = Field(16.0, gt=0)
    bottleneck_size: int | None = Field(None, ge=1)
    # hybridtune's extension of a LLaMA-Factory YAML: adapter_after (plus optional sizes) adds an Adapter
    llamafactory_defaults: ClassVar[dict[str, Any]] = {
        "adapter_after": None, "adapter_reduction_factor": None, "adapter_bottleneck_size": None,
    }  # fmt: skip

    @classmethod
    def from_llamafactory(cls, values: dict[str, Any], given: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
        sizes = {k: given[k] for k in cls.llamafactory_defaults if k != "adapter_after" and given.get(k) is not None}
        if given.get("adapter_after") is None:
            if sizes:
                raise ValueError(f"{next(iter(sizes))}: give adapter_after too (where the Adapter goes, e.g. mlp)")
            return None
        return "adapter", {"type": "adapter", "after": given["adapter_after"],
                           **{k.removeprefix("adapter_"): v for k, v in sizes.items()}}  # fmt: skip

    activation: str = "relu"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    scaling: float = 1.0

    @field_validator("after", mode="before")
    @classmethod
    def _one_place_is_a_list(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("activation")
    @classmethod
    def _known_activation(cls, value: str) -> str:
        if value not in ACT2FN:
            raise ValueError(f"unknown activation '{value}'; expected one of {', '.join(sorted(ACT2FN))}")
        return value

    def bottleneck_for(self, hidden: int) -> int:
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        return max(1, int(hidden // self.reduction_factor))

    def select_targets(self, model: nn.Module, entry: str) -> list[tuple[str, nn.Module]]:
        return select_modules(
            model,
            self.after,
            entry=entry,
            accept=lambda m: m is not model,
            accepted_what="a sub-module of the model",
        )

    def build_branch(self, entry: str, name: str, module: nn.Module, model: nn.Module) -> AdapterBranch:
        hidden = output_features(module, model, name)
        return AdapterBranch(
            hidden,
            self.bottleneck_for(hidden),
            activation=self.activation,
            dropout=self.dropout,
            scaling=self.scaling,
            target=name,
            **param_like(module),
        )


def output_features(module: nn.Module, model: nn.Module, name: str) -> int:
    """Width of a sub-module's output: its own (a linear layer); for a block, the model's hidden
    size when one of its linear layers produces it (a block's last linear may be a side branch,
    such as an MoE block's shared-expert gate of width 1), else its last linear layer's."""
    if is_linear(module):
        return linear_features(module)[1]
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    widths = [linear_features(m)[1] for _, m in named_base_modules(module) if is_linear(m)]
    if widths and hidden not in widths:
        return widths[-1]
    if hidden is None:
        raise ValueError(f"cannot tell the output width of '{name}' ({type(module).__name__}) for an adapter")
    return int(hidden)


class AdapterBranch(Branch):
    def __init__(
        self,
        hidden: int,
        bottleneck: int,
        *,
        activation: str,
        dropout: float,
        scaling: float,
        target: str,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.target, self.scaling = target, scaling
        self.down = nn.Linear(hidden, bottleneck, dtype=dtype, device=device)
        self.up = nn.Linear(bottleneck, hidden, dtype=dtype, device=device)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.act = ACT2FN[activation]
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def adapt(self, hidden: torch.Tensor) -> torch.Tensor:
        h = for_weights(hidden, self.down.weight)
        delta = self.dropout(self.up(self.act(self.down(h))))
        if self.scaling != 1.0:  # no extra pass (and no second full-width temporary) for the default
            delta = delta * self.scaling
        return hidden + delta.to(hidden.dtype)

    def forward(self, args: tuple, kwargs: dict, output: Any) -> Any:
        return map_hidden(output, self.adapt, f"adapter after '{self.target}'")

    def routed(self, args: tuple, kwargs: dict, output: Any, rows: torch.Tensor) -> Any:
        return map_hidden(
            output,
            lambda h: replace_rows(h, rows, self.adapt(h.index_select(0, rows))),
            f"adapter after '{self.target}'",
        )
