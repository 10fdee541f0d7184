"""A run's data, read and tokenized once: the train and eval examples of ``data:`` in the run
YAML, with their task ids for hard-routed mixtures. Used by training, ``hybridtune eval`` and
the benchmarks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .data import Encoded, Example, encode, pack, read_examples, split, with_system
from .run_config import ConfigError, RunConfig


@dataclass
class Prepared:
    """The data of a run, tokenized once."""

    train: list[Encoded]
    eval: list[Encoded]
    eval_examples: list[Example]
    truncated: int


def prepare_data(config: RunConfig, tokenizer: Any) -> Prepared:
    data = config.data
    train_examples = read_examples(data.train, data.format)
    if data.eval is not None:
        eval_examples = read_examples(data.eval, data.format)
    elif data.eval_split is not None:
        train_examples, eval_examples = split(train_examples, data.eval_split, config.training.seed)
    else:
        eval_examples = []

    tasks = task_names(config)

    def encode_all(examples: list[Example]) -> list[Encoded]:
        encoded = []
        for e in examples:
            item = encode(tokenizer, with_system(e.messages, data.system), data.max_length)
            item.task_id = task_id(e, tasks)
            encoded.append(item)
        return encoded

    train, evals = encode_all(train_examples), encode_all(eval_examples)
    truncated = sum(e.truncated for e in train) + sum(e.truncated for e in evals)
    if data.packing:
        train = pack(train, data.max_length)
    return Prepared(train, evals, eval_examples, truncated)


def task_names(config: RunConfig) -> list[str] | None:
    """The task list of the run's hard mixture entries (they must agree), or None."""
    lists = {tuple(tasks) for c in config.methods.values() if (tasks := c.routing_tasks()) is not None}
    if len(lists) > 1:
        raise ConfigError([f"entries routed by task must name the same tasks, got {sorted(lists)}"])
    return list(lists.pop()) if lists else None


def task_id(example: Example, tasks: list[str] | None) -> int | None:
    if tasks is None:
        return None
    if example.task not in tasks:
        raise ConfigError(
            [f"an example has task {example.task!r}; the mixture's tasks are {tasks} (give each record a 'task' field)"]
        )
    return tasks.index(example.task)
