"""A run directory's lifecycle: what it holds (config copy, summary, metrics, checkpoints, the
STOP file the UI writes), whether it can be resumed, and the metrics a resume keeps.

    RUN/config.yaml      the run's validated config, as resumed runs must match it
    RUN/metrics.jsonl    one JSON record per event (train, eval, stage_start, rank, ...)
    RUN/checkpoints/     resumable checkpoints (see checkpoints.py)
    RUN/stages/NAME/     each stage's adapters, RUN/adapters/ the final ones
    RUN/summary.json     written last: the run is finished
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..core import adapter_io as adapter_io
from .checkpoints import list_checkpoints, read_position
from .evaluation import Generation
from .run_config import ConfigError, RunConfig
from .tracking import METRICS_FILE, STAMPS, read_metrics

CONFIG_COPY = "config.yaml"
SUMMARY = "summary.json"
STOP_FILE = "STOP"  # created by a user (or the web UI) to stop a run cleanly at the next step


class TrainingInterrupted(RuntimeError):
    """Raised by ``stop_after_step`` (tests use it to simulate a crash at a known step)."""


class TrainingStopped(RuntimeError):
    """The run was asked to stop (a ``STOP`` file in its directory); a checkpoint was written at
    ``step`` and running the same config again resumes from it."""

    def __init__(self, step: int, run_dir: Path) -> None:
        super().__init__(f"stopped at step {step} as asked; checkpoint kept in {run_dir}, run again to resume")
        self.step, self.run_dir = step, run_dir


@dataclass
class RunResult:
    run_dir: Path
    adapters_dir: Path
    summary: dict[str, Any]
    generations: list[Generation] = field(default_factory=list)  # after training
    generations_before: list[Generation] = field(default_factory=list)
    is_main: bool = True  # False on the other processes of a multi-process run (they stay quiet)


def check_run_dir(run_dir: Path, config: RunConfig, overwrite: bool, from_checkpoint: Path | None = None) -> bool:
    """True when an interrupted run is there to resume; errors on a finished or different run.
    ``from_checkpoint``: one of the run's checkpoints to resume from instead of the last one."""
    if overwrite and from_checkpoint is not None:  # checked before anything is deleted
        raise ConfigError(["--overwrite deletes the run that --from-checkpoint resumes: give one of them"])
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    saved_path = run_dir / CONFIG_COPY
    if from_checkpoint is not None and not saved_path.is_file():
        raise ConfigError([f"--from-checkpoint: output '{run_dir}' holds no run to resume"])
    if not saved_path.is_file():
        return False
    saved, current = normalized(yaml.safe_load(saved_path.read_text())), config.dump()
    if from_checkpoint is not None and (saved == current or extends(saved, current)):
        return _from_checkpoint(run_dir, Path(from_checkpoint))
    if saved != current and extends(saved, current):
        return _extending(run_dir, config)
    if saved != current:
        keys = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        raise ConfigError(
            [
                f"output '{run_dir}' holds a run with a different config (differs in: {', '.join(keys)}); "
                "choose another output or pass --overwrite"
            ]
        )
    if (run_dir / SUMMARY).is_file():
        raise ConfigError([f"output '{run_dir}' holds a finished run; choose another output or pass --overwrite"])
    return bool(list_checkpoints(run_dir))


def normalized(saved: Any) -> Any:
    """A saved config.yaml as this version dumps it (new keys at their defaults, one data file as a
    list), so a run started by an earlier version resumes; as it is when it no longer validates."""
    try:
        return RunConfig.model_validate(saved).dump()
    except Exception:
        return saved


def extends(saved: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether ``new`` is ``saved``'s run made longer: the length of its last stage grew (its
    ``max_steps`` raised, or its ``epochs`` raised where neither has ``max_steps``), nothing else
    changed. Without ``stages`` the one stage's length is ``training``'s."""
    saved, new = copy.deepcopy(saved), copy.deepcopy(new)
    staged = bool(saved.get("stages"))
    if staged != bool(new.get("stages")) or (staged and len(saved["stages"]) != len(new["stages"])):
        return False
    old_last, new_last = (saved["stages"][-1], new["stages"][-1]) if staged else (saved.get("training", {}),
                                                                               new.get("training", {}))  # fmt: skip
    before = (old_last.pop("max_steps", None), old_last.pop("epochs", None))
    after = (new_last.pop("max_steps", None), new_last.pop("epochs", None))
    if saved != new:
        return False
    if before[0] is not None and after[0] is not None:
        return after[0] > before[0] and before[1] == after[1]
    return before[0] is None and after[0] is None and (after[1] or 1) > (before[1] or 1)


def _extending(run_dir: Path, config: RunConfig) -> bool:
    """Continue a run that a longer config extends, from its last checkpoint (the LR schedule is
    computed for the new length from there, as transformers' Trainer does on a longer resume)."""
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints or read_position(checkpoints[-1]).stage_index >= len(config.stage_list()):
        raise ConfigError([
            f"output '{run_dir}' holds a run whose last checkpoint cannot be continued (written by an older "
            "hybridtune, or removed); choose another output or pass --overwrite"
        ])  # fmt: skip
    (run_dir / SUMMARY).unlink(missing_ok=True)  # written again when the longer run ends (config.yaml too)
    return True


def _from_checkpoint(run_dir: Path, chosen: Path) -> bool:
    """Resume from ``chosen``: the run's later checkpoints move to checkpoints/superseded/ (kept,
    never deleted), so ``chosen`` is the last one; a finished run's summary goes."""
    checkpoints = list_checkpoints(run_dir)
    resolved = {c.resolve(): c for c in checkpoints}
    if chosen.resolve() not in resolved:
        names = ", ".join(c.name for c in checkpoints) or "none"
        raise ConfigError([f"--from-checkpoint: '{chosen}' is not a checkpoint of '{run_dir}' (it has: {names})"])
    step = read_position(chosen).global_step
    later = [c for c in checkpoints if read_position(c).global_step > step]
    if later:
        aside = run_dir / "checkpoints" / "superseded"
        aside.mkdir(exist_ok=True)
        for checkpoint in later:
            checkpoint.rename(aside / f"{checkpoint.name}-{int(checkpoint.stat().st_mtime)}")
    (run_dir / SUMMARY).unlink(missing_ok=True)
    return True


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop records the interrupted run wrote after the checkpoint it resumes from."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return
    kept = [
        r
        for r in read_metrics(path)
        if r.get("step", 0) <= step and not (r.get("kind") == "eval" and r.get("when") == "after")
    ]
    adapter_io.atomic_write(path, "".join(json.dumps(r) + "\n" for r in kept).encode())


def saved_before(run_dir: Path) -> dict[str, Any] | None:
    """The eval before training that an interrupted run recorded (a resume does not redo it)."""
    for record in read_metrics(run_dir / METRICS_FILE):
        if record.get("kind") == "eval" and record.get("when") == "before":
            return {k: v for k, v in record.items() if k not in {"kind", "when", "step", *STAMPS}}
    return None
