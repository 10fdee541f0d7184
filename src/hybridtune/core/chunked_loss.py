"""The causal-LM loss without its logits: the output head's matmul and the cross-entropy computed
chunk by chunk, so no [batch, sequence, vocabulary] tensor is ever held.

SmolLM2's vocabulary is 49,152: a batch of 8 x 128 tokens makes 201 MB of fp32 logits, as much
again for their gradient, plus log-softmax intermediates. Here each chunk of rows computes its
logits, its loss terms and, in the same pass, the gradient with respect to its hidden states
(softmax - one-hot, times the head's weight); only that [rows, hidden] gradient is kept for the
backward. The head is frozen in PEFT, so its weight needs no gradient: that is the case this
covers, and ``supports_chunked_loss`` says when a model is in it. The values and gradients equal
transformers' loss (logits upcast to fp32, labels shifted, -100 ignored, mean over label tokens)
to fp32 rounding; tests/test_chunked_loss.py checks both.

On CUDA, where liger-kernel is installed (``pip install hybridtune[liger]``), the same loss is
computed by its fused linear cross-entropy (Triton kernels, chunked the same way): the ``auto``
kernel. ``torch`` forces the version here, ``liger`` forces liger's (core/liger.py says where it
can run; tests/test_liger.py compares the two under Triton's interpreter).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from .liger import fused_linear_cross_entropy, liger_problem

IGNORE_INDEX = -100
LossKernel = Literal["auto", "liger", "torch"]
_CHUNK_ELEMENTS = 1 << 23  # logits per chunk (32 MB in fp32)
# config attributes that change the logits after the head's matmul (Gemma's softcapping, Cohere's
# scale, ...): a model with any of them set computes its own logits, so it keeps the plain loss
_LOGIT_CHANGES = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale",
                  "lm_head_multiplier")  # fmt: skip
# architectures whose causal-LM forward is exactly lm_head(last hidden state) then transformers'
# loss; any other keeps its own forward (a model type is added here once its forward is read)
PLAIN_HEAD_TYPES = {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gpt2", "phi3",
                    "olmo2", "starcoder2", "stablelm", "smollm3", "gemma"}  # fmt: skip


def supports_chunked_loss(model: nn.Module) -> bool:
    """Whether ``model``'s loss is a plain frozen linear head over its decoder's last hidden
    states, with nothing of ours on the head or on the model itself (prompt and prefix tuning)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if type(head) is not nn.Linear or decoder is None or decoder is model or head.bias is not None:
        return False
    if head.weight.requires_grad or hasattr(head.weight, "ds_id") or type(head.weight) is not nn.Parameter:
        return False  # a trained, partitioned (ZeRO-3) or sharded (DTensor) head
    if any(name == "hybridtune" for name, _ in head.named_children()) or hasattr(model, "hybridtune"):
        return False  # branches on the head, or on the model's own forward
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_HEAD_TYPES:
        return False
    if getattr(config, "output_router_logits", False):  # MoE: the forward adds the router's loss
        return False
    return not any(getattr(config, key, None) not in (None, 1, 1.0) for key in _LOGIT_CHANGES)


def _half_precision(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """fp16 logits: liger writes the logits' gradient in their dtype in the forward, before any
    loss scaling, and most of it underflows fp16 at a large vocabulary; the torch kernel keeps it
    in fp32 and scales it with the incoming gradient."""
    autocast_fp16 = torch.is_autocast_enabled(hidden.device.type) and (
        torch.get_autocast_dtype(hidden.device.type) == torch.float16
    )
    return torch.float16 in (hidden.dtype, weight.dtype) or autocast_fp16


def resolve_loss_kernel(kernel: LossKernel, device: torch.device, fp16: bool = False) -> Literal["liger", "torch"]:
    """The kernel ``kernel`` means on ``device``: ``auto`` is liger's on CUDA where it is installed,
    except for fp16 logits (``fp16``)."""
    if kernel not in ("auto", "liger", "torch"):
        raise ValueError(f"chunked_loss: unknown kernel {kernel!r}; expected auto, liger or torch")
    if kernel == "auto":
        return "liger" if device.type == "cuda" and not fp16 and liger_problem(device) is None else "torch"
    return kernel


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         kernel: LossKernel = "auto") -> torch.Tensor:  # fmt: skip
    """Mean cross-entropy of ``hidden @ weightᵀ`` against ``labels`` (-100 ignored), never holding
    the logits; ``weight`` (the frozen head) gets no gradient.

    Only labelled rows go through the head: a prompt's tokens and the padding have no label, and
    their logits would be computed only to be masked (transformers' loss and liger's compute them
    all). In supervised fine-tuning that is often most of a batch."""
    global _last_kernel
    chosen = _last_kernel = resolve_loss_kernel(kernel, hidden.device, _half_precision(hidden, weight))
    rows = (labels != IGNORE_INDEX).nonzero().squeeze(1)
    if len(rows) < len(labels):  # the gradient of the rows left out is zero (index_select's backward)
        hidden, labels = hidden.index_select(0, rows), labels.index_select(0, rows)
    if chosen == "liger" and labels.numel():
        return fused_linear_cross_entropy(hidden, weight, labels, IGNORE_INDEX)
    return ChunkedLinearCrossEntropy.apply(hidden, weight, labels)  # no label at all: 0


def chunked_causal_lm_forward(model: nn.Module, args: tuple, kwargs: dict[str, Any],
                              kernel: LossKernel = "auto") -> CausalLMOutputWithPast:  # fmt: skip
    """``model(*args, **kwargs)`` with ``labels``, returning the loss (no logits)."""
    labels = kwargs.pop("labels")
    kwargs.pop("logits_to_keep", None)
    kwargs.pop("num_items_in_batch", None)
    hidden = model.get_decoder()(*args, **kwargs)[0]
    head = model.get_output_embeddings()
    # position t predicts label t + 1; a row's last position predicts nothing (no copy of the hidden states)
    shifted = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)
    loss = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight, shifted.reshape(-1), kernel)
    return CausalLMOutputWithPast(loss=loss, logits=None)


def last_loss_kernel(forget: bool = False) -> str:
    """What computed the last chunked loss in this process, ``liger`` or ``torch``; ``plain``
    when none ran (the model computes its own logits): what summary.json reports. ``forget``:
    start over (a run's beginning)."""
    global _last_kernel
    if forget:
        _last_kernel = "plain"
    return _last_kernel


_last_kernel = "plain"


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """mean over labelled rows of cross_entropy(hidden @ weightᵀ, labels), in chunks of rows;
    ``weight`` gets no gradient (a frozen head)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        rows = max(1, _CHUNK_ELEMENTS // weight.shape[0])
        wants_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(hidden) if wants_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        count = (labels != IGNORE_INDEX).sum()
        for start in range(0, hidden.shape[0], rows):
            h, y = hidden[start : start + rows], labels[start : start + rows]
            logits = F.linear(h, weight).float()  # as the head computes them (autocast included), upcast
            keep = y != IGNORE_INDEX
            target = y.clamp(min=0)
            lse = torch.logsumexp(logits, dim=-1)
            total += ((lse - logits.gather(1, target[:, None]).squeeze(1)) * keep).sum()
            if wants_grad:  # d(sum of losses)/d(logits) = softmax - one-hot, on labelled rows
                probs = logits.sub_(lse[:, None]).exp_()
                probs[torch.arange(len(y), device=y.device), target] -= 1.0
                probs.mul_(keep[:, None])
                grad[start : start + rows] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)
        denominator = count.clamp(min=1).float()
        if wants_grad:
            # kept on ctx, not saved: intermediates (neither input nor output) may be, and saved-tensor
            # hooks (activation offload) would send this gradient to the host and straight back
            ctx.grad, ctx.denominator = grad, denominator
        return total / denominator

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        grad, denominator = ctx.grad, ctx.denominator
        return grad * (grad_output / denominator).to(grad.dtype), None, None
