"""Linear layers computed another way for the few rows of a decoding step, where that is faster.

A decoding step multiplies one row per live request by every weight of the model. ``F.linear``
asks the BLAS for ``x · Wᵀ``; for a handful of rows MKL's sgemm is far from the memory bandwidth
the weights are read at, and by how much depends on the CPU. Two other products of the same
numbers:

- **weight-first**, ``(W · xᵀ)ᵀ``: on this project's 2-core AMD EPYC CI machine (MKL's AVX2 path)
  1.4-2x faster on SmolLM2's layers and 3x on its LM head for 2-16 rows;
- **packed**: MKL's own packed copy of the weight, made once (``cblas_sgemm_pack``, which torch
  reaches as ``torch.ops.mkl._mkl_linear``), for ``most_rows`` rows; a step with fewer rows (but
  more than 2: one or two rows already run at the memory's speed) is padded to ``most_rows``. On an
  AVX-512 Xeon ``F.linear`` reads SmolLM2's weights for 8 rows at 11 GB/s, the packed product at
  16 GB/s (a plain sum over them at 21-23 GB/s). It costs a second copy of each packed weight, so
  it is used only where those copies fit in half the memory free at start.

Whether either pays is a property of the CPU, its BLAS and the weight's shape, so ``install``
measures the products once per weight shape of the model and changes only the layers whose shape
is clearly faster another way.

Only plain ``nn.Linear`` layers of a CPU float32 model change (not one whose forward something
else replaced already), and only for inputs of 2..``most_rows`` token rows (a decoding step, or a
prefill chunk that short); one row and longer chunks run ``F.linear`` as before. Results agree with
``F.linear`` to fp32 rounding (a different summation order, as any change of batch size gives),
not bit for bit. Branches' hooks run as before: only the layer's own product changes.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ..core.forward_slot import replace_forward, replaced_forward, restore_forward

__all__ = ["PRODUCTS", "install", "measured_choice", "uninstall"]

log = logging.getLogger("hybridtune.serve")

MIN_GAIN = 1.1  # another product must be this much faster to be used (the choice is measured once)
PRODUCTS = ("weight_first", "packed")


def packing_available() -> bool:
    """Whether this torch has MKL's packed sgemm (x86 builds with MKL)."""
    return bool(torch._C.has_mkl) and hasattr(torch.ops.mkl, "_mkl_linear")


def pack(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """MKL's packed copy of ``weight`` for products with ``rows`` rows."""
    return torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), rows)


def _packed_product(x: torch.Tensor, packed: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    most_rows: int) -> torch.Tensor:  # fmt: skip
    """``F.linear`` of the rows of ``x`` (2-D, at most ``most_rows``), padded to the packed size."""
    rows = x.shape[0]
    if rows < most_rows:
        x = torch.cat([x, x.new_zeros(most_rows - rows, x.shape[1])])
    return torch.ops.mkl._mkl_linear(x, packed, weight, bias, most_rows)[:rows]


def _origin(weight: torch.Tensor) -> tuple:
    """What a packed copy was made from: a weight replaced, moved, cast or written in place (other
    than through ``.data``) no longer matches."""
    return weight.data_ptr(), weight._version, weight.dtype, weight.device


def _forward(module: nn.Linear, x: torch.Tensor, most_rows: int, packed: torch.Tensor | None = None,
             packed_from: tuple | None = None, from_rows: int = 2) -> torch.Tensor:  # fmt: skip
    """``from_rows``: the fewest rows the other product takes (below it, padding the rows up to
    ``most_rows`` costs the packed product more than it saves)."""
    rows = x.numel() // x.shape[-1] if x.dim() else 0
    stale = packed is not None and packed_from != _origin(module.weight)  # the weight changed since
    if not from_rows <= rows <= most_rows or stale:
        return F.linear(x, module.weight, module.bias)
    flat = x.reshape(rows, x.shape[-1])
    if packed is not None:
        out = _packed_product(flat, packed, module.weight, module.bias, most_rows)
        return out.view(*x.shape[:-1], module.out_features)
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


def measured_choice(layers: list[nn.Linear], rows: int, packed: dict[int, torch.Tensor],
                    repeats: int = 3) -> dict[tuple[int, ...], tuple[str, int] | None]:  # fmt: skip
    """Per weight shape, the product measured fastest here, and the fewest rows it takes: packed
    from the fewest rows at which it beats ``F.linear`` by ``MIN_GAIN`` at every measured count up
    to ``rows`` (padding a few rows to ``rows`` costs more than it saves), else weight-first where
    it wins by ``MIN_GAIN`` over 2 to ``rows`` rows, else None. ``packed``: the layers' packed
    copies by ``id``, where packing is possible. Each product runs over every layer in model order,
    as a step streams them, so the weights come from memory as in a step (one weight repeated stays
    in cache, and a server CPU's last-level cache can hold hundreds of MB); products interleave, and
    each layer keeps its best of ``repeats``."""
    runs = {"linear": lambda m, x: F.linear(x, m.weight),
            "weight_first": lambda m, x: torch.mm(m.weight, x.t()).t().contiguous()}  # fmt: skip
    if packed:
        runs["packed"] = lambda m, x: _packed_product(x, packed[id(m)], m.weight, None, rows)
    counts = sorted({min(2, rows), min(3, rows), (3 + rows) // 2, rows})  # the products' costs change slowly
    seconds: dict[tuple[tuple[int, ...], str, int], float] = {}  # (shape, product, rows) -> time
    with torch.inference_mode():
        for count in counts:
            inputs = {m.in_features: torch.randn(count, m.in_features, dtype=m.weight.dtype) for m in layers}
            best: dict[tuple[int, str], float] = {}
            for _ in range(repeats):
                for name, run in runs.items():
                    for i, module in enumerate(layers):
                        start = time.perf_counter()
                        run(module, inputs[module.in_features])
                        elapsed = time.perf_counter() - start
                        best[i, name] = min(best.get((i, name), float("inf")), elapsed)
            for (i, name), elapsed in best.items():
                key = (tuple(layers[i].weight.shape), name, count)
                seconds[key] = seconds.get(key, 0.0) + elapsed
    choice: dict[tuple[int, ...], tuple[str, int] | None] = {}
    for shape in {tuple(m.weight.shape) for m in layers}:
        packed_from = None
        for count in reversed(counts) if packed else ():
            if seconds[shape, "linear", count] <= MIN_GAIN * seconds[shape, "packed", count]:
                break
            packed_from = count
        overall = {name: sum(seconds[shape, name, c] for c in counts) for name in ("linear", "weight_first")}
        if packed_from is not None:
            choice[shape] = ("packed", packed_from)
        elif overall["linear"] > MIN_GAIN * overall["weight_first"]:
            choice[shape] = ("weight_first", 2)
        else:
            choice[shape] = None
    return choice


def _free_memory_bytes() -> int:
    """Memory free for new allocations now: the kernel's estimate of what is available (free
    pages and reclaimable cache), or the container's limit less its use where that is lower; 0
    where neither can be read."""
    free = 0
    try:
        meminfo = Path("/proc/meminfo").read_text().split()
        free = int(meminfo[meminfo.index("MemAvailable:") + 1]) * 1024
    except (OSError, ValueError, IndexError):
        try:
            free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        except (AttributeError, ValueError, OSError):  # no sysconf (Windows)
            return 0
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            free = min(free, int(limit) - used)
    except (OSError, ValueError):
        pass
    return max(0, free)


def install(model: nn.Module, most_rows: int, measure: bool = True, product: str = "weight_first") -> int:
    """Give the model's plain CPU float32 linear layers another product for 2 to ``most_rows``
    rows. With ``measure``, each weight shape gets the product measured fastest here (for 2 to
    ``most_rows`` rows), if any is; otherwise every layer gets ``product``. Packed copies (made of
    every layer to measure them, kept for the layers that take them) are made only when they fit
    in half the memory free now; otherwise the packed product is not considered (``product``
    packed: weight-first, logged). Returns how many layers changed."""
    layers = _eligible(model) if most_rows >= 2 else []
    packs = (measure or product == "packed") and packing_available()
    if packs and sum(m.weight.nbytes for m in layers) > _free_memory_bytes() // 2:
        packs = False  # no room for a second copy of the weights
        if product == "packed" and not measure:
            log.warning("no memory free for packed copies of the weights: weight-first products instead")
    packed = {id(m): pack(m.weight, most_rows) for m in layers} if packs else {}
    if measure:
        chosen = measured_choice(layers, most_rows, packed)
    else:
        kind = product if product != "packed" or packs else "weight_first"
        chosen = {tuple(m.weight.shape): (kind, 3 if kind == "packed" else 2) for m in layers}
    changed = 0
    for module in layers:  # accelerate's hooks keep running (core/forward_slot.py)
        if chosen[tuple(module.weight.shape)] is None:
            continue
        kind, from_rows = chosen[tuple(module.weight.shape)]
        copy = packed.get(id(module)) if kind == "packed" else None
        origin = _origin(module.weight) if copy is not None else None
        runner = functools.partial(_forward, module, most_rows=most_rows, packed=copy, packed_from=origin,
                                   from_rows=from_rows)  # fmt: skip
        replace_forward(module, runner)
        changed += 1
    return changed


def uninstall(model: nn.Module) -> None:
    """Give every linear layer ``install`` changed its own forward back."""
    for module in model.modules():
        if type(module) is nn.Linear and _ours(replaced_forward(module)):
            restore_forward(module)
