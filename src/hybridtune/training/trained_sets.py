"""Trained adapter sets back on their base model, for the commands that use them (eval,
generate, merge, export, merge-sets, search-rank). Kept apart from the training loop so those
commands start without importing accelerate and the training machinery."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core import adapter_io
from ..core.base_models import load_base
from ..core.model import HybridModel, load
from .data import saved_template
from .run_config import ConfigError


def load_trained(adapters_dir: str | Path, model_name: str | None = None) -> tuple[HybridModel, Any]:
    """Base model + saved adapters, for eval/generate/merge/export. The base defaults to the one
    recorded in the adapters' config."""
    meta = adapter_io.read_meta(adapters_dir)
    name = model_name or meta["base_model"].get("name_or_path")
    if not name:
        raise ConfigError([f"{adapters_dir} does not record its base model; pass --model"])
    base, tokenizer = load_base(name)
    return load(base, adapters_dir), with_saved_template(tokenizer, adapters_dir)


def with_saved_template(tokenizer: Any, adapters_dir: str | Path) -> Any:
    """The chat template the adapters were trained with (data.template), when they saved one."""
    template = saved_template(adapters_dir)
    if template is not None:
        tokenizer.chat_template = template or None
    return tokenizer


def load_sets(specs: list[tuple[Path, float]], model_name: str | None = None) -> tuple[HybridModel, Any, dict]:
    """One base model with each saved adapter directory loaded as its own set (s0, s1, ...);
    returns the model, the tokenizer and {set name: weight}."""
    if not specs:
        raise ConfigError(["no adapter directories given"])
    first = adapter_io.read_meta(specs[0][0])
    name = model_name or first["base_model"].get("name_or_path")
    if not name:
        raise ConfigError([f"{specs[0][0]} does not record its base model; pass --model"])
    base, tokenizer = load_base(name)
    hybrid = load(base, specs[0][0], set_name="s0")
    for i, (directory, _) in enumerate(specs[1:], start=1):
        hybrid.load_set(f"s{i}", directory)
    return hybrid, tokenizer, {f"s{i}": weight for i, (_, weight) in enumerate(specs)}
