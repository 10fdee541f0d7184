"""Instruction data turned into masked token ids (records are read in records.py).

The loss is computed only on assistant turns (answers and tool calls). With a chat template the
conversation is rendered turn by turn and each rendered piece is tokenized on its own, so the
prompt tokens are exactly what inference feeds the model.
"""

from __future__ import annotations

import bisect
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .records import DataError, Example, read_examples

__all__ = ["DataError", "Example", "apply_template", "collate", "encode", "pack", "read_examples", "render_prompt",
           "split"]  # fmt: skip

IGNORE_INDEX = -100
PLAIN_TEXT = "none"  # data.template for no chat template: the plain instruction/response prompt
TEMPLATE_FILE = "chat_template.jinja"  # saved with adapters trained with data.template
_PLAIN_USER = "### Instruction:\n{content}\n\n### Response:\n"
TOOLS_PREAMBLE = "You can call these functions (JSON definitions):\n"


def with_system(messages: list[dict[str, str]], system: str | None) -> list[dict[str, str]]:
    if system is None or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system}, *messages]


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    task_id: int | None = None
    position_ids: list[int] | None = None  # packed rows: each example's positions start at 0


def apply_template(tokenizer: Any, template: str | None) -> Any:
    """Give ``tokenizer`` the run's chat template: ``data.template`` (a Jinja file, or "none" for
    plain text); None keeps the tokenizer's own."""
    if template is not None:
        tokenizer.chat_template = None if template == PLAIN_TEXT else Path(template).read_text(encoding="utf-8")
    return tokenizer


def template_text(tokenizer: Any, tools: list[Any] | None = None) -> str | None:
    """The tokenizer's chat template as text: of several named ones (Command-R, Hermes), the
    ``tool_use`` one for a conversation with tools, else ``default``."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        name = "tool_use" if tools and "tool_use" in template else "default"
        return template.get(name, next(iter(template.values()), None))
    return template


def saved_template(directory: str | Path) -> str | None:
    """The chat template adapters were trained with (``data.template``, saved next to them; "" for
    plain text), or None when they used the tokenizer's own."""
    path = Path(directory) / TEMPLATE_FILE
    return path.read_text(encoding="utf-8") if path.is_file() else None


def for_template(template: str | None, messages: list[dict[str, Any]], tools: list[Any] | None):
    """(messages, apply_chat_template keywords) for this chat template. A template that reads
    ``tool_calls`` / ``tools`` gets them structured; otherwise a call stays its JSON text and the
    tool definitions go into the system message, so nothing is dropped by a template."""
    template = template or ""
    structured = "tool_calls" in template
    out = []
    for m in messages:
        if "tool_calls" in m:
            m = {"role": "assistant", "content": "", "tool_calls": m["tool_calls"]} if structured else {
                "role": "assistant", "content": m["content"]}  # fmt: skip
        out.append(m)
    if not tools:
        return out, {}
    if "tools" in template:
        return out, {"tools": tools}
    listing = TOOLS_PREAMBLE + json.dumps(tools, ensure_ascii=False)
    if out and out[0]["role"] == "system":
        return [{"role": "system", "content": f"{out[0]['content']}\n\n{listing}"}, *out[1:]], {}
    return [{"role": "system", "content": listing}, *out], {}


def render_prompt(
    tokenizer: Any, messages: list[dict[str, Any]], tools: list[Any] | None = None, template: str | None = None
) -> str:
    """The text that asks the model for the next assistant turn (what inference feeds it).
    ``template`` replaces the tokenizer's chat template ("" for plain text; see saved_template)."""
    chat_template = template_text(tokenizer, tools) if template is None else (template or None)
    if chat_template:
        return _templated(tokenizer, chat_template, messages, tools, add_generation_prompt=True)
    text = "".join(
        _PLAIN_USER.format(content=m["content"]) if m["role"] == "user" else m["content"] + "\n\n"
        for m in messages
        if m["role"] != "system"
    )
    system = next((m["content"] + "\n\n" for m in messages if m["role"] == "system"), "")
    return system + text


def _templated(
    tokenizer: Any, template: str, messages: list[dict[str, Any]], tools: list[Any] | None, add_generation_prompt: bool
) -> str:
    """``messages`` rendered with ``template`` (tool calls and tools as for_template shapes them)."""
    shown, extra = for_template(template, messages, tools)
    return tokenizer.apply_chat_template(
        shown, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=template, **extra
    )


def _segments(tokenizer: Any, messages: list[dict[str, Any]], tools: list[Any] | None) -> list[tuple[str, bool]]:
    """(text, is_target) pieces whose concatenation is the whole rendered conversation."""
    pieces: list[tuple[str, bool]] = []
    done = ""
    template = template_text(tokenizer, tools)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render_prompt(tokenizer, messages[:i], tools, template=template or "")
        if template:
            full = _templated(tokenizer, template, messages[: i + 1], tools, add_generation_prompt=False)
        else:
            full = prompt + message["content"] + (tokenizer.eos_token or "")
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DataError("the chat template does not render conversations prefix by prefix; cannot mask prompts")
        pieces += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done = full
    return pieces


def encode(tokenizer: Any, messages: list[dict[str, Any]], max_length: int, tools: list[Any] | None = None) -> Encoded:
    """Token ids with labels = -100 on every non-assistant token, truncated to ``max_length``."""
    input_ids: list[int] = []
    labels: list[int] = []
    try:
        segments = _segments(tokenizer, messages, tools)
    except DataError:
        raise
    except Exception as exc:  # a template that refuses these roles (no tool role, say) or turn order
        raise DataError(f"the chat template cannot render this conversation ({type(exc).__name__}: {exc})") from None
    for text, is_target in segments:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if is_target else [IGNORE_INDEX] * len(ids)
    truncated = len(input_ids) > max_length
    return Encoded(input_ids[:max_length], labels[:max_length], truncated)


def pack(encoded: list[Encoded], max_length: int) -> list[Encoded]:
    """Concatenate examples into rows of up to ``max_length`` tokens (examples are not split; only
    examples of the same task share a row). Each example's positions start at 0, which makes
    transformers attend within each example only (a block-diagonal causal mask, see ``collate``),
    and each example's first token is never a target, so a packed row trains exactly what its
    examples padded one per row would.

    Rows are filled best-fit, as LLaMA-Factory and TRL fill their packed rows: each row takes the
    longest remaining example that fits its room until none does (filling in reading order closed
    a row as soon as the next example did not fit: 17.4% padding against 3.6% on bench/packing.py's
    alpaca-like set). Within a row, examples keep their reading order; training shuffles the rows
    every epoch."""
    rows: list[Encoded] = []
    # each task's examples by length (each length's in reading order); the lengths present,
    # ascending, let the longest that fits be found by bisection over at most max_length lengths
    by_task: dict[int | None, dict[int, list[int]]] = {}
    for i, e in enumerate(encoded):
        by_task.setdefault(e.task_id, {}).setdefault(len(e.input_ids), []).append(i)
    for task in sorted(by_task, key=lambda t: -1 if t is None else t):
        by_length = by_task[task]
        lengths = sorted(by_length)
        while lengths:
            room, members = max_length, []
            while lengths and (k := bisect.bisect_right(lengths, room) - 1) >= 0:
                members.append(_take(by_length, lengths, k))
                room -= len(encoded[members[-1]].input_ids)
            if not members:  # longer than a row (encode truncates, so only a caller's own data)
                members.append(_take(by_length, lengths, len(lengths) - 1))
            rows.append(_joined([encoded[i] for i in sorted(members)], task))
    return rows


def _take(by_length: dict[int, list[int]], lengths: list[int], k: int) -> int:
    """The last example of length ``lengths[k]`` (dropping the length when none is left)."""
    same = by_length[lengths[k]]
    index = same.pop()
    if not same:
        del lengths[k]
    return index


def _joined(items: list[Encoded], task: int | None) -> Encoded:
    """One packed row of ``items``; each example's first token is not a target."""
    row = Encoded([], [], task_id=task, position_ids=[])
    for item in items:
        row.input_ids += item.input_ids
        row.labels += [IGNORE_INDEX, *item.labels[1:]][: len(item.input_ids)]  # (an empty one adds none)
        row.position_ids += list(range(len(item.input_ids)))  # type: ignore[operator]
    return row


def collate(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors; padding gets label -100 and attention 0."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    batch_out = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    if any(e.position_ids is not None for e in batch):  # packed rows; the padding is one more "example"
        batch_out["position_ids"] = torch.stack([
            torch.tensor((e.position_ids or list(range(len(e.input_ids)))) + list(range(width - len(e.input_ids))))
            for e in batch
        ])  # fmt: skip
    if any(e.task_id is not None for e in batch):
        batch_out["task_ids"] = torch.tensor([e.task_id for e in batch])
    return batch_out


def split(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A reproducible train/eval split."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(examples) * fraction))
    eval_idx = set(order[:n_eval])
    return (
        [e for i, e in enumerate(examples) if i not in eval_idx],
        [e for i, e in enumerate(examples) if i in eval_idx],
    )
