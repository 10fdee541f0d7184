"""The method registry: ``type`` name -> config class.

A new method is one module in this package (its config, a MethodConfig subclass with a
``type: Literal["name"]`` field, and its branch) plus its module name in METHOD_MODULES.
Everything else — YAML validation, the CLI, the web UI, checkpoints, ``hybridtune.NameConfig`` —
finds it here and asks the config what it can do. Methods defined elsewhere (a plugin, a test)
join with ``register_method``.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any

from .base import Branch, MethodConfig

# the registry line: one module name per method, in the order the docs and the UI list them (the
# UI's starter config enables the first two: see STARTER_METHODS in ui/backend.py)
METHOD_MODULES = (
    "lora", "adapter", "lora_mixture", "dora", "parallel_adapter", "ia3", "prompt_tuning", "prefix_tuning",
)  # fmt: skip

METHODS: dict[str, type[MethodConfig]] = {}


def register_method(config_class: type[MethodConfig]) -> type[MethodConfig]:
    """Make ``config_class`` available under its ``type`` name (usable as a class decorator)."""
    kind = config_class.model_fields["type"].default
    if not isinstance(kind, str):
        raise TypeError(f"{config_class.__name__} needs a `type: Literal['name'] = 'name'` field to be registered")
    if METHODS.get(kind, config_class) is not config_class:
        raise ValueError(f"method type '{kind}' is registered already ({METHODS[kind].__name__})")
    METHODS[kind] = config_class
    return config_class


def unregister_method(kind: str) -> None:
    """Remove a method registered with ``register_method`` (tests, plugins being unloaded)."""
    METHODS.pop(kind, None)


def _method_of(module: Any) -> type[MethodConfig]:
    """The one registrable config class a method module defines."""
    found = [
        value
        for value in vars(module).values()
        if isinstance(value, type) and issubclass(value, MethodConfig) and value.__module__ == module.__name__
        and isinstance(value.model_fields["type"].default, str)
    ]  # fmt: skip
    if len(found) != 1:
        raise TypeError(f"method module {module.__name__} must define one MethodConfig with a type name, not {found}")
    return found[0]


for _name in METHOD_MODULES:
    register_method(_method_of(importlib.import_module(f".{_name}", __name__)))


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


def __getattr__(name: str) -> type[MethodConfig]:
    """Registered config classes by class name: ``methods.LoRAConfig``, ``hybridtune.LoRAConfig``."""
    for config_class in METHODS.values():
        if config_class.__name__ == name:
            return config_class
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *(c.__name__ for c in METHODS.values())})


__all__ = ["METHODS", "Branch", "MethodConfig", "method_config", "register_method", "unregister_method"]
