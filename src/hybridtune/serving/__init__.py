"""Serving: one base model, many adapter sets by name, an OpenAI-compatible HTTP API."""

from __future__ import annotations

from pathlib import Path

from .adapters_dir import AdaptersDir, BrokenAdapter, UnknownAdapter
from .api import Limits, create_app
from .engine import Engine, Job

__all__ = ["AdaptersDir", "BrokenAdapter", "Engine", "Job", "Limits", "UnknownAdapter", "build_app"]


def build_app(
    base: str,
    adapters_dir: str | Path,
    *,
    api_key: str | None = None,
    max_loaded: int = 4,
    max_batch: int = 8,
    prefill_chunk: int = 512,
    prefix_cache_mb: float = 256,
    limits: Limits | None = None,
    device: str | None = None,
    base_name: str | None = None,
):
    """The FastAPI app for ``hybridtune serve`` (the model loads here, once). Clients address the
    base model as ``base_name``: by default the base's own name (a directory's last part)."""
    import torch

    from ..core.base_models import load_base

    model, tokenizer = load_base(base)
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
    engine = Engine(model, tokenizer, AdaptersDir(adapters_dir), max_loaded=max_loaded, max_batch=max_batch,
                    prefill_chunk=prefill_chunk, prefix_cache_mb=prefix_cache_mb)  # fmt: skip
    return create_app(engine, base_name=base_name or Path(base).name, api_key=api_key, limits=limits)
