"""Which waiting requests are prefilled together next.

A prefill pads every prompt of its group to the longest one, and the per-step prefill budget
(``prefill_chunk`` tokens) is spent on the padding too, so a short prompt grouped with a long one
waits for the long one's whole prefill before its first token. Groups are therefore of similar
lengths: the shortest waiting prompt goes first (the oldest among equals), unless a request has
been passed over ``MAX_SKIPS`` times already (then the oldest such goes first, so a long prompt is
never starved), and others join, closest lengths first, while the group's padded size stays within
twice its real tokens or one prefill step. A request that reports prompt logprobs (echo) is
prefilled alone, as its logits are kept for every position.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

MAX_SKIPS = 2


def choose_prefill(waiting: Sequence[Any], room: int, chunk: int) -> list[Any]:
    """The jobs (with ``prompt_ids``, ``echo_logprobs``, ``cancelled``, ``skipped``) to prefill
    now, at most ``room``; every job left waiting counts one more skip."""
    pending = [job for job in waiting if not job.cancelled]
    if not pending or room <= 0:
        return []
    overdue = [job for job in pending if job.skipped >= MAX_SKIPS]
    first = overdue[0] if overdue else min(pending, key=lambda job: len(job.prompt_ids))
    group = [first]
    if not first.echo_logprobs:
        real = width = len(first.prompt_ids)
        for job in sorted(pending, key=lambda j: abs(len(j.prompt_ids) - len(first.prompt_ids))):
            if job is first or job.echo_logprobs or len(group) >= room:
                continue
            wider = max(width, len(job.prompt_ids))
            if (len(group) + 1) * wider <= max(chunk, 2 * (real + len(job.prompt_ids))):
                group.append(job)
                real, width = real + len(job.prompt_ids), wider
    for job in pending:
        if all(job is not chosen for chosen in group):
            job.skipped += 1
    return group
