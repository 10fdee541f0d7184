"""A run's data, read and tokenized once: the train and eval examples of ``data:`` in the run
YAML, with their task ids for hard-routed mixtures. Used by training, ``hybridtune eval`` and
the benchmarks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data import DataError, Encoded, Example, apply_template, encode, pack, read_examples, split, with_system
from .dataset_info import read_datasets
from .run_config import ConfigError, DataConfig, RunConfig


@dataclass
class Prepared:
    """The data of a run, tokenized once."""

    train: list[Encoded]
    eval: list[Encoded]
    eval_examples: list[Example]
    truncated: int
    notes: list[str] = field(default_factory=list)  # what the user should know (fields not read)


def read_split(data: DataConfig, files: list[Path], datasets: list[str], seed: int, notes: list[str]) -> list[Example]:
    """The examples of one split: its files, then its dataset_info.json datasets."""
    examples = [e for path in files for e in read_examples(path, data.format, notes)[: data.max_samples]]
    if datasets:
        examples += read_datasets(datasets, data.dataset_dir, data.max_samples, seed, notes)
    return examples


def prepare_data(config: RunConfig, tokenizer: Any) -> Prepared:
    """Read and tokenize the run's data; ``tokenizer`` gets the run's chat template (data.template)."""
    data, seed, notes = config.data, config.training.seed, []
    apply_template(tokenizer, data.template)
    train_examples = read_split(data, data.train, data.dataset, seed, notes)
    if data.eval or data.eval_dataset:
        eval_examples = read_split(data, data.eval, data.eval_dataset, seed, notes)
    elif data.eval_split is not None:
        train_examples, eval_examples = split(train_examples, data.eval_split, seed)
    else:
        eval_examples = []

    tasks = task_names(config)

    def encode_all(examples: list[Example]) -> list[Encoded]:
        encoded = []
        for number, e in enumerate(examples, start=1):
            try:
                item = encode(tokenizer, with_system(e.messages, data.system), data.max_length, e.tools)
            except DataError as exc:
                raise DataError(f"example {number} of the split: {exc}") from None
            item.task_id = task_id(e, tasks)
            encoded.append(item)
        return encoded

    train, evals = encode_all(train_examples), encode_all(eval_examples)
    truncated = sum(e.truncated for e in train) + sum(e.truncated for e in evals)
    if data.packing:
        train = pack(train, data.max_length)
    return Prepared(train, evals, eval_examples, truncated, notes)


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
