"""Prefix tuning: learned key/value prefixes of ``num_virtual_tokens`` positions in every layer.

Implemented through the model's cache mechanism, which is the same on every architecture that
supports a KV cache: on the first call of a sequence a pre-hook writes the prefixes into the call's
cache (a new DynamicCache, or the empty one ``generate`` passes) and extends the attention mask and
positions; later cached steps only extend the mask and shift positions. The input and output
lengths do not change. Not the identity at init, not mergeable, one prefix for the whole batch.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn
from transformers import DynamicCache

from .base import Branch, MethodConfig, param_like
from .virtual_tokens import PREFIX_POSITIONS, call_batch, is_first_call, shift_for_leading_tokens


class PrefixTuningConfig(MethodConfig):
    type: Literal["prefix_tuning"] = "prefix_tuning"
    identity_at_init: ClassVar[bool] = False
    supports_routing: ClassVar[bool] = False

    num_virtual_tokens: int = Field(20, ge=1)
    init_std: float = Field(0.5, gt=0)

    @classmethod
    def example(cls) -> PrefixTuningConfig:
        return cls(num_virtual_tokens=4)

    def select_targets(self, model: nn.Module, entry: str) -> list[tuple[str, nn.Module]]:
        config = getattr(model, "config", None)
        if config is None or not getattr(config, "num_hidden_layers", None):
            raise ValueError(f"entry '{entry}': prefix tuning needs a transformers model config with layers")
        return [("", model)]

    def build_branch(self, entry: str, name: str, module: nn.Module, model: nn.Module) -> PrefixTuningBranch:
        config = model.config
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        shape = (config.num_hidden_layers, kv_heads, self.num_virtual_tokens, head_dim)
        like = param_like(model)
        return PrefixTuningBranch(model, shape, self.init_std, **like)


class PrefixTuningBranch(Branch):
    modifies_input: ClassVar[bool] = True

    def __init__(self, model: nn.Module, shape: tuple[int, ...], std: float, dtype, device) -> None:
        super().__init__()
        self.__dict__["model"] = model
        self.prefix_keys = nn.Parameter(torch.randn(shape, dtype=dtype, device=device) * std)
        self.prefix_values = nn.Parameter(torch.randn(shape, dtype=dtype, device=device) * std)

    @property
    def n(self) -> int:
        return self.prefix_keys.shape[2]

    def pre(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs = dict(kwargs)
        if args:
            kwargs["input_ids"], args = args[0], args[1:]
        first = is_first_call(kwargs)
        batch = call_batch(kwargs)
        shift_for_leading_tokens(kwargs, self.n, batch, new_positions=False)
        if first:
            cache = kwargs.get("past_key_values")
            if cache is None:
                cache = DynamicCache(config=self.model.config)
            dtype = self.model.get_input_embeddings().weight.dtype
            for layer in range(self.prefix_keys.shape[0]):
                keys = self.prefix_keys[layer].to(dtype).unsqueeze(0).expand(batch, -1, -1, -1)
                values = self.prefix_values[layer].to(dtype).unsqueeze(0).expand(batch, -1, -1, -1)
                cache.update(keys, values, layer)
            setattr(cache, PREFIX_POSITIONS, getattr(cache, PREFIX_POSITIONS, 0) + self.n)
            kwargs["past_key_values"] = cache
        return args, kwargs

    def forward(self, args: tuple, kwargs: dict, output: Any) -> Any:
        return output

    def routed_pre(self, args: tuple, kwargs: dict, rows: torch.Tensor) -> tuple[tuple, dict]:
        raise NotImplementedError("prefix tuning adds one prefix to the whole batch; it cannot serve per-row sets")
