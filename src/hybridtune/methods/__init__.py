"""The method registry: ``type`` name -> config class. A new method is one module plus one line here."""

from __future__ import annotations

import difflib
from typing import Any

from .adapter import AdapterConfig
from .base import Branch, MethodConfig
from .dora import DoRAConfig
from .ia3 import IA3Config
from .lora import LoRAConfig
from .lora_mixture import LoRAMixtureConfig
from .parallel_adapter import ParallelAdapterConfig
from .prefix_tuning import PrefixTuningConfig
from .prompt_tuning import PromptTuningConfig

METHODS: dict[str, type[MethodConfig]] = {
    "lora": LoRAConfig,
    "adapter": AdapterConfig,
    "lora_mixture": LoRAMixtureConfig,
    "dora": DoRAConfig,
    "parallel_adapter": ParallelAdapterConfig,
    "ia3": IA3Config,
    "prompt_tuning": PromptTuningConfig,
    "prefix_tuning": PrefixTuningConfig,
}


def method_config(data: dict[str, Any] | MethodConfig) -> MethodConfig:
    """Build the right config class from a plain dict by its ``type`` key."""
    if isinstance(data, MethodConfig):
        return data
    if not isinstance(data, dict):
        raise ValueError(f"a method entry must be a mapping with a 'type' key, got {type(data).__name__}")
    kind = data.get("type")
    if kind is None:
        raise ValueError(f"a method entry needs a 'type' key; known types: {', '.join(METHODS)}")
    if kind not in METHODS:
        close = difflib.get_close_matches(str(kind), list(METHODS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown method type '{kind}'{hint} (known types: {', '.join(METHODS)})")
    return METHODS[kind].model_validate(data)


__all__ = [
    "METHODS",
    "AdapterConfig",
    "Branch",
    "DoRAConfig",
    "IA3Config",
    "LoRAConfig",
    "LoRAMixtureConfig",
    "MethodConfig",
    "ParallelAdapterConfig",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "method_config",
]
