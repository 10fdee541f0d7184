"""Weights that one process holds only a part of: DeepSpeed ZeRO-3 partitions (they carry
``ds_id``; the full size is in ``ds_shape``/``ds_numel``, the tensor itself is empty outside a
forward) and FSDP shards (DTensors, whose ``shape`` is already the full one).

Under ZeRO-3 the base is partitioned as it loads, so everything that reads base weights outside
a forward (branch sizes, target fingerprints, DoRA's norms, prompt initialisation, parameter
counts) asks here instead of reading ``.shape`` or ``.data``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch


def is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id") or hasattr(param, "full_tensor")


def full_shape(param: torch.Tensor) -> torch.Size:
    return getattr(param, "ds_shape", param.shape)


def full_numel(param: torch.Tensor) -> int:
    return int(getattr(param, "ds_numel", param.numel()))


def gathered(params: Iterable[torch.Tensor]) -> contextlib.AbstractContextManager:
    """Full values of ZeRO-3-partitioned parameters while in the block, to read (a collective:
    every process enters it for the same parameters); nothing to do for any other parameter."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned)
