"""``hybridtune data preview``: what training will see, before it runs. A few examples rendered
with the trained tokens marked, token-length statistics, and how many records max_length cuts."""

from __future__ import annotations

import statistics
from typing import Any

from .data import IGNORE_INDEX, Encoded
from .data_prep import prepare_data
from .run_config import RunConfig

OPEN, CLOSE = "«", "»"  # around the tokens the loss is computed on


def marked(tokenizer: Any, item: Encoded) -> str:
    """The rendered example with every trained span between « and »."""
    pieces, span, trained = [], [], None
    for token, label in zip(item.input_ids, item.labels, strict=True):
        if (label != IGNORE_INDEX) != trained and span:
            text = tokenizer.decode(span)
            pieces.append(f"{OPEN}{text}{CLOSE}" if trained else text)
            span = []
        trained = label != IGNORE_INDEX
        span.append(token)
    if span:
        text = tokenizer.decode(span)
        pieces.append(f"{OPEN}{text}{CLOSE}" if trained else text)
    return "".join(pieces)


def _lengths(items: list[Encoded]) -> str:
    if not items:
        return "none"
    sizes = sorted(len(e.input_ids) for e in items)
    p95 = sizes[min(len(sizes) - 1, round(0.95 * (len(sizes) - 1)))]
    trained = sum(sum(label != IGNORE_INDEX for label in e.labels) for e in items)
    what = "examples" if items[0].position_ids is None else "rows"
    return (
        f"{len(items)} {what}, tokens min {sizes[0]} / median {statistics.median(sizes):g} / p95 {p95} / "
        f"max {sizes[-1]}; {trained / max(sum(sizes), 1):.0%} of the tokens are trained"
    )


def preview(config: RunConfig, tokenizer: Any, count: int = 3) -> str:
    """The report ``hybridtune data preview`` prints."""
    data = prepare_data(config, tokenizer)
    d = config.data
    template = "plain text" if d.template == "none" else d.template or "the tokenizer's chat template"
    lines = [f"template: {template}"]
    lines += [f"note: {note}" for note in data.notes]
    what = "packed row" if d.packing else "example"
    for i, item in enumerate(data.train[:count]):
        lines += [f"--- train {what} {i + 1} (trained tokens between {OPEN} and {CLOSE}) ---", marked(tokenizer, item)]
    lines += [
        "---",
        f"train: {_lengths(data.train)}" + (" (after packing)" if d.packing else ""),
        f"eval: {_lengths(data.eval)}",
        f"cut by max_length={d.max_length}: {data.truncated} example(s)",
    ]
    return "\n".join(lines)
