"""The keyword a model's forward takes its KV cache by, across transformers releases.

transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name still accepted, with a
warning, and ignored when both are given); code that passes or reads a cache asks here.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

CACHE_KEYWORDS = ("cache", "past_key_values")


def call_cache(kwargs: dict[str, Any]) -> Any:
    """The KV cache this call was given, under either keyword (None when there is none)."""
    for key in CACHE_KEYWORDS:
        if kwargs.get(key) is not None:
            return kwargs[key]
    return None


def cache_keyword(model: nn.Module) -> str:
    """The keyword ``model``'s forward reads its cache from: ``cache`` on transformers >= 5.24."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"


def set_call_cache(kwargs: dict[str, Any], model: nn.Module, cache: Any) -> None:
    """Hand ``cache`` to this call under the keyword the model reads (and no other), so it cannot be
    shadowed by an empty value under the other name."""
    keyword = cache_keyword(model)
    for key in CACHE_KEYWORDS:
        if key != keyword:
            kwargs.pop(key, None)
    kwargs[keyword] = cache


def returned_cache(output: Any) -> Any:
    """The cache a model call returned (``output.cache`` on transformers >= 5.24)."""
    cache = output.get("cache") if hasattr(output, "get") else None
    return cache if cache is not None else getattr(output, "past_key_values", None)
