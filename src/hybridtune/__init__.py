"""hybridtune: LoRA, bottleneck Adapters and friends, composed in one transformers model.

The public names below are imported on first use, so ``hybridtune --help`` and other quick
commands do not pay for importing torch and transformers. Every registered method's config
class is a public name too (``hybridtune.LoRAConfig``, ...): see ``hybridtune.methods``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "HybridConfig": ".core.config",
    "CheckpointError": ".core.errors",
    "HybridTuneError": ".core.errors",
    "MergeError": ".core.errors",
    "TargetError": ".core.errors",
    "HybridModel": ".core.model",
    "inject": ".core.model",
    "load": ".core.model",
    "export_peft": ".interop.peft_format",
    "import_peft": ".interop.peft_format",
    "HybridTrainer": ".interop.trainer",
    "hybrid_trainer": ".interop.trainer",
    "METHODS": ".methods",
    "MethodConfig": ".methods",
    "register_method": ".methods",
}

_PEFT_NAMES = {"LoraConfig": "LoRAConfig"}
_SUBPACKAGES = {"core", "methods", "training", "interop", "serving", "ui", "cli"}

__all__ = [
    "METHODS",
    "CheckpointError",
    "HybridConfig",
    "HybridModel",
    "HybridTrainer",
    "HybridTuneError",
    "MergeError",
    "MethodConfig",
    "TargetError",
    "__version__",
    "export_peft",
    "hybrid_trainer",
    "import_peft",
    "inject",
    "load",
    "register_method",
]


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:  # ``hybridtune.training`` without importing it first
        return importlib.import_module(f".{name}", __name__)
    if name in _PEFT_NAMES:  # peft's class names, as a peft user types them
        return getattr(importlib.import_module(".methods", __name__), _PEFT_NAMES[name])
    module = _PUBLIC.get(name)
    if module is None:
        if name.endswith("Config"):  # a registered method's config class
            methods = importlib.import_module(".methods", __name__)
            value = getattr(methods, name, None)
            if value is not None:
                return value
        raise AttributeError(f"module 'hybridtune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})


if TYPE_CHECKING:
    from .core.config import HybridConfig
    from .core.errors import CheckpointError, HybridTuneError, MergeError, TargetError
    from .core.model import HybridModel, inject, load
    from .interop.peft_format import export_peft, import_peft
    from .interop.trainer import HybridTrainer, hybrid_trainer
    from .methods import METHODS, MethodConfig, register_method
