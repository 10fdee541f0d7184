"""Which waiting requests are prefilled together next.

A prefill pads every prompt of its group to the longest one, and the per-step prefill budget
(``prefill_chunk`` tokens) is spent on the padding too, so a short prompt grouped with a long one
waits for the long one's whole prefill before its first token. Groups are therefore of similar
lengths: the shortest waiting prompt goes first (the oldest among equals), unless a request has
been passed over ``MAX_SKIPS`` times already (then the oldest such goes first, so a long prompt is
never starved), and others join, closest lengths first, while the group's padded size stays within
twice its real tokens or one prefill step. Lengths are what each prompt leaves to compute: its
tokens less the prefix the engine holds already (serving/prefix_cache.py), as a group's rows start
computing at one column. A request that reports prompt logprobs (echo) is prefilled alone, as its
logits are kept for every position.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

MAX_SKIPS = 2


def choose_prefill(
    waiting: Sequence[Any], room: int, chunk: int, to_compute: Callable[[Any], int] | None = None
) -> list[Any]:
    """The jobs (with ``prompt_ids``, ``echo_logprobs``, ``cancelled``, ``skipped``) to prefill
    now, at most ``room``; every job left waiting counts one more skip. ``to_compute(job)``: the
    prompt tokens it leaves to compute (default: all of them)."""
    pending = [job for job in waiting if not job.cancelled]
    if not pending or room <= 0:
        return []
    size = {id(job): (to_compute(job) if to_compute else len(job.prompt_ids)) for job in pending}
    overdue = [job for job in pending if job.skipped >= MAX_SKIPS]
    first = overdue[0] if overdue else min(pending, key=lambda job: size[id(job)])
    group = [first]
    if not first.echo_logprobs:
        real = width = size[id(first)]
        for job in sorted(pending, key=lambda j: abs(size[id(j)] - size[id(first)])):
            if job is first or job.echo_logprobs or len(group) >= room:
                continue
            wider = max(width, size[id(job)])
            if (len(group) + 1) * wider <= max(chunk, 2 * (real + size[id(job)])):
                group.append(job)
                real, width = real + size[id(job)], wider
    for job in pending:
        if all(job is not chosen for chosen in group):
            job.skipped += 1
    return group
