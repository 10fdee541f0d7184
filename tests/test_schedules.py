"""Our learning-rate schedules against transformers' get_scheduler, step by step."""

import pytest
import torch
from transformers.optimization import get_scheduler as transformers_scheduler

from hybridtune.training.schedules import SCHEDULES, get_scheduler


def _lrs(make, name: str, warmup: int, total: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = make(name, optimizer, warmup, total)
    lrs = []
    for _ in range(total + 3):  # a few past the end too
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize(("warmup", "total"), [(0, 10), (3, 10), (10, 10), (1, 1)])
def test_schedule_equals_transformers(name, warmup, total):
    ours = _lrs(get_scheduler, name, warmup, total)
    theirs = _lrs(lambda n, o, w, t: transformers_scheduler(n, o, num_warmup_steps=w, num_training_steps=t),
                  name, warmup, total)  # fmt: skip
    assert ours == pytest.approx(theirs, rel=0, abs=1e-15)


def test_unknown_schedule_is_refused():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="unknown scheduler 'cosin'; expected one of linear, cosine"):
        get_scheduler("cosin", optimizer, 0, 10)
