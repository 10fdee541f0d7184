"""Shared by prompt and prefix tuning: adjusting a causal LM call for n extra leading positions."""

from __future__ import annotations

from typing import Any

import torch

from ..core.kv_cache import call_cache

PREFIX_POSITIONS = "hybridtune_prefix_positions"  # set on a cache: positions that prefixes wrote into it


def prefix_positions(kwargs: dict[str, Any]) -> int:
    """Positions the call's cache holds from prefix tuning entries (written on the first call)."""
    return getattr(call_cache(kwargs), PREFIX_POSITIONS, 0)


def is_first_call(kwargs: dict[str, Any]) -> bool:
    """True when the cache holds no tokens yet besides the prefixes written in this same call
    (training, or generate's prefill step): every virtual-token entry of a call then sees it as
    the first, whatever the entries' order."""
    past = call_cache(kwargs)
    return past is None or (hasattr(past, "get_seq_length") and past.get_seq_length() == prefix_positions(kwargs))


def shift_for_leading_tokens(kwargs: dict[str, Any], n: int, batch: int, new_positions: bool, start: int = 0) -> None:
    """Prepend n ones to the attention mask and move positions by n; with ``new_positions`` the n
    leading positions are part of this call's input (prompt tuning's first call) and get
    start..start+n-1 (``start``: the prefix positions already before them)."""
    mask = kwargs.get("attention_mask")
    if mask is not None:
        kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)
    for key in ("position_ids", "cache_position"):
        value = kwargs.get(key)
        if value is None:
            continue
        shifted = value + n
        if new_positions:
            head = torch.arange(start, start + n, device=value.device, dtype=value.dtype)
            head = head.expand(*value.shape[:-1], n) if value.dim() > 1 else head
            shifted = torch.cat([head, shifted], dim=-1)
        kwargs[key] = shifted


def call_batch(kwargs: dict[str, Any]) -> int:
    for key in ("inputs_embeds", "input_ids"):
        if kwargs.get(key) is not None:
            return kwargs[key].shape[0]
    raise TypeError("the model was called without input_ids or inputs_embeds")
