"""Learning-rate schedules: transformers' ``get_scheduler`` formulas for the four names a run YAML
takes, on torch's LambdaLR.

Written here rather than imported because ``transformers.optimization`` imports its trainer utils,
which import peft and bitsandbytes (and their start-up messages) into every training run.
tests/test_schedules.py checks every name against transformers' own, step by step.
"""

from __future__ import annotations

import math
from functools import partial

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup")


def _warming(step: int, warmup: int) -> float:
    return step / max(1, warmup)


def _linear(step: int, *, warmup: int, total: int) -> float:
    if step < warmup:
        return _warming(step, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def _cosine(step: int, *, warmup: int, total: int) -> float:
    if step < warmup:
        return _warming(step, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def _constant(step: int, *, warmup: int, total: int) -> float:
    return 1.0


def _constant_with_warmup(step: int, *, warmup: int, total: int) -> float:
    return _warming(step, warmup) if step < warmup else 1.0


_FACTORS = {
    "linear": _linear,
    "cosine": _cosine,
    "constant": _constant,
    "constant_with_warmup": _constant_with_warmup,
}


def get_scheduler(name: str, optimizer: Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    """The schedule ``name`` over ``total_steps`` optimizer steps, the first ``warmup_steps`` warming up."""
    if name not in _FACTORS:
        raise ValueError(f"unknown scheduler '{name}'; expected one of {', '.join(SCHEDULES)}")
    return LambdaLR(optimizer, partial(_FACTORS[name], warmup=warmup_steps, total=total_steps))
