"""The pieces of one optimizer step the recipe is built from: the epoch order, micro-batch windows
for gradient accumulation, label counting, and the step that respects fp16's skipped updates."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Sampler

from ..core import adapter_io as adapter_io


class EpochSampler(Sampler[int]):
    """A shuffled order that depends only on (seed, stage, epoch): resumable, same on every rank."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed = size, seed

    @staticmethod
    def seed_for(run_seed: int, stage: int, epoch: int) -> int:
        """The seed of a stage's epoch: one run seed gives each stage and epoch its own order."""
        return run_seed * 1_000_003 + stage * 10_007 + epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


def label_tokens(batch: dict) -> int:
    """Label tokens a causal LM's loss averages over (labels are shifted by one)."""
    return int((batch["labels"][:, 1:] != -100).sum())


def windows(loader: Any, size: int):
    """The loader's batches in lists of ``size`` (the last one shorter): one list per optimizer step."""
    window = []
    for batch in loader:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def apply_step(stepper: Any, scheduler: Any) -> bool:
    """The optimizer step of a window whose gradients are in place (``stepper``: accelerate's
    optimizer, or DeepSpeed's engine, which also clips and zeroes), then the schedule's step — only
    when the weights were really updated: under fp16 a loss-scale overflow skips the update
    (accelerate's GradScaler, DeepSpeed's dynamic scaler), and the schedule then waits for it, as
    in transformers' Trainer. Returns whether the weights were updated."""
    stepper.step()
    if hasattr(stepper, "was_step_applied"):  # DeepSpeed's engine
        applied = stepper.was_step_applied()
    else:
        applied = not getattr(stepper, "step_was_skipped", False)
        stepper.zero_grad()
    if applied:
        scheduler.step()
    return applied


def progress_fields(record: dict[str, Any]) -> dict[str, str]:
    """What the progress bar shows of a train record."""
    shown = {"loss": f"{record['loss']:.4f}", "lr": f"{record['lr']:.2e}", "tok_s": f"{record['tokens_per_s']:.0f}"}
    if record.get("loss_scale") is not None:
        shown["scale"] = f"{record['loss_scale']:g}"
    return shown


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """What the model gets of a batch. Packed rows (position_ids) go without the attention mask:
    from position_ids alone transformers builds the block-diagonal causal mask that keeps each
    example to itself (the mask stays in the batch for counting its real tokens)."""
    if "position_ids" in batch:
        return {k: v for k, v in batch.items() if k != "attention_mask"}
    return batch


def memory_notes(peak_mb: float, device: torch.device, training: Any) -> list[str]:
    """What to tell a user whose run came near the machine's memory: the settings that lower it
    (gradient checkpointing is off by default: on the quickstart it costs ~40% more time for 28%
    less peak memory, bench/results/memory_cpu.md)."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory / 2**20
    else:
        import os

        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
        except (AttributeError, ValueError, OSError):  # no sysconf (Windows): nothing to compare with
            return []
    if peak_mb < 0.75 * total:
        return []
    lower = [] if training.gradient_checkpointing else ["training.gradient_checkpointing: true"]
    lower += [] if training.chunked_loss else ["training.chunked_loss: true"]
    lower += ["a smaller training.batch_size with a larger grad_accum"]
    return [f"note: peak memory {peak_mb:.0f} MB is {peak_mb / total:.0%} of this machine's {total:.0f} MB; "
            f"to lower it: {'; '.join(lower)}"]  # fmt: skip
