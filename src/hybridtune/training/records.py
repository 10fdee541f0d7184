"""Training records: read from JSON, JSONL, CSV or parquet files and turned into chat messages.

Two layouts, with LLaMA-Factory's names and defaults: *alpaca* (instruction, input, output, plus
optional system and history columns) and *sharegpt* (a list of turns, plus optional system and
tools columns; turns from human, gpt, system, function_call and observation). A ``RecordFormat``
maps the column names and role tags, so a dataset described in LLaMA-Factory's dataset_info.json
reads the same here. Nothing in a record is dropped silently: a field no column names is reported
(by name, once per file).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..core.errors import HybridTuneError
from ..core.validation import StrictModel

Layout = Literal["alpaca", "sharegpt"]
RECORD_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


class DataError(HybridTuneError, ValueError):
    """A data file is missing, empty or has a malformed record (the message names file and record)."""


class Columns(StrictModel):
    """Which field of a record holds what (LLaMA-Factory's ``columns``)."""

    prompt: str = "instruction"
    query: str = "input"
    response: str = "output"
    history: str | None = "history"
    system: str | None = "system"
    messages: str = "conversations"
    tools: str | None = "tools"


class Tags(StrictModel):
    """The role and content keys of sharegpt turns (LLaMA-Factory's ``tags``)."""

    role_tag: str = "from"
    content_tag: str = "value"
    user_tag: str = "human"
    assistant_tag: str = "gpt"
    observation_tag: str = "observation"
    function_tag: str = "function_call"
    system_tag: str = "system"


@dataclass
class RecordFormat:
    layout: Layout | Literal["auto"] = "auto"
    columns: Columns = field(default_factory=Columns)
    tags: Tags | None = None  # None: sharegpt turns may use from/value or role/content, either naming


@dataclass
class Example:
    messages: list[dict[str, Any]]
    task: str | None = None
    tools: list[Any] | None = None  # function definitions the conversation may call


# the role names of the two common sharegpt namings, when no tags are given
_AUTO_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
               "function_call": "function_call", "observation": "tool", "tool": "tool"}  # fmt: skip


def iter_records(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(record number, record) of a data file: a JSON array, JSONL, CSV or parquet. JSON errors
    name the line; CSV and parquet are read with the ``datasets`` library."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file '{path}' does not exist")
    if path.suffix in (".csv", ".parquet"):
        yield from enumerate(_read_table(path), start=1)
        return
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise DataError(f"data file '{path}' is empty")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
        yield from enumerate(records, start=1)
        return
    number = 0
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        number += 1
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {lineno} is not valid JSON: {exc.msg} (column {exc.colno})") from None


def _read_table(path: Path) -> list[dict[str, Any]]:
    import datasets

    datasets.disable_progress_bars()
    try:
        options = {}
        if path.suffix == ".csv":  # CSV cells are text, not numbers guessed from their look
            with path.open(newline="", encoding="utf-8") as f:
                header = next(csv.reader(f), [])
            options["features"] = datasets.Features({name: datasets.Value("string") for name in header})
        table = datasets.load_dataset(path.suffix[1:], data_files=str(path), split="train", **options)
    except Exception as exc:  # a malformed file: datasets names what it could not parse
        raise DataError(f"{path}: cannot read it as {path.suffix[1:]}: {exc}") from None
    if len(table) == 0:
        raise DataError(f"data file '{path}' is empty")
    return list(table)


def detect_layout(record: Any, columns: Columns) -> Layout | None:
    if isinstance(record, dict):
        if columns.messages in record or "messages" in record or "conversations" in record:
            return "sharegpt"
        if columns.prompt in record:
            return "alpaca"
    return None


def to_example(record: Any, fmt: RecordFormat, where: str, unused: set[str]) -> Example:
    """One record as an Example; ``where`` ("file, record N") prefixes every error, and the
    record's fields that no column reads are added to ``unused``."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    layout = detect_layout(record, fmt.columns) if fmt.layout == "auto" else fmt.layout
    if layout is None:
        raise DataError(
            f"{where}: cannot tell the format: expected alpaca keys ({fmt.columns.prompt}, {fmt.columns.query}, "
            f"{fmt.columns.response}) or sharegpt keys ({fmt.columns.messages})"
        )
    c = fmt.columns
    system = record.get(c.system) if c.system else None
    if system is not None and not isinstance(system, str):
        raise DataError(f"{where}: '{c.system}' must be a string")
    if layout == "alpaca":
        read = {c.prompt, c.query, c.response, c.history, c.system, c.tools}
        messages = _alpaca(record, c, where)
    else:
        key = c.messages
        if key not in record and fmt.tags is None:  # either common naming, unless a dataset names its column
            key = next((k for k in ("conversations", "messages") if k in record), key)
        read = {key, c.system, c.tools}
        messages = _sharegpt(record.get(key), fmt.tags, where, key)
    tools = _tools(record.get(c.tools) if c.tools else None, where, c.tools)
    if system and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system})
    unused.update(k for k in record if k not in read and k != "task")
    task = record.get("task")
    return Example(messages, None if task is None else str(task), tools)


def _alpaca(record: dict[str, Any], c: Columns, where: str) -> list[dict[str, Any]]:
    for key in (c.prompt, c.response):
        if not isinstance(record.get(key), str):
            raise DataError(f"{where}: alpaca record needs a string '{key}' (keys present: {sorted(record)})")
    user = record[c.prompt]
    if record.get(c.query):
        user = f"{user}\n{record[c.query]}"  # LLaMA-Factory joins instruction and input with one newline
    messages: list[dict[str, Any]] = []
    for i, pair in enumerate((record.get(c.history) if c.history else None) or []):
        if not (isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise DataError(f"{where}: '{c.history}' item {i} must be a [question, answer] pair of strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return [*messages, {"role": "user", "content": user}, {"role": "assistant", "content": record[c.response]}]


def _sharegpt(turns: Any, tags: Tags | None, where: str, key: str) -> list[dict[str, Any]]:
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: sharegpt record needs a non-empty '{key}' list")
    if tags is None:
        roles, pairs = _AUTO_ROLES, (("from", "value"), ("role", "content"))
    else:
        roles = {tags.user_tag: "user", tags.assistant_tag: "assistant", tags.system_tag: "system",
                 tags.function_tag: "function_call", tags.observation_tag: "tool"}  # fmt: skip
        pairs = ((tags.role_tag, tags.content_tag),)
    messages = []
    for i, turn in enumerate(turns):
        role_key, content_key = next(((r, v) for r, v in pairs if isinstance(turn, dict) and r in turn), pairs[0])
        role = turn.get(role_key) if isinstance(turn, dict) else None
        content = turn.get(content_key) if isinstance(turn, dict) else None
        if role not in roles or not isinstance(content, str):
            shown = f"'{role_key}': {role!r}" if isinstance(turn, dict) else type(turn).__name__
            raise DataError(
                f"{where}: turn {i} ({shown}) needs '{role_key}' one of {', '.join(roles)} and a string '{content_key}'"
            )
        if roles[role] == "function_call":
            messages.append({"role": "assistant", "content": content, "tool_calls": _calls(content, where, i)})
        else:
            messages.append({"role": roles[role], "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant turn to learn from")
    return messages


def _calls(content: str, where: str, turn: int) -> list[dict[str, Any]]:
    """A function_call turn's JSON ({"name", "arguments"} or a list of them) as tool calls."""
    try:
        value = json.loads(content)
    except json.JSONDecodeError:
        value = None
    calls = value if isinstance(value, list) else [value]
    if not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls):
        raise DataError(f'{where}: turn {turn} (function_call) must be JSON {{"name": ..., "arguments": ...}}')
    return [{"type": "function", "function": {"name": c["name"], "arguments": c.get("arguments", {})}} for c in calls]


def _tools(value: Any, where: str, key: str | None) -> list[Any] | None:
    if value in (None, "", []):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DataError(f"{where}: '{key}' must be a JSON list of function definitions") from None
    return value if isinstance(value, list) else [value]


def read_examples(path: str | Path, fmt: RecordFormat | str = "auto", notes: list[str] | None = None) -> list[Example]:
    """All records of a file as Examples, checking every one (errors name the file and record).
    Fields no column reads are named in ``notes`` (once per file)."""
    fmt = fmt if isinstance(fmt, RecordFormat) else RecordFormat(layout=fmt)
    unused: set[str] = set()
    examples = [to_example(r, fmt, f"{path}, record {n}", unused) for n, r in iter_records(path)]
    if unused and notes is not None:
        notes.append(f"{path}: field(s) {', '.join(sorted(unused))} are not read (no column names them)")
    return examples
