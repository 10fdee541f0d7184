"""Dropout whose mask is never stored: one Triton kernel draws it from a seed and the element's
index (Philox, ``tl.rand``), applies it and scales by 1/(1 - p), in one pass over the input; the
backward runs the same kernel over the incoming gradient, so it draws the same mask again.

The low-rank methods' input dropout (methods/dropout.py) keeps its masked input for the A
product's gradient anyway; what this saves is the mask, kept until the backward otherwise: one
more tensor the size of each dropped input (q/k/v's, gate/up's, o's and down's, per layer). On a
1B Llama at 8k tokens in bf16 that is ~180 MB a layer. And the mask is drawn, compared and applied
in one kernel instead of three.

The seed comes from torch's CPU generator, so ``torch.manual_seed`` makes runs repeatable and
activation checkpointing's recompute (which restores the RNG state) draws the same mask. The
kernel is skipped (the torch mask is used) under ``torch.compile``'s tracing, for tensors of 2³¹
elements or more, with ``HYBRIDTUNE_TRITON_KERNELS=0``, and for the rest of the process once a
launch fails (a GPU Triton does not support, no C compiler for its launcher), with a warning.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
from typing import Any

import torch

log = logging.getLogger("hybridtune")
BLOCK = 1024
_failed: list[str] = []  # the first launch's error, once one failed


@functools.cache
def _kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["seed"])
    def dropout_kernel(x_ptr, out_ptr, count, seed, p, scale, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < count
        x = tl.load(x_ptr + offsets, mask=inside, other=0.0)
        keep = tl.rand(seed, offsets) >= p
        tl.store(out_ptr + offsets, tl.where(keep, x * scale, 0.0).to(out_ptr.dtype.element_ty), mask=inside)

    return dropout_kernel


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def kernel_runs_on(x: torch.Tensor) -> bool:
    """Whether the kernel serves ``x``: a CUDA tensor where Triton is installed, or any tensor
    under Triton's interpreter (the tests); see the module docstring for when it does not."""
    if not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1") or _failed or x.numel() >= 2**31:
        return False
    if os.environ.get("HYBRIDTUNE_TRITON_KERNELS") == "0" or torch.compiler.is_compiling():
        return False
    return _triton_installed()


def _apply(x: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    count = x.numel()
    if count:
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():  # launch on x's GPU
            _kernel()[(-(-count // BLOCK),)](x, out, count, seed, p, 1.0 / (1.0 - p), BLOCK=BLOCK)
    return out


class SeededDropout(torch.autograd.Function):
    """``x`` with each element zeroed with probability ``p`` and the rest scaled by 1/(1 - p); the
    mask is the seed's, drawn again in the backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, seed: int, p: float) -> torch.Tensor:
        ctx.seed, ctx.p = seed, p
        return _apply(x, seed, p)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return _apply(grad, ctx.seed, ctx.p), None, None


def seeded_dropout(x: torch.Tensor, p: float) -> torch.Tensor | None:
    """Dropout of ``x`` with a fresh seed from torch's CPU generator; None when the kernel cannot
    launch here (it is then not tried again in this process)."""
    seed = int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))
    try:
        return SeededDropout.apply(x, seed, p)
    except Exception as exc:  # any launch failure: the torch mask serves instead
        _failed.append(f"{type(exc).__name__}: {exc}")
        log.warning("the Triton dropout kernel cannot run here (%s); using torch's dropout mask", _failed[0])
        return None
