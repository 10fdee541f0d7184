"""Prefix tuning: learned key/value prefixes of ``num_virtual_tokens`` positions in every layer.

Implemented through the model's cache mechanism, which is the same on every architecture that
supports a KV cache: on the first call of a sequence a pre-hook writes the prefixes into the call's
cache (a new DynamicCache, or the empty one ``generate`` passes) and extends the attention mask and
positions; later cached steps only extend the mask and shift positions. The input and output
lengths do not change. Not the identity at init, not mergeable, one prefix for the whole batch.

A call that keeps no cache (training) gets a ``PrefixOnlyCache``, which gradient checkpointing
can replay (transformers drops any other cache from checkpointed layers, and the prefix with it).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import Cache

from ..core.kv_cache import call_cache, set_call_cache
from .base import Branch, MethodConfig, param_like
from .virtual_tokens import PREFIX_POSITIONS, call_batch, is_first_call, shift_for_leading_tokens


class PrefixTuningConfig(MethodConfig):
    type: Literal["prefix_tuning"] = "prefix_tuning"
    identity_at_init: ClassVar[bool] = False
    supports_routing: ClassVar[bool] = False
    supports_packing: ClassVar[bool] = False  # one set of virtual tokens per row, not per packed example

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
            cache = call_cache(kwargs)
            if cache is None:
                keep = kwargs.get("use_cache")
                keep = getattr(self.model.config, "use_cache", True) if keep is None else keep
                checkpointed = checkpointed_layers(self.model) if self.model.training else []
                cache_type = PrefixOnlyCache if checkpointed or not keep else DynamicCache
                cache = cache_type(config=self.model.config)
                if cache_type is PrefixOnlyCache:
                    self.__dict__["replaying"] = keep_cache_in(checkpointed, cache, type(self.model).__name__)
            dtype = self.model.get_input_embeddings().weight.dtype
            for layer in range(self.prefix_keys.shape[0]):
                keys = self.prefix_keys[layer].to(dtype).unsqueeze(0).expand(batch, -1, -1, -1)
                values = self.prefix_values[layer].to(dtype).unsqueeze(0).expand(batch, -1, -1, -1)
                Cache.update(cache, keys, values, layer)  # stored, whatever the cache's own update does
            setattr(cache, PREFIX_POSITIONS, getattr(cache, PREFIX_POSITIONS, 0) + self.n)
            set_call_cache(kwargs, self.model, cache)
        return args, kwargs

    def forward(self, args: tuple, kwargs: dict, output: Any) -> Any:
        release(self.__dict__.pop("replaying", []))  # the recompute captured its cache already
        return output

    def routed_pre(self, args: tuple, kwargs: dict, rows: torch.Tensor) -> tuple[tuple, dict]:
        raise NotImplementedError("prefix tuning adds one prefix to the whole batch; it cannot serve per-row sets")


class PrefixOnlyCache(DynamicCache):
    """The prefixes of a call that keeps no cache. ``update`` returns a layer's prefix followed by
    the call's keys and values and stores nothing, so a layer run again by gradient checkpointing's
    recompute sees the prefix alone, as the first time: the read-only cache transformers lets
    checkpointed layers keep (``_can_checkpoint_with_cache``). Also saves storing the call's states."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)


def checkpointed_layers(model: nn.Module) -> list[nn.Module]:
    """The layers transformers runs under gradient checkpointing in this (training) call."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]


def keep_cache_in(layers: list[nn.Module], cache: PrefixOnlyCache, model_name: str) -> list[tuple[nn.Module, Any]]:
    """Let checkpointed ``layers`` keep this call's PrefixOnlyCache (until the branch's post-hook):
    only a read-only cache may be kept, a cache they write to would be written twice by the recompute.
    Returns each layer with a check that the cache reaches it: some models (GPT-2) withhold the
    cache from checkpointed layers themselves, and the prefixes could never reach attention."""
    if layers and not hasattr(type(layers[0]), "_can_checkpoint_with_cache"):
        raise RuntimeError(
            "prefix tuning under gradient checkpointing needs a transformers release whose checkpointed layers "
            "can keep a read-only cache (GradientCheckpointingLayer._can_checkpoint_with_cache); upgrade "
            "transformers or turn gradient checkpointing off"
        )

    kept: list[tuple[nn.Module, Any]] = []

    def receives_cache(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not any(value is cache for value in (*args, *kwargs.values())):
            release(kept)  # the call ends here: leave the layers as they were
            raise RuntimeError(
                f"prefix tuning cannot train {model_name} under gradient checkpointing: the model gives its "
                "checkpointed layers no cache, and the prefixes travel in it; turn gradient checkpointing off"
            )

    for layer in layers:
        layer._can_checkpoint_with_cache = True
        kept.append((layer, layer.register_forward_pre_hook(receives_cache, with_kwargs=True)))
    return kept


def release(kept: list[tuple[nn.Module, Any]]) -> None:
    """Undo ``keep_cache_in``."""
    for layer, check in kept:
        layer.__dict__.pop("_can_checkpoint_with_cache", None)
        check.remove()
    kept.clear()
