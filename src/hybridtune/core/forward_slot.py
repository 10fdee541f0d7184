"""Replacing a module's forward on one instance, and giving it back, with accelerate's hooks kept.

accelerate (device_map, offloading) wraps a hooked module's forward and keeps the wrapped one in
``_old_forward``; a replacement goes there, so its hooks keep running. Elsewhere the replacement is
the instance's own ``forward`` attribute. Used by the branches that run inside their target
(core/attach.py) and by serving's decoding products (serving/decode_linear.py).
"""

from __future__ import annotations

import types
from typing import Any

from torch import nn


def _slot(module: nn.Module) -> str:
    return "_old_forward" if hasattr(module, "_hf_hook") and hasattr(module, "_old_forward") else "forward"


def replaced_forward(module: nn.Module) -> Any | None:
    """What runs in place of the module class's own forward on this instance (None: the class's)."""
    slot = _slot(module)
    runner = module.__dict__.get(slot)
    if slot == "_old_forward" and getattr(runner, "__func__", None) is type(module).forward:
        return None
    return runner


def replace_forward(module: nn.Module, runner: Any) -> None:
    setattr(module, _slot(module), runner)


def restore_forward(module: nn.Module) -> None:
    """The module class's own forward again."""
    if _slot(module) == "_old_forward":
        module._old_forward = types.MethodType(type(module).forward, module)
    else:
        module.__dict__.pop("forward", None)
