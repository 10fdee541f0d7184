"""Training checkpoints: adapters + optimizer + scheduler (+ fp16 loss scaler) + RNG + position,
written atomically.

Adapters use the normal safetensors checkpoint; optimizer and scheduler states are torch files
read back with ``weights_only=True`` (tensors and numbers only, no arbitrary pickles).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.adapter_io import normal_mode, read_meta, read_weights, save_adapters

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
ENGINE_DIR = "engine"
STAGING_PREFIX = ".tmp-"  # a checkpoint being written, renamed to its name when complete
ENGINE_STAGING_PREFIX = ".engine-"  # DeepSpeed's own part of a checkpoint being written


@dataclass
class Position:
    """Where training stands: enough to continue exactly where a checkpoint was written."""

    stage_index: int = 0
    stage_step: int = 0  # optimizer steps done in this stage
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of this epoch already consumed
    global_step: int = 0


def save_checkpoint(
    run_dir: Path,
    model: Any,
    adapters: dict[str, torch.Tensor],
    optimizer: dict | None,
    scheduler: dict | None,
    position: Position,
    keep: int,
    engine_dir: Path | None = None,
    scaler: dict | None = None,
    stage_name: str | None = None,
    saved_adapters: Path | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """One resumable checkpoint (atomic: a staging directory renamed into place). ``adapters`` is
    ``adapter_state(model)``; ``optimizer``/``scheduler`` are state dicts, None at a stage's end.
    ``engine_dir``: what a distribution engine wrote itself (DeepSpeed: each process its part of
    the optimizer), moved in as ``engine/``. ``scaler``: fp16's GradScaler state (its scale took
    many steps to find; a resume from a fresh one would skip steps the first run did not).
    ``stage_name``: the stage that trained this step, in the name when the run has several.
    ``saved_adapters``: a directory holding exactly these adapters already (a finished stage's),
    hard-linked instead of written again, so the run stores them once. ``extra_files``: files
    saved next to the adapters (the chat template they were trained with)."""
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(position.global_step, stage_name)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=root))
    normal_mode(staging, directory=True)
    try:
        if saved_adapters is not None:
            link_files(saved_adapters, staging / "adapters")
        else:
            save_adapters(model, staging / "adapters", adapters)
            for name, data in (extra_files or {}).items():
                (staging / "adapters" / name).write_bytes(data)
        if optimizer is not None:  # absent when an engine saved its own (engine_dir)
            torch.save(optimizer, staging / "optimizer.pt")
        if scheduler is not None:
            torch.save(scheduler, staging / "scheduler.pt")
        if scaler is not None:
            torch.save(scaler, staging / "scaler.pt")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, staging / "rng.pt")
        if engine_dir is not None:
            os.replace(engine_dir, staging / ENGINE_DIR)
        (staging / STATE_FILE).write_text(json.dumps(asdict(position), indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def link_files(source: Path, target: Path) -> None:
    """``target`` made a directory holding ``source``'s files, hard-linked (copied where the file
    system has no links): the same bytes stored once."""
    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        try:
            os.link(path, target / path.name)
        except OSError:
            shutil.copy2(path, target / path.name)


def checkpoint_name(global_step: int, stage_name: str | None = None) -> str:
    """``step-0000024``, or ``step-0000024-<stage>`` in a run of several stages."""
    return f"step-{global_step:07d}" + (f"-{stage_name}" if stage_name else "")


def remove_leftovers(run_dir: Path) -> list[Path]:
    """Remove what a save killed half-way left in ``checkpoints/``: staging folders (never a complete
    checkpoint; resume ignores them) and DeepSpeed's parts of a checkpoint not yet renamed in.
    Called when a run starts (one process). Returns what it removed."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    leftovers = [p for p in root.iterdir() if p.name.startswith((STAGING_PREFIX, ENGINE_STAGING_PREFIX))]
    for path in leftovers:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return leftovers


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (half-written ones are staging dirs and never listed)."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / STATE_FILE).is_file()]
    return sorted(done, key=lambda p: json.loads((p / STATE_FILE).read_text())["global_step"])


def read_position(checkpoint: Path) -> Position:
    return Position(**json.loads((checkpoint / STATE_FILE).read_text()))


def load_adapter_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    directory = checkpoint / "adapters"
    return read_weights(directory, read_meta(directory))


def load_optimizer_state(checkpoint: Path) -> tuple[dict, dict]:
    """(optimizer, scheduler) state dicts saved by ``save_checkpoint``."""
    return torch.load(checkpoint / "optimizer.pt", weights_only=True), load_scheduler_state(checkpoint)


def load_scheduler_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "scheduler.pt", weights_only=True)


def load_scaler_state(checkpoint: Path) -> dict | None:
    """The fp16 GradScaler state saved with ``checkpoint``; None when its run did not scale."""
    path = checkpoint / "scaler.pt"
    return torch.load(path, weights_only=True) if path.is_file() else None


def restore_rng(checkpoint: Path) -> None:
    rng = torch.load(checkpoint / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
