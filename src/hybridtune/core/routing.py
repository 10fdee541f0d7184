"""Per-row routing for one forward pass: which rows of the batch each adapter set serves, and
per-row task ids for mixture methods. Set by HybridModel around a call, read by the branch hook.

A context variable (not model state) carries it, so concurrent calls in different threads or
tasks never see each other's routing.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

_ROUTING: contextvars.ContextVar[Routing | None] = contextvars.ContextVar("hybridtune_routing", default=None)


@dataclass
class Routing:
    rows: dict[str | None, torch.Tensor] | None  # set name -> row indices; None: every active set, all rows
    batch: int
    task_ids: torch.Tensor | None = None
    _expanded: dict[tuple[str | None, int], torch.Tensor] = field(default_factory=dict)

    def rows_for(self, set_name: str, batch: int) -> torch.Tensor | None:
        """Rows of a batch of ``batch`` rows that ``set_name`` serves. generate() with
        num_return_sequences repeats each row n times in place, so n*B rows are expanded to match."""
        assert self.rows is not None
        rows = self.rows.get(set_name)
        if rows is None or batch == self.batch:
            return rows
        repeat, rest = divmod(batch, self.batch)
        if rest:
            raise ValueError(f"adapter_sets routes {self.batch} rows, but a layer saw a batch of {batch}")
        key = (set_name, repeat)
        if key not in self._expanded:
            self._expanded[key] = (rows[:, None] * repeat + torch.arange(repeat, device=rows.device)).reshape(-1)
        return self._expanded[key]

    def task_ids_for(self, batch: int) -> torch.Tensor:
        if self.task_ids is None:
            raise ValueError("this model has a mixture entry in hard mode: pass task_ids=... (one id per row)")
        if batch == self.task_ids.shape[0]:
            return self.task_ids
        repeat, rest = divmod(batch, self.task_ids.shape[0])
        if rest:
            raise ValueError(f"task_ids has {self.task_ids.shape[0]} rows, but a layer saw a batch of {batch}")
        return self.task_ids.repeat_interleave(repeat)


def current() -> Routing | None:
    return _ROUTING.get()


@contextlib.contextmanager
def routed(
    adapter_sets: Sequence[str | None] | None,
    known_sets: Sequence[str],
    task_ids: Any = None,
    device: torch.device | None = None,
) -> Iterator[None]:
    """Route rows to sets (and/or carry task ids) for the calls made inside the block."""
    if adapter_sets is None and task_ids is None:
        yield
        return
    rows = None
    batch = 0
    if adapter_sets is not None:
        unknown = sorted({s for s in adapter_sets if s is not None and s not in known_sets})
        if unknown:
            raise KeyError(f"unknown adapter set(s) {', '.join(unknown)}; sets: {', '.join(known_sets)}")
        batch = len(adapter_sets)
        rows = {}
        for name in dict.fromkeys(adapter_sets):
            if name is not None:
                idx = [i for i, s in enumerate(adapter_sets) if s == name]
                rows[name] = torch.tensor(idx, dtype=torch.long, device=device)
    if task_ids is not None:
        task_ids = torch.as_tensor(task_ids, dtype=torch.long, device=device).reshape(-1)
        batch = batch or task_ids.shape[0]
        if adapter_sets is not None and task_ids.shape[0] != batch:
            raise ValueError(f"task_ids has {task_ids.shape[0]} rows but adapter_sets has {batch}")
    token = _ROUTING.set(Routing(rows, batch, task_ids))
    try:
        yield
    finally:
        _ROUTING.reset(token)


def replace_rows(old: torch.Tensor, rows: torch.Tensor, new_rows: torch.Tensor) -> torch.Tensor:
    """``old`` with ``rows`` replaced by ``new_rows`` (out of place, autograd-safe)."""
    return old.index_copy(0, rows, new_rows.to(old.dtype))


def map_hidden(output: Any, fn, where: str) -> Any:
    """Apply ``fn`` to a module output's hidden states: the tensor itself, or a tuple's first item."""
    if isinstance(output, torch.Tensor):
        return fn(output)
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return type(output)((fn(output[0]), *output[1:]))
    raise TypeError(
        f"{where}: the module returned {type(output).__name__}; expected a tensor or a tuple whose first item is "
        "the hidden states"
    )
