"""What the frozen base needs before branches attach to it, and what of that this machine can do:
k-bit training preparation for a quantized base, and liger-kernel's fused kernels where asked
(core/liger.py)."""

from __future__ import annotations

import torch
from torch import nn

from ..core.base_models import load_skeleton
from ..core.errors import HybridTuneError
from ..core.liger import apply_model_kernels, liger_problem, model_kernels_problem
from ..core.quantization import prepare_for_kbit_training
from .run_config import RunConfig


def kernel_problems(config: RunConfig) -> list[str]:
    """One line per kernel the config asks for that cannot run here (or on this model)."""
    t = config.training
    if not (t.liger_kernels or (t.chunked_loss and t.loss_kernel == "liger")):
        return []
    liger = liger_problem(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    problems = []
    if t.chunked_loss and t.loss_kernel == "liger" and liger is not None:
        problems.append(f"training.loss_kernel: liger, but {liger}; use auto or torch")
    if t.liger_kernels and liger is not None:
        problems.append(f"training.liger_kernels: true, but {liger}; remove the key")
    elif t.liger_kernels:
        try:
            model_type = load_skeleton(config.model)[0].config.model_type
        except HybridTuneError:
            return problems  # the model's own problem is reported where it loads
        unsupported = model_kernels_problem(model_type)
        if unsupported is not None:
            problems.append(f"training.liger_kernels: true, but {unsupported}; remove the key")
    return problems


def prepare_base(base: nn.Module, config: RunConfig) -> None:
    """Ready ``base`` (just loaded, no branches yet) for training under ``config``."""
    if config.model_quantization is not None:
        prepare_for_kbit_training(base)
    if config.training.liger_kernels:
        apply_model_kernels(base)
