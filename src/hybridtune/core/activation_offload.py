"""Activation offload: the tensors autograd keeps for the backward wait in CPU memory instead of on
the accelerator, and come back when the backward needs them.

With activation checkpointing most of the memory left on the device is each checkpointed layer's
input (the hidden states): those go to the host, with any other tensor of 1 MiB or more that
autograd keeps outside the checkpointed layers (the final norm's input, say). It is what Unsloth's
"offloaded gradient checkpointing" does (LLaMA-Factory's ``use_unsloth_gc``), built on torch's
saved-tensor hooks. Compared with torch's own ``save_on_cpu``, weights stay where they are
(autograd also keeps each frozen weight it multiplied by, and copying it to the host every step
would cost a transfer and save nothing), small tensors too, and the host never waits: on CUDA the
device-to-host copy goes into pinned memory in stream order, the copy back likewise (the device's
stream does wait for each copy). Other accelerators copy without pinning.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

MIN_BYTES = 1 << 20  # smaller saved tensors are not worth a transfer


def is_weight(tensor: torch.Tensor) -> bool:
    """A parameter, or a view of one (F.linear saves its weight as ``weight.t()``)."""
    return isinstance(tensor, nn.Parameter) or isinstance(tensor._base, nn.Parameter)


class ActivationOffload(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks that move large activations on an accelerator to host memory.

    ``copy_host_tensors`` (for tests, which have no accelerator) treats CPU tensors like device
    ones: they are copied, so what would be offloaded and what comes back can be checked."""

    def __init__(self, min_bytes: int = MIN_BYTES, copy_host_tensors: bool = False) -> None:
        self.min_bytes, self.copy_host_tensors = min_bytes, copy_host_tensors
        self.offloaded_bytes = 0  # what this context has moved, for tests and reports
        super().__init__(self._pack, self._unpack)

    def offloads(self, tensor: torch.Tensor) -> bool:
        on_host = tensor.device.type == "cpu"
        return (
            (not on_host or self.copy_host_tensors)
            and not tensor.is_sparse
            and tensor.numel() * tensor.element_size() >= self.min_bytes
            and not is_weight(tensor)
        )

    def _pack(self, tensor: torch.Tensor):
        if not self.offloads(tensor):
            return tensor
        pinned = tensor.device.type == "cuda"
        host = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=pinned)
        host.copy_(tensor, non_blocking=pinned)
        self.offloaded_bytes += tensor.numel() * tensor.element_size()
        return tensor.device, host

    @staticmethod
    def _unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed  # autograd gives the result back its grad_fn or requires_grad
        return host.to(device, non_blocking=device.type == "cuda")


def checkpointing_is_on(model: nn.Module) -> bool:
    """Whether transformers' activation checkpointing is on in ``model`` (the newer name first)."""
    on = getattr(model, "is_activation_checkpointing", None)
    return bool(on if on is not None else getattr(model, "is_gradient_checkpointing", False))


def offloaded_activations(enabled: bool) -> contextlib.AbstractContextManager:
    """The context a training forward runs in: the offload hooks where ``enabled`` and gradients
    are being recorded, nothing otherwise (evaluation, generation)."""
    if enabled and torch.is_grad_enabled():
        return ActivationOffload()
    return contextlib.nullcontext()
