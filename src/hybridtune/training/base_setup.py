"""What the frozen base needs before branches attach to it, and what of that this machine can do:
k-bit training preparation for a quantized base, and liger-kernel's fused kernels where asked
(core/liger.py)."""

from __future__ import annotations

import torch
from torch import nn

from ..core.liger import apply_model_kernels, liger_problem, model_kernels_problem
from ..core.quantization import prepare_for_kbit_training
from .run_config import ConfigError, RunConfig


def kernel_problems(config: RunConfig) -> list[str]:
    """One line per kernel the config asks for that cannot run on this machine (the model's own
    fit for liger's kernels is checked once it is loaded: ``prepare_base``)."""
    t = config.training
    liger_loss = t.chunked_loss and t.loss_kernel == "liger"
    if not (t.liger_kernels or liger_loss):
        return []
    liger = liger_problem(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    problems = []
    if liger_loss and liger is not None:
        problems.append(f"training.loss_kernel: liger, but {liger}; use auto or torch")
    elif liger_loss and "fp16" in (t.precision, t.base_dtype):
        problems.append("training.loss_kernel: liger with fp16: liger writes the logits' gradient in fp16 "
                        "before loss scaling, where most of it underflows; use auto (the torch kernel for fp16) "
                        "or bf16")  # fmt: skip
    if t.liger_kernels and liger is not None:
        problems.append(f"training.liger_kernels: true, but {liger}; remove the key")
    return problems


def prepare_base(base: nn.Module, config: RunConfig) -> None:
    """Ready ``base`` (just loaded, no branches yet) for training under ``config``."""
    if config.model_quantization is not None:
        prepare_for_kbit_training(base)
    if config.training.liger_kernels:
        unsupported = model_kernels_problem(base.config)
        if unsupported is not None:
            raise ConfigError([f"training.liger_kernels: true, but {unsupported}; remove the key"])
        apply_model_kernels(base)
