"""Instruction data: alpaca and sharegpt records from JSON/JSONL, turned into masked token ids.

Every record becomes a list of chat messages; the loss is computed only on assistant turns.
With a chat template the conversation is rendered turn by turn and each rendered piece is
tokenized on its own, so the prompt tokens are exactly what inference feeds the model.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..core.errors import HybridTuneError

IGNORE_INDEX = -100
Format = Literal["alpaca", "sharegpt"]
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_PLAIN_USER = "### Instruction:\n{content}\n\n### Response:\n"


class DataError(HybridTuneError, ValueError):
    """A data file is missing, empty or has a malformed record (the message names file and line)."""


def iter_json_records(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, record) for a JSONL file or a JSON array file; malformed JSON names its line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file '{path}' does not exist")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise DataError(f"data file '{path}' is empty")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
        for index, record in enumerate(records):
            yield index + 1, record  # record number within the array
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: invalid JSON line: {exc.msg} (column {exc.colno})") from None


def detect_format(record: Any) -> Format | None:
    if isinstance(record, dict):
        if "conversations" in record or "messages" in record:
            return "sharegpt"
        if "instruction" in record:
            return "alpaca"
    return None


def to_messages(record: Any, fmt: Format, where: str) -> list[dict[str, str]]:
    """One record as chat messages; ``where`` (file:line) prefixes every error."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if fmt == "alpaca":
        for key in ("instruction", "output"):
            if not isinstance(record.get(key), str):
                raise DataError(f"{where}: alpaca record needs a string '{key}' (keys present: {sorted(record)})")
        user = record["instruction"]
        if record.get("input"):
            user = f"{user}\n\n{record['input']}"
        messages = [{"role": "system", "content": record["system"]}] if record.get("system") else []
        return [*messages, {"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    turns = record.get("conversations", record.get("messages"))
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: sharegpt record needs a non-empty 'conversations' (or 'messages') list")
    messages = []
    for i, turn in enumerate(turns):
        role = turn.get("from", turn.get("role")) if isinstance(turn, dict) else None
        content = turn.get("value", turn.get("content")) if isinstance(turn, dict) else None
        if role not in _ROLES or not isinstance(content, str):
            raise DataError(
                f"{where}: turn {i} needs 'from' (one of {', '.join(_ROLES)}) and a string 'value' "
                "(or 'role'/'content')"
            )
        messages.append({"role": _ROLES[role], "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant turn to learn from")
    return messages


@dataclass
class Example:
    messages: list[dict[str, str]]
    task: str | None = None


def read_examples(path: str | Path, fmt: Format | Literal["auto"] = "auto") -> list[Example]:
    """All records of a file as Examples, checking every one (errors name file and line)."""
    examples = []
    for lineno, record in iter_json_records(path):
        where = f"{path}:{lineno}"
        record_fmt = detect_format(record) if fmt == "auto" else fmt
        if record_fmt is None:
            raise DataError(
                f"{where}: cannot tell the format: expected alpaca keys (instruction, input, output) or "
                "sharegpt keys (conversations)"
            )
        task = record.get("task") if isinstance(record, dict) else None
        examples.append(Example(to_messages(record, record_fmt, where), None if task is None else str(task)))
    return examples


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


def render_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The text that asks the model for the next assistant turn (what inference feeds it)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text = "".join(
        _PLAIN_USER.format(content=m["content"]) if m["role"] == "user" else m["content"] + "\n\n"
        for m in messages
        if m["role"] != "system"
    )
    system = next((m["content"] + "\n\n" for m in messages if m["role"] == "system"), "")
    return system + text


def _segments(tokenizer: Any, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """(text, is_target) pieces whose concatenation is the whole rendered conversation."""
    pieces: list[tuple[str, bool]] = []
    done = ""
    templated = bool(getattr(tokenizer, "chat_template", None))
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render_prompt(tokenizer, messages[:i])
        if templated:
            full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        else:
            full = prompt + message["content"] + (tokenizer.eos_token or "")
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DataError("the chat template does not render conversations prefix by prefix; cannot mask prompts")
        pieces += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done = full
    return pieces


def encode(tokenizer: Any, messages: list[dict[str, str]], max_length: int) -> Encoded:
    """Token ids with labels = -100 on every non-assistant token, truncated to ``max_length``."""
    input_ids: list[int] = []
    labels: list[int] = []
    for text, is_target in _segments(tokenizer, messages):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if is_target else [IGNORE_INDEX] * len(ids)
    truncated = len(input_ids) > max_length
    return Encoded(input_ids[:max_length], labels[:max_length], truncated)


def pack(encoded: list[Encoded], max_length: int) -> list[Encoded]:
    """Concatenate examples into blocks of up to ``max_length`` tokens (examples are not split;
    attention is not masked between packed examples, as in most packing implementations). Only
    examples of the same task share a block."""
    blocks: list[Encoded] = []
    current = Encoded([], [])
    for item in sorted(encoded, key=lambda e: -1 if e.task_id is None else e.task_id):
        if current.input_ids and (
            len(current.input_ids) + len(item.input_ids) > max_length or item.task_id != current.task_id
        ):
            blocks.append(current)
            current = Encoded([], [], task_id=item.task_id)
        current.task_id = item.task_id
        current.input_ids += item.input_ids
        current.labels += item.labels
    if current.input_ids:
        blocks.append(current)
    return blocks


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
