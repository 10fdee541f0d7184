"""LLaMA-Factory's dataset registry, read-only: ``data: {dataset: a,b, dataset_dir: data}`` reads
``dataset_dir/dataset_info.json`` and the local files it names, with its column and role-tag
mappings, ``num_samples`` and the run's ``max_samples``, so a LLaMA-Factory user's data reads the
same. What it describes that hybridtune does not do (hub downloads, preference or multimodal
columns) is refused by name, never skipped.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError

from ..core.validation import StrictModel, describe_errors
from .records import RECORD_SUFFIXES, Columns, DataError, Example, RecordFormat, Tags, read_examples

DATASET_INFO = "dataset_info.json"
# the columns each layout names (LLaMA-Factory's), of records.Columns
_COLUMNS = {"alpaca": {"prompt", "query", "response", "history", "system", "tools"},
            "sharegpt": {"messages", "system", "tools"}}  # fmt: skip
_HUB_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
_NOT_SFT_COLUMNS = {"chosen": "preference pairs (DPO/RM)", "rejected": "preference pairs (DPO/RM)",
                    "kto_tag": "KTO labels", "images": "images", "videos": "videos", "audios": "audio"}  # fmt: skip


class DatasetEntry(StrictModel):
    """One entry of dataset_info.json (LLaMA-Factory's keys)."""

    file_name: str | None = None
    formatting: Literal["alpaca", "sharegpt"] = "alpaca"
    columns: dict[str, str] = Field(default_factory=dict)
    tags: dict[str, str] = Field(default_factory=dict)
    num_samples: int | None = Field(None, ge=1)
    split: str = "train"
    ranking: bool = False
    subset: str | None = None
    folder: str | None = None
    hf_hub_url: str | None = None
    ms_hub_url: str | None = None
    om_hub_url: str | None = None
    script_url: str | None = None
    cloud_file_name: str | None = None

    def problems(self, name: str) -> list[str]:
        """What this entry asks for that hybridtune does not do, each with what to do instead."""
        found = []
        for key in _HUB_KEYS:
            if getattr(self, key) and not self.file_name:
                found.append(f"dataset '{name}': {key} downloads it, and hybridtune reads local files only; "
                             "download it and give its file_name")  # fmt: skip
        if not self.file_name and not any(getattr(self, k) for k in _HUB_KEYS):
            found.append(f"dataset '{name}' has no file_name")
        if self.ranking:
            found.append(f"dataset '{name}': ranking (preference) data trains DPO/RM stages; hybridtune trains SFT")
        for column, what in _NOT_SFT_COLUMNS.items():
            if column in self.columns:
                found.append(
                    f"dataset '{name}': column '{column}' holds {what}, which hybridtune's SFT does not train on"
                )
        for key in ("subset", "folder"):
            if getattr(self, key):
                found.append(f"dataset '{name}': {key} selects part of a hub dataset; point file_name at the files")
        if self.split != "train":
            found.append(f"dataset '{name}': split '{self.split}': a local file has only the 'train' split")
        known = _COLUMNS[self.formatting]
        for column in self.columns:
            if column not in known and column not in _NOT_SFT_COLUMNS:
                found.append(
                    f"dataset '{name}': unknown {self.formatting} column '{column}' (known: {', '.join(sorted(known))})"
                )
        wrong_tags = sorted(set(self.tags) - set(Tags.model_fields))
        if wrong_tags:
            found.append(
                f"dataset '{name}': unknown tag(s) {', '.join(wrong_tags)} (known: {', '.join(Tags.model_fields)})"
            )
        return found

    def record_format(self) -> RecordFormat:
        """LLaMA-Factory's defaults: history, system and tools are read only when a column names them."""
        columns = Columns(**{"history": None, "system": None, "tools": None, **self.columns})
        return RecordFormat(self.formatting, columns, Tags(**self.tags) if self.formatting == "sharegpt" else None)


def read_dataset_info(dataset_dir: Path) -> dict[str, DatasetEntry]:
    path = dataset_dir / DATASET_INFO
    if not path.is_file():
        raise DataError(f"no {DATASET_INFO} in '{dataset_dir}' (data.dataset names datasets described there)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected an object of dataset names")
    entries = {}
    for name, value in raw.items():
        try:
            entries[name] = DatasetEntry.model_validate(value)
        except ValidationError as exc:
            raise DataError(f"{path}: dataset '{name}': {'; '.join(describe_errors(exc))}") from None
    return entries


def dataset_files(dataset_dir: Path, entry: DatasetEntry) -> list[Path]:
    """The files of one entry: its file_name, or every data file in that folder."""
    path = dataset_dir / entry.file_name
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in RECORD_SUFFIXES)
        if not files:
            raise DataError(f"folder '{path}' holds no {', '.join(RECORD_SUFFIXES)} file")
        return files
    if not path.is_file():
        raise DataError(f"dataset file '{path}' does not exist")
    return [path]


def read_datasets(
    names: list[str], dataset_dir: Path, max_samples: int | None, seed: int, notes: list[str] | None = None
) -> list[Example]:
    """The examples of the named datasets, concatenated in order (LLaMA-Factory's ``concat`` mix):
    ``num_samples`` samples each dataset (repeating records when it asks for more), then
    ``max_samples`` keeps the first that many of each."""
    entries = read_dataset_info(dataset_dir)
    examples: list[Example] = []
    for name in names:
        if name not in entries:
            raise DataError(f"dataset '{name}' is not in {dataset_dir / DATASET_INFO} (it has: {', '.join(entries)})")
        entry = entries[name]
        problems = entry.problems(name)
        if problems:
            raise DataError("; ".join(problems))
        rows = [e for f in dataset_files(dataset_dir, entry) for e in read_examples(f, entry.record_format(), notes)]
        if not rows:
            raise DataError(f"dataset '{name}' has no records")
        if entry.num_samples is not None:
            rng = random.Random(seed)
            order = rng.sample(range(len(rows)), min(entry.num_samples, len(rows)))
            order += [rng.randrange(len(rows)) for _ in range(entry.num_samples - len(order))]
            rows = [rows[i] for i in order]
        examples += rows[:max_samples]  # (all of them when max_samples is None)
    return examples
