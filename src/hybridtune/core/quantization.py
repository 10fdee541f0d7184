"""Quantized bases (QLoRA-style): the YAML section, loading through transformers + bitsandbytes,
and getting a k-bit model ready to train branches on top of it.

bitsandbytes' kernels need a CUDA GPU, so the environment is checked before anything loads: a
CPU machine gets one clear sentence instead of a stack trace from deep inside a loader.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Literal

import torch
from torch import nn

from .validation import StrictModel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class QuantizationConfig(StrictModel):
    """``model_quantization:`` in the run YAML."""

    bits: Literal[4, 8] = 4
    type: Literal["nf4", "fp4"] = "nf4"  # 4-bit only
    double_quant: bool = True  # 4-bit only: quantise the quantisation constants too
    compute_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"

    @property
    def torch_compute_dtype(self) -> torch.dtype:
        return DTYPES[self.compute_dtype]

    def bnb_config(self) -> Any:
        from transformers import BitsAndBytesConfig

        if self.bits == 8:
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.type,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=self.torch_compute_dtype,
        )


def quantization_problems(config: QuantizationConfig | None) -> list[str]:
    """Why a quantized base cannot load on this machine (empty when it can)."""
    if config is None:
        return []
    if not torch.cuda.is_available():
        return [
            f"model_quantization: {config.bits}-bit bases load through bitsandbytes, which needs a CUDA GPU, and "
            "this machine has none; remove model_quantization to train the full-precision base here"
        ]
    if importlib.util.find_spec("bitsandbytes") is None:
        return ["model_quantization: the bitsandbytes package is not installed: pip install bitsandbytes"]
    return []


def is_quantized(module: nn.Module) -> bool:
    """Whether a layer's weight is stored quantized (bitsandbytes' Params4bit/Int8Params or any
    integer tensor): such a weight cannot take a merged delta or give a norm directly."""
    weight = getattr(module, "weight", None)
    if weight is None:
        return False
    return not weight.is_floating_point() or hasattr(weight, "quant_state") or hasattr(weight, "SCB")


def _back_to_input_dtype(module: nn.Module, args: tuple, output: Any) -> Any:
    if args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
        return output.to(args[0].dtype)
    return output


def keep_norms_fp32(model: nn.Module) -> nn.Module:
    """Normalisation weights in fp32, their outputs back in the dtype that came in.

    Norm weights are tiny, and scaling in half precision on top of 4-bit weights is where training
    goes unstable; the output returns to the compute dtype so the next (half-precision) layer
    gets what it expects, with or without autocast. ``load_base`` does this for every quantized
    base, so training and later inference compute the same thing.
    """
    for module in model.modules():
        if "norm" not in type(module).__name__.lower():
            continue
        params = [p for p in module.parameters(recurse=False) if p.is_floating_point() and p.dtype != torch.float32]
        for param in params:
            param.data = param.data.float()
        if params:
            module.register_forward_hook(_back_to_input_dtype)
    return model


def prepare_for_kbit_training(model: nn.Module) -> nn.Module:
    """Freeze a quantized base (its norms are fp32 already when it came from ``load_base``).

    Everything else stays in the compute dtype to keep the memory saving (unlike a cast of every
    non-quantized weight to fp32, which doubles the embedding's memory). Gradient checkpointing
    on top needs no grad-requiring input: hybridtune uses non-reentrant checkpointing.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    return keep_norms_fp32(keep_training_layout(model))


def keep_training_layout(model: nn.Module) -> nn.Module:
    """Keep bitsandbytes' 4-bit layers on the path they train with, in eval mode too.

    On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight for an inference kernel the
    first time the layer runs in eval mode without gradients (the evaluation before training does),
    and from then on computes through that kernel: it has no backward, so training after it gets
    no gradient through the base, and it computes in bf16, whatever the compute dtype (logits 0.13
    off the training path's on a test model). ``load_base`` does this for every quantized base, so
    evaluation, serving and training compute the same thing on every CPU.
    """
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):  # bitsandbytes' Linear4bit
            module.support_avx512bf16_for_cpu = False
    return model
