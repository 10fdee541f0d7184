"""Shared by prompt and prefix tuning: adjusting a causal LM call for n extra leading positions."""

from __future__ import annotations

from typing import Any

import torch


def is_first_call(kwargs: dict[str, Any]) -> bool:
    """True when no cached tokens exist yet (training, or generate's prefill step)."""
    past = kwargs.get("past_key_values")
    return past is None or (hasattr(past, "get_seq_length") and past.get_seq_length() == 0)


def shift_for_leading_tokens(kwargs: dict[str, Any], n: int, batch: int, new_positions: bool) -> None:
    """Prepend n ones to the attention mask and move positions by n; with ``new_positions`` the n
    leading positions are part of this call's input (prompt tuning's first call) and get 0..n-1."""
    mask = kwargs.get("attention_mask")
    if mask is not None:
        kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)
    for key in ("position_ids", "cache_position"):
        value = kwargs.get(key)
        if value is None:
            continue
        shifted = value + n
        if new_positions:
            head = torch.arange(n, device=value.device, dtype=value.dtype)
            head = head.expand(*value.shape[:-1], n) if value.dim() > 1 else head
            shifted = torch.cat([head, shifted], dim=-1)
        kwargs[key] = shifted


def call_batch(kwargs: dict[str, Any]) -> int:
    for key in ("inputs_embeds", "input_ids"):
        if kwargs.get(key) is not None:
            return kwargs[key].shape[0]
    raise TypeError("the model was called without input_ids or inputs_embeds")
