"""hybridtune: LoRA, bottleneck Adapters and friends, composed in one transformers model.

The public names below are imported on first use, so ``hybridtune --help`` and other quick
commands do not pay for importing torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "load": ".checkpoint",
    "HybridConfig": ".config",
    "CheckpointError": ".errors",
    "HybridTuneError": ".errors",
    "MergeError": ".errors",
    "TargetError": ".errors",
    "METHODS": ".methods",
    "AdapterConfig": ".methods",
    "DoRAConfig": ".methods",
    "IA3Config": ".methods",
    "LoRAConfig": ".methods",
    "LoRAMixtureConfig": ".methods",
    "MethodConfig": ".methods",
    "ParallelAdapterConfig": ".methods",
    "PrefixTuningConfig": ".methods",
    "PromptTuningConfig": ".methods",
    "HybridModel": ".model",
    "inject": ".model",
    "export_peft": ".peft_interop",
    "import_peft": ".peft_interop",
}

__all__ = [
    "METHODS",
    "AdapterConfig",
    "CheckpointError",
    "DoRAConfig",
    "HybridConfig",
    "HybridModel",
    "HybridTuneError",
    "IA3Config",
    "LoRAConfig",
    "LoRAMixtureConfig",
    "MergeError",
    "MethodConfig",
    "ParallelAdapterConfig",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "TargetError",
    "__version__",
    "export_peft",
    "import_peft",
    "inject",
    "load",
]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'hybridtune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})


if TYPE_CHECKING:
    from .checkpoint import load
    from .config import HybridConfig
    from .errors import CheckpointError, HybridTuneError, MergeError, TargetError
    from .methods import (
        METHODS,
        AdapterConfig,
        DoRAConfig,
        IA3Config,
        LoRAConfig,
        LoRAMixtureConfig,
        MethodConfig,
        ParallelAdapterConfig,
        PrefixTuningConfig,
        PromptTuningConfig,
    )
    from .model import HybridModel, inject
    from .peft_interop import export_peft, import_peft
