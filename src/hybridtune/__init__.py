"""hybridtune: LoRA, bottleneck Adapters and friends, composed in one transformers model."""

__version__ = "0.1.0"

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
