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
import inspect
import os
from typing import Any

import torch
from torch import nn


def liger_problem(device: torch.device) -> str | None:
    """Why liger-kernel's kernels cannot run on ``device`` here (None: they can)."""
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install 'hybridtune[liger]')"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"its Triton kernels need a CUDA device, not {device.type}"
    return None


def model_kernels_problem(config: Any) -> str | None:
    """Why liger's base-model kernels do not fit a model with this transformers ``config`` (None:
    they do): its type has none, or its MLP's activation is not the SiLU liger's SwiGLU computes."""
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except Exception as exc:  # an installed liger-kernel that does not import with these transformers
        return f"liger-kernel does not import here ({type(exc).__name__}: {exc})"
    model_type = getattr(config, "model_type", None)
    apply = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    if apply is None:
        return f"liger-kernel has no kernels for model type '{model_type}'"
    activation = getattr(config, "hidden_act", "silu")
    if "swiglu" in inspect.signature(apply).parameters and activation not in ("silu", "swish"):
        return f"liger's SwiGLU computes SiLU, and this {model_type} model's hidden_act is '{activation}'"
    return None


def apply_model_kernels(model: nn.Module) -> None:
    """Replace ``model``'s RMSNorm, rotary embedding and gated-MLP computations (SwiGLU; GeGLU
    for Gemma) by liger's, in place; the LM head and loss stay as they are (the chunked loss picks
    its own kernel). liger also patches the model type's transformers classes and rotary function
    for the whole process, so models of that type built later in it get them too (as under
    LLaMA-Factory). Modules that branches run inside (MoE experts with LoRA) keep transformers'
    own computation."""
    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

    problem = model_kernels_problem(model.config)
    if problem is not None:
        raise ValueError(problem)
    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, geglu=True,
                                    cross_entropy=False, fused_linear_cross_entropy=False)  # fmt: skip


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               ignore_index: int) -> torch.Tensor:  # fmt: skip
    """liger's mean cross-entropy of ``hidden @ weightᵀ`` (labels equal to ``ignore_index`` left out)."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(ignore_index=ignore_index)(weight, hidden, labels)
