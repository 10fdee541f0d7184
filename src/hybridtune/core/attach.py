"""Attaching method branches to a base model, and taking them off again.

Branches live in a ``hybridtune`` ModuleDict child of their target module (so device moves,
dtype casts, FSDP wrapping and gradient checkpointing treat them as part of that layer) and run
from one forward hook per target, in entry order. The base model's own module names never change.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch import nn

from ..methods import Branch
from ..methods.base import first_input
from .config import HybridConfig
from .experts import describe as describe_experts
from .experts import is_fused_experts, tokens_of_rows
from .forward_slot import replace_forward, replaced_forward, restore_forward
from .partitioned import full_shape
from .routing import current as current_routing
from .targeting import BRANCH_ATTR

DEFAULT_SET = "default"


def _run_branches(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    routing = current_routing()
    if routing is None or routing.rows is None:
        for branch in module._modules[BRANCH_ATTR].values():
            if branch.active and not branch.runs_inside:
                output = branch(args, kwargs, output)
        return output
    batch = (output if isinstance(output, torch.Tensor) else output[0]).shape[0]
    for branch in module._modules[BRANCH_ATTR].values():
        rows = None if branch.runs_inside else routing.rows_for(branch.set_name, batch)
        if rows is None:
            continue
        # every row is the branch's (rows are unique): its plain forward, without gathering rows
        output = branch(args, kwargs, output) if rows.numel() == batch else branch.routed(args, kwargs, output, rows)
    return output


def _run_pre_branches(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    routing = current_routing()
    for branch in module._modules[BRANCH_ATTR].values():
        if not branch.modifies_input:
            continue
        if routing is None or routing.rows is None:
            if branch.active:
                args, kwargs = branch.pre(args, kwargs)
            continue
        batch = first_input(args, kwargs).shape[0]
        rows = routing.rows_for(branch.set_name, batch)
        if rows is not None:
            args, kwargs = branch.pre(args, kwargs) if rows.numel() == batch else branch.routed_pre(args, kwargs, rows)
    return args, kwargs


def _run_inside(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The forward of a module with branches that run inside its computation (``runs_inside``):
    their class's ``run_target`` computes the module with each live branch, for the tokens of the
    rows its set serves in a mixed batch; with none live, the module's own forward."""
    routing = current_routing()
    live = [b for b in module._modules[BRANCH_ATTR].values() if b.runs_inside and not b.merged]
    if routing is None or routing.rows is None:
        chosen = [(b, None) for b in live if b.active]
    else:
        hidden = first_input(args, kwargs)
        tokens = hidden.numel() // hidden.shape[-1]  # an MoE block's modules see its tokens flattened
        chosen = []
        for branch in live:
            rows = routing.rows_for(branch.set_name, routing.batch)
            if rows is not None:
                chosen.append((branch, tokens_of_rows(rows, routing.batch, tokens)))
    if not chosen:
        return type(module).forward(module, *args, **kwargs)
    return type(chosen[0][0]).run_target(module, chosen, *args, **kwargs)


def _install_inside(module: nn.Module) -> None:
    """Make ``_run_inside`` the module's forward (core/forward_slot.py: accelerate's hooks stay)."""
    replace_forward(module, functools.partial(_run_inside, module))


def _remove_inside(module: nn.Module) -> None:
    """Undo ``_install_inside`` (only its runner: another instance forward stays)."""
    runner = replaced_forward(module)
    if isinstance(runner, functools.partial) and runner.func is _run_inside:
        restore_forward(module)


def branch_key(set_name: str, entry: str) -> str:
    """Key of a branch in its target's ModuleDict: the entry name, qualified for non-default sets."""
    return entry if set_name == DEFAULT_SET else f"{set_name}:{entry}"


def split_key(key: str) -> tuple[str, str]:
    set_name, _, entry = key.rpartition(":")
    return (set_name or DEFAULT_SET), entry


def attach(module: nn.Module, key: str, branch: Branch) -> None:
    branches = module._modules.get(BRANCH_ATTR)
    if branches is None:
        branches = nn.ModuleDict()
        module.add_module(BRANCH_ATTR, branches)
    if key in branches:
        raise ValueError(f"module already has a branch '{key}'")
    if branch.runs_inside:
        runners = {type(b).run_target for b in branches.values() if b.runs_inside}
        if runners - {type(branch).run_target}:
            raise ValueError(f"module already has branches computed by another run_target than '{key}'")
        _install_inside(module)
    elif _run_branches not in module._forward_hooks.values():
        module.register_forward_hook(_run_branches, with_kwargs=True)
    branches[key] = branch
    if branch.modifies_input and _run_pre_branches not in module._forward_pre_hooks.values():
        module.register_forward_pre_hook(_run_pre_branches, with_kwargs=True)


def sync_hook(module: nn.Module) -> None:
    """Run the branch hook only while some branch of the module is unmerged: a module whose LoRA is
    all merged then costs exactly what the base module costs (no hook call per forward)."""
    branches = module._modules.get(BRANCH_ATTR)
    needed = branches is not None and any(not b.merged and not b.runs_inside for b in branches.values())
    present = _run_branches in module._forward_hooks.values()
    if needed and not present:
        module.register_forward_hook(_run_branches, with_kwargs=True)
    elif not needed:
        _remove_hook(module._forward_hooks, module._forward_hooks_with_kwargs, _run_branches)


def move_input_hook_last(module: nn.Module) -> None:
    """Re-register the module's input hook after every hook added since (an engine's own, such as
    DeepSpeed ZeRO-3's fetch of the module's weights), so it runs after them."""
    if _run_pre_branches in module._forward_pre_hooks.values():
        _remove_hook(module._forward_pre_hooks, module._forward_pre_hooks_with_kwargs, _run_pre_branches)
        module.register_forward_pre_hook(_run_pre_branches, with_kwargs=True)


def _remove_hook(hooks: dict, with_kwargs: dict, fn: Any) -> None:
    """Unregister ``fn`` from one of a module's hook dicts (handles do not survive deepcopy, so
    hooks are found by function)."""
    for key, hook in list(hooks.items()):
        if hook is fn:
            del hooks[key]
            with_kwargs.pop(key, None)


def detach(module: nn.Module, key: str) -> None:
    branches = module._modules[BRANCH_ATTR]
    del branches[key]
    if not any(b.modifies_input for b in branches.values()):
        _remove_hook(module._forward_pre_hooks, module._forward_pre_hooks_with_kwargs, _run_pre_branches)
    if not any(b.runs_inside for b in branches.values()):
        _remove_inside(module)
    if not any(not b.runs_inside for b in branches.values()):
        _remove_hook(module._forward_hooks, module._forward_hooks_with_kwargs, _run_branches)
    if len(branches) == 0:
        del module._modules[BRANCH_ATTR]


class Attached(NamedTuple):
    """One attached branch and where it sits."""

    set_name: str
    entry: str
    target: str  # the target module's name in the base model
    module: nn.Module  # the target module
    branch: Branch


def iter_branches(model: nn.Module) -> Iterator[Attached]:
    """Every attached branch, in model order."""
    for name, module in model.named_modules():
        branches = module._modules.get(BRANCH_ATTR)
        if branches is None:
            continue
        for key, branch in branches.items():
            set_name, entry = split_key(key)
            yield Attached(set_name, entry, name, module, branch)


def describe_target(module: nn.Module) -> dict[str, Any]:
    weight = getattr(module, "weight", None)
    if weight is None and is_fused_experts(module):  # its tensors' full shapes
        return {"class": type(module).__name__, "shape": describe_experts(module)}
    return {
        "class": type(module).__name__,
        "shape": list(full_shape(weight)) if weight is not None and hasattr(weight, "shape") else None,
    }


def fingerprint(targets: dict[str, dict[str, Any]]) -> str:
    """Hash of every targeted module's name, class and weight shape: same base layout, same hash."""
    blob = json.dumps(targets, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def attach_config(
    model: nn.Module, config: HybridConfig, existing: set[str], set_name: str = DEFAULT_SET
) -> dict[str, dict[str, Any]]:
    """Select every entry's targets on the untouched model first, then attach; return the targets."""
    clash = existing & set(config.methods)
    if clash:
        raise ValueError(f"entry name(s) already in the model: {', '.join(sorted(clash))}")
    plan = [(entry, cfg, cfg.select_targets(model, entry)) for entry, cfg in config.methods.items()]
    targets: dict[str, dict[str, Any]] = {}
    for entry, cfg, chosen in plan:
        cfg.begin_attach()
        for name, module in chosen:
            branch = cfg.build_branch(entry, name, module, model)
            branch.train(module.training)  # a base in eval() (as from_pretrained returns it) gets no live dropout
            branch.set_name = set_name
            attach(module, branch_key(set_name, entry), branch)
            targets[name] = describe_target(module)
    return targets
