"""Parallel adapter (He et al., 2022): the bottleneck reads the sub-module's INPUT and its result is
added to the sub-module's output: out = f(x) + s·up(act(down(x))). Placement, bottleneck size and
activation work as for the sequential Adapter; the up-projection starts at zero (identity).
He et al. use s = 4 for the FFN placement; the default here is 1.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from ..core.routing import map_hidden
from .adapter import AdapterBranch, AdapterConfig, output_features
from .base import first_input, for_weights, param_like


class ParallelAdapterConfig(AdapterConfig):
    type: Literal["parallel_adapter"] = "parallel_adapter"

    @classmethod
    def example(cls) -> ParallelAdapterConfig:
        """A small config for a Llama-style model (the contract test suite runs every method with it)."""
        return cls(after="mlp", bottleneck_size=4, scaling=2.0)

    def build_branch(self, entry: str, name: str, module: nn.Module, model: nn.Module) -> ParallelAdapterBranch:
        hidden = output_features(module, model, name)
        return ParallelAdapterBranch(
            hidden, self.bottleneck_for(hidden), activation=self.activation, dropout=self.dropout,
            scaling=self.scaling, target=name, **param_like(module),
        )  # fmt: skip


class ParallelAdapterBranch(AdapterBranch):
    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        h = for_weights(x, self.down.weight)
        return self.dropout(self.up(self.act(self.down(h)))) * self.scaling

    def forward(self, args: tuple, kwargs: dict, output: Any) -> Any:
        delta = self.bottleneck(first_input(args, kwargs))
        return map_hidden(output, lambda h: h + delta.to(h.dtype), f"parallel adapter at '{self.target}'")

    def routed(self, args: tuple, kwargs: dict, output: Any, rows: torch.Tensor) -> Any:
        delta = self.bottleneck(first_input(args, kwargs).index_select(0, rows))
        add = lambda h: h.index_put((rows,), delta.to(h.dtype), accumulate=True)  # noqa: E731  (rows are unique)
        return map_hidden(output, add, f"parallel adapter at '{self.target}'")
