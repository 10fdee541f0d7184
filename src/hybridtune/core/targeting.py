"""Choosing modules by name pattern, for every architecture, with no per-model tables.

A pattern is either
- a plain dotted name (``q_proj``, ``self_attn.o_proj``): matches a module whose full name equals it
  or ends with ``.`` + it — the same rule as peft's list form;
- a regular expression (anything containing one of ``*+?[](){}|^$\\``): must match the whole
  module name (``re.fullmatch``);
- ``"all-linear"``: every linear layer except the output head. Weights that are not linear layers
  (the fused 3-D expert tensors and the routers of mixture-of-experts models) are not adapted, and
  a TargetWarning says which and how much of the model they hold.

Methods that adapt the fused expert tensors of MoE blocks (``select_expert_tensors``) match the
same patterns against parameter names (``model.layers.0.mlp.experts.gate_up_proj``); a plain
pattern only when it names the module too (``experts.gate_up_proj``), so ``down_proj`` keeps
selecting the linear layers it selects on a dense model, and a pattern that would select linear
layers and expert tensors at once is refused, asking for one pattern each.
"""

from __future__ import annotations

import difflib
import re
import warnings
from collections.abc import Callable, Iterable, Iterator

from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import TargetError, TargetWarning
from .experts import expert_projections, is_fused_experts
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
    if not hasattr(module, "in_features"):  # an MoE router: a [experts, hidden] weight applied as a linear map
        fan_out, fan_in = full_shape(module.weight)
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
    selected_elsewhere: set[str] | frozenset[str] = frozenset(),
) -> list[tuple[str, nn.Module]]:
    """Modules selected by ``patterns`` that ``accept`` allows, in model order.

    Every pattern must select at least one acceptable module (or be one of ``selected_elsewhere``,
    the patterns that selected expert tensors): a pattern that selects nothing is nearly always a
    typo, and silently training fewer layers than asked is the worst outcome.
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
            _warn_unadapted(model, entry, modules, head)
        else:
            selected = [(n, m) for n, m in modules if matches(pattern, n)]
            hits = [(n, m) for n, m in selected if accept(m)]
            if not hits and pattern not in selected_elsewhere:
                raise TargetError(_no_match_message(entry, pattern, selected, modules, accepted_what))
        for name, module in hits:
            if not any(matches(x, name) for x in exclude):
                chosen[name] = module
    if not chosen and not selected_elsewhere:
        raise TargetError(f"entry '{entry}': every module selected by {patterns} is excluded by {exclude}")
    order = {n: i for i, (n, _) in enumerate(modules)}
    return sorted(chosen.items(), key=lambda item: order[item[0]])


def in_model_order(model: nn.Module, chosen: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    order = {n: i for i, (n, _) in enumerate(named_base_modules(model))}
    return sorted(chosen, key=lambda item: order[item[0]])


def _selects_tensor(pattern: str, full_name: str) -> bool:
    if pattern == ALL_LINEAR or (not is_regex(pattern) and "." not in pattern):
        return False
    return matches(pattern, full_name)


def named_projections(
    name: str, module: nn.Module, patterns: list[str], exclude: list[str], parameters: list[str] = ()
) -> list[str]:
    """The projections of experts module ``name`` that ``patterns`` (module-or-tensor patterns,
    see the module docstring) or ``parameters`` (tensor patterns, peft's ``target_parameters``)
    name, minus ``exclude`` (tensor or module names)."""
    if not is_fused_experts(module) or any(matches(x, name) for x in exclude):
        return []
    named = []
    for projection in expert_projections(module):
        full = f"{name}.{projection}"
        if any(matches(x, full) for x in exclude):
            continue
        if any(_selects_tensor(p, full) for p in patterns) or any(matches(p, full) for p in parameters):
            named.append(projection)
    return named


def select_expert_tensors(
    model: nn.Module, patterns: list[str], exclude: list[str], parameters: list[str] = (), entry: str = ""
) -> dict[str, tuple[nn.Module, list[str]]]:
    """The fused expert tensors named (``named_projections``): {experts module name: (module,
    [projection])}, in model order. A pattern that selects linear layers and expert tensors at once
    is refused: which one was meant is not clear."""
    modules = list(named_base_modules(model))
    for pattern in patterns:
        tensor = next((f"{n}.{p}" for n, m in modules for p in named_projections(n, m, [pattern], exclude)), None)
        if tensor is None:
            continue
        linear = next((n for n, m in modules if is_linear(m) and matches(pattern, n)), None)
        if linear is not None:
            raise TargetError(
                f"entry '{entry}': pattern '{pattern}' selects linear layers ({linear}) and fused expert tensors "
                f"({tensor}); split it into a pattern for each (expert tensors may go in target_parameters)"
            )
    chosen = {n: (m, named_projections(n, m, patterns, exclude, parameters)) for n, m in modules}
    return {n: found for n, found in chosen.items() if found[1]}


def any_experts(model: nn.Module) -> bool:
    return any(is_fused_experts(m) for _, m in named_base_modules(model))


def describe_expert_tensors(model: nn.Module) -> str:
    """The expert tensor names of one MoE block, as a pattern names them (``experts.gate_up_proj``)."""
    for name, module in named_base_modules(model):
        if is_fused_experts(module):
            leaf = name.rsplit(".", 1)[-1]
            return ", ".join(f"{leaf}.{p}" for p in expert_projections(module))
    return ""


def _warn_unadapted(model: nn.Module, entry: str, modules: list[tuple[str, nn.Module]], head: nn.Module | None) -> None:
    """Warn when ``all-linear`` leaves out matrices that are not linear layers (MoE experts kept as
    3-D tensors, routers holding a bare weight): never skip most of a model silently."""
    skipped: dict[str, int] = {}
    for name, module in modules:
        if is_linear(module) or module is head or isinstance(module, nn.Embedding):
            continue
        for pname, param in module.named_parameters(recurse=False):
            if param.dim() >= 2:
                pattern = re.sub(r"\.\d+\.", ".*.", f"{name}.{pname}")
                skipped[pattern] = skipped.get(pattern, 0) + param.numel()
    if not skipped:
        return
    total = sum(p.numel() for p in model.parameters())
    share = 100 * sum(skipped.values()) / max(total, 1)
    warnings.warn(
        f"entry '{entry}': '{ALL_LINEAR}' adapts linear layers only; it leaves out {', '.join(sorted(skipped))} "
        f"({share:.0f}% of the model's weights; they are not linear layers, such as the fused expert tensors and "
        "routers of mixture-of-experts models"
        + (
            f"; LoRA adapts the expert tensors when targets name them: {describe_expert_tensors(model)})"
            if any_experts(model)
            else ")"
        ),
        TargetWarning,
        stacklevel=2,
    )


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
        fused = [p for p, t in module.named_parameters(recurse=False) if t.dim() >= 3]
        leaf = name.rsplit(".", 1)[-1]
        why = (f" ({', '.join(fused)} are fused 3-D expert tensors, not linear layers; to adapt them with LoRA, "
               f"name the tensors: {', '.join(f'{leaf}.{p}' for p in fused)})" if fused else "")  # fmt: skip
        return (
            f"entry '{entry}': pattern '{pattern}' matched {name} ({type(module).__name__}){more}, "
            f"but this method needs {accepted_what}{why}"
        )
    tensors = [f"{n}.{p}" for n, m in modules if is_fused_experts(m) for p in expert_projections(m)]
    if any(matches(pattern, t) or t.endswith("." + pattern) for t in tensors):
        return (f"entry '{entry}': pattern '{pattern}' names fused expert tensors (e.g. {tensors[0]}), which this "
                f"method does not adapt (it needs {accepted_what})")  # fmt: skip
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
