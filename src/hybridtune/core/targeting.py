"""Choosing modules by name pattern, for every architecture, with no per-model tables.

A pattern is either
- a plain dotted name (``q_proj``, ``self_attn.o_proj``): matches a module whose full name equals it
  or ends with ``.`` + it — the same rule as peft's list form;
- a regular expression (anything containing one of ``*+?[](){}|^$\\``): must match the whole
  module name (``re.fullmatch``);
- ``"all-linear"``: every linear layer except the output head.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Iterator

from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import TargetError
from .partitioned import full_shape

BRANCH_ATTR = "hybridtune"
"""Name of the child ModuleDict that holds the branches attached to a target module."""

ALL_LINEAR = "all-linear"
_REGEX_CHARS = set("*+?[](){}|^$\\")


def is_regex(pattern: str) -> bool:
    return any(c in _REGEX_CHARS for c in pattern)


def matches(pattern: str, name: str) -> bool:
    """Whether module ``name`` is selected by ``pattern`` (see the module docstring)."""
    if is_regex(pattern):
        return re.fullmatch(pattern, name) is not None
    return name == pattern or name.endswith("." + pattern)


def first_match(patterns: Iterable[str], name: str) -> str | None:
    """The first pattern, in the order written, that selects ``name``."""
    return next((p for p in patterns if matches(p, name)), None)


def is_linear(module: nn.Module) -> bool:
    """nn.Linear (and subclasses such as bitsandbytes' layers) or GPT-2's transposed Conv1D."""
    return isinstance(module, (nn.Linear, Conv1D))


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like layer; Conv1D stores its weight as [in, out]."""
    if isinstance(module, Conv1D):
        fan_in, fan_out = full_shape(module.weight)
        return int(fan_in), int(fan_out)
    return int(module.in_features), int(module.out_features)


def named_base_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """All modules of the base model, skipping the branches hybridtune itself attached."""
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        name, module = stack.pop()
        yield name, module
        children = [
            (f"{name}.{child_name}" if name else child_name, child)
            for child_name, child in module.named_children()
            if child_name != BRANCH_ATTR
        ]
        stack.extend(reversed(children))


def output_head(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    return getter() if callable(getter) else None


def select_modules(
    model: nn.Module,
    patterns: list[str],
    *,
    entry: str,
    accept: Callable[[nn.Module], bool],
    accepted_what: str,
    exclude: list[str] | None = None,
) -> list[tuple[str, nn.Module]]:
    """Modules selected by ``patterns`` that ``accept`` allows, in model order.

    Every pattern must select at least one acceptable module: a pattern that selects nothing is
    nearly always a typo, and silently training fewer layers than asked is the worst outcome.
    """
    exclude = exclude or []
    modules = [(n, m) for n, m in named_base_modules(model) if n]
    head = output_head(model)
    chosen: dict[str, nn.Module] = {}
    for pattern in patterns:
        if pattern == ALL_LINEAR:
            hits = [(n, m) for n, m in modules if is_linear(m) and m is not head and accept(m)]
            if not hits:
                raise TargetError(f"entry '{entry}': '{ALL_LINEAR}' found no linear layer in this model")
        else:
            selected = [(n, m) for n, m in modules if matches(pattern, n)]
            hits = [(n, m) for n, m in selected if accept(m)]
            if not hits:
                raise TargetError(_no_match_message(entry, pattern, selected, modules, accepted_what))
        for name, module in hits:
            if not any(matches(x, name) for x in exclude):
                chosen[name] = module
    if not chosen:
        raise TargetError(f"entry '{entry}': every module selected by {patterns} is excluded by {exclude}")
    order = {n: i for i, (n, _) in enumerate(modules)}
    return sorted(chosen.items(), key=lambda item: order[item[0]])


def _no_match_message(
    entry: str,
    pattern: str,
    selected: list[tuple[str, nn.Module]],
    modules: list[tuple[str, nn.Module]],
    accepted_what: str,
) -> str:
    if selected:
        name, module = selected[0]
        more = f" and {len(selected) - 1} more" if len(selected) > 1 else ""
        return (
            f"entry '{entry}': pattern '{pattern}' matched {name} ({type(module).__name__}){more}, "
            f"but this method needs {accepted_what}"
        )
    if pattern.lower() in ("all", "all_linear", "linear"):  # LLaMA-Factory's lora_target: all
        return f"entry '{entry}': pattern '{pattern}' matched no module of the model; did you mean '{ALL_LINEAR}'?"
    leaf_names = sorted({n.rsplit(".", 1)[-1] for n, _ in modules})
    pool = leaf_names if "." not in pattern else sorted({n for n, _ in modules})
    close = difflib.get_close_matches(pattern, pool, n=6, cutoff=0.5)
    if not close:
        close = sorted({n.rsplit(".", 1)[-1] for n, m in modules if is_linear(m)})[:12]
        hint = f"linear layers in this model include: {', '.join(close)}"
    else:
        hint = f"close module names in this model: {', '.join(close)}"
    return f"entry '{entry}': pattern '{pattern}' matched no module of the model; {hint}"
