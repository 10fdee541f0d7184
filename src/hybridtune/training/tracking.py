"""Run metrics: an append-only metrics.jsonl, a loss-curve PNG, and TensorBoard when installed."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "loss_curve.png"
STAMPS = ("time", "elapsed_s")  # what ``Tracker.log`` adds to every record
_NOT_SCALARS = {"step", *STAMPS, "eta_s", "remaining_steps"}  # bookkeeping, not curves for TensorBoard


class Tracker:
    """Writes only on the main process; every other rank gets a Tracker that does nothing."""

    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.run_dir, self.enabled = run_dir, enabled
        self._started = time.time()
        self._pace: tuple[float, int, str | None] | None = None  # (time, step, stage) the ETA counts from
        self._tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self._tb = None

    def log(self, record: dict[str, Any]) -> None:
        """Append ``record`` to metrics.jsonl with the time (UTC, ISO 8601) and the seconds since
        this process started logging; a train record with ``remaining_steps`` also gets ``eta_s``,
        from the pace of the steps logged so far."""
        if not self.enabled:
            return
        now = time.time()
        record = {**record, "time": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds"),
                  "elapsed_s": round(now - self._started, 1)}  # fmt: skip
        if record.get("kind") == "train" and "remaining_steps" in record:
            if self._pace is None or record.get("stage") != self._pace[2]:
                self._pace = (now, record["step"], record.get("stage"))
            start, first_step, _ = self._pace
            if record["step"] > first_step:
                record["eta_s"] = round((now - start) / (record["step"] - first_step) * record["remaining_steps"], 1)
        with open(self.run_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None and "step" in record:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in _NOT_SCALARS:
                    self._tb.add_scalar(key, value, record["step"])

    def plot(self) -> Path | None:
        if not self.enabled:
            return None
        return plot_curves(self.run_dir / METRICS_FILE, self.run_dir / CURVE_FILE)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(metrics_path: Path, out: Path) -> Path | None:
    """Train loss (and eval loss where measured) against the optimizer step."""
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("kind") == "eval" and "eval_loss" in r]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    for r in records:
        if r.get("kind") == "stage_start":
            ax.axvline(r["step"], color="grey", linestyle=":", linewidth=1)
            ax.annotate(r["stage"], (r["step"], 1), xycoords=("data", "axes fraction"), fontsize=8, va="top")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out)
    return out
