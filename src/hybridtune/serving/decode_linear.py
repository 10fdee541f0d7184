"""Linear layers computed weight-first for the few rows of a decoding step, where that is faster.

A decoding step multiplies one row per live request by every weight of the model. ``F.linear``
asks the BLAS for ``x · Wᵀ``; for a handful of rows MKL's sgemm on some CPUs is far slower at that
than at the same product taken weight-first, ``(W · xᵀ)ᵀ``: on this project's 2-core CI machine
(AMD EPYC, MKL's AVX2 path) 1.4-2x on SmolLM2's layers and 3x on its LM head for 2-16 rows.
Whether it pays is a property of the CPU, its BLAS and the weight's shape, so ``install``
measures both products once per weight shape of the model and changes only the layers whose shape
is clearly faster weight-first.

Only plain ``nn.Linear`` layers of a CPU float32 model change (not one whose forward something
else replaced already), and only for inputs of 2..``most_rows`` token rows (a decoding step, or a
prefill chunk that short); one row and longer chunks run ``F.linear`` as before. Results agree with
``F.linear`` to fp32 rounding (a different summation order, as any change of batch size gives),
not bit for bit. Branches' hooks run as before: only the layer's own product changes.
"""

from __future__ import annotations

import functools
import time

import torch
from torch import nn
from torch.nn import functional as F

from ..core.forward_slot import replace_forward, replaced_forward, restore_forward

__all__ = ["install", "uninstall", "weight_first_pays"]

MIN_GAIN = 1.1  # weight-first must be this much faster to be used (the choice is measured once)


def _forward(module: nn.Linear, x: torch.Tensor, most_rows: int) -> torch.Tensor:
    rows = x.numel() // x.shape[-1] if x.dim() else 0
    if not 2 <= rows <= most_rows:
        return F.linear(x, module.weight, module.bias)
    flat = x.reshape(rows, x.shape[-1])
    if module.bias is None:
        out = torch.mm(module.weight, flat.t())
    else:
        out = torch.addmm(module.bias.unsqueeze(1), module.weight, flat.t())
    # contiguous: attention kernels take a slower path on transposed q/k/v
    return out.t().contiguous().view(*x.shape[:-1], module.out_features)


def _ours(runner: object) -> bool:
    return isinstance(runner, functools.partial) and runner.func is _forward


def _eligible(model: nn.Module) -> list[nn.Linear]:
    def free(module: nn.Module) -> bool:  # its class's forward runs, or ours
        runner = replaced_forward(module)
        return runner is None or _ours(runner)

    return [m for m in model.modules() if type(m) is nn.Linear and m.weight.device.type == "cpu"
            and m.weight.dtype == torch.float32 and free(m)]  # fmt: skip


COLD_BYTES = 64 * 2**20  # more than a CPU's last-level cache: weights are measured as a step reads them


def weight_first_pays(weight: torch.Tensor, rows: int, repeats: int = 5) -> bool:
    """Whether ``(W · xᵀ)ᵀ`` beats ``F.linear`` by ``MIN_GAIN`` on this CPU over a decoding step's
    row counts (2, the middle and ``rows``: a batch's rows come and go). A step streams every
    weight from memory once, so each product runs over copies of ``weight`` that together exceed
    the cache (one weight repeated stays in cache and favours ``F.linear``); each layout's best of
    interleaved repeats, so a noisy machine hits both alike."""
    copies = [weight] + [weight.clone() for _ in range(min(63, COLD_BYTES // max(1, weight.nbytes)))]
    best = {"linear": 0.0, "weight_first": 0.0}
    with torch.inference_mode():
        for count in sorted({2, (2 + rows) // 2, rows}):
            x = torch.randn(count, weight.shape[1], dtype=weight.dtype)
            products = {"linear": lambda w, x=x: F.linear(x, w),
                        "weight_first": lambda w, x=x: torch.mm(w, x.t()).t().contiguous()}  # fmt: skip
            times = {name: float("inf") for name in products}
            for _ in range(repeats):
                for name, product in products.items():
                    start = time.perf_counter()
                    for w in copies:
                        product(w)
                    times[name] = min(times[name], time.perf_counter() - start)
            for name in best:
                best[name] += times[name]
    return best["linear"] > MIN_GAIN * best["weight_first"]


def install(model: nn.Module, most_rows: int, measure: bool = True) -> int:
    """Make the model's plain CPU float32 linear layers take the weight-first product for 2 to
    ``most_rows`` rows. With ``measure``, only layers whose weight shape measured faster that way
    here (at ``most_rows`` rows). Returns how many layers changed."""
    layers = _eligible(model) if most_rows >= 2 else []
    if measure:
        shapes = {tuple(m.weight.shape): m.weight for m in layers}
        pays = {shape: weight_first_pays(weight, most_rows) for shape, weight in shapes.items()}
        layers = [m for m in layers if pays[tuple(m.weight.shape)]]
    for module in layers:  # accelerate's hooks keep running (core/forward_slot.py)
        replace_forward(module, functools.partial(_forward, module, most_rows=most_rows))
    return len(layers)


def uninstall(model: nn.Module) -> None:
    """Give every linear layer ``install`` changed its own forward back."""
    for module in model.modules():
        if type(module) is nn.Linear and _ours(replaced_forward(module)):
            restore_forward(module)
