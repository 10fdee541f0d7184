"""liger-kernel's fused Triton kernels, where they can run: the loss's (core/chunked_loss.py) and
the base model's RMSNorm, rotary embedding and SwiGLU MLP (``training.liger_kernels``, what
LLaMA-Factory's ``enable_liger_kernel`` applies).

Branches run from forward hooks on their target modules (core/attach.py), and liger replaces the
forward of the norm and MLP modules on the instance, so every branch still runs around the
patched computation: a hybrid gets the fused base kernels too. liger-kernel is the optional
``[liger]`` extra; its kernels need a CUDA device, or Triton's interpreter (``TRITON_INTERPRET=1``,
read when the kernels are defined: how the tests run them on the CPU).
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import nn


def liger_problem(device: torch.device) -> str | None:
    """Why liger-kernel's kernels cannot run on ``device`` here (None: they can)."""
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install 'hybridtune[liger]')"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"its Triton kernels need a CUDA device, not {device.type}"
    return None


def model_kernels_problem(model_type: str | None) -> str | None:
    """Why liger has no base-model kernels for ``model_type`` (None: it has)."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    if model_type in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return None
    return f"liger-kernel has no kernels for model type '{model_type}'"


def apply_model_kernels(model: nn.Module) -> None:
    """Replace ``model``'s RMSNorm, rotary embedding and SwiGLU computations by liger's, in place
    (the LM head and loss stay as they are: the chunked loss picks its own kernel). liger also
    patches the model type's transformers classes, so models of that type built later in this
    process get them too, as under LLaMA-Factory."""
    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

    problem = model_kernels_problem(getattr(model.config, "model_type", None))
    if problem is not None:
        raise ValueError(problem)
    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True,
                                    cross_entropy=False, fused_linear_cross_entropy=False)  # fmt: skip


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               ignore_index: int) -> torch.Tensor:  # fmt: skip
    """liger's mean cross-entropy of ``hidden @ weightᵀ`` (labels equal to ``ignore_index`` left out)."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(ignore_index=ignore_index)(weight, hidden, labels)
