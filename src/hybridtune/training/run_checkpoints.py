"""Saving and restoring a run's training state in every regime (one process, DDP, FSDP2's
gathered optimizer state, DeepSpeed's own engine checkpoint): a mixin of the recipe's Run."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from ..core import adapter_io as adapter_io
from ..core.model import HybridModel
from .checkpoints import (
    CHECKPOINTS,
    ENGINE_DIR,
    ENGINE_STAGING_PREFIX,
    Position,
    link_files,
    load_optimizer_state,
    load_scheduler_state,
    save_checkpoint,
)
from .data import TEMPLATE_FILE
from .run_config import ConfigError

ENGINE_TAG = "state"  # the tag of DeepSpeed's own checkpoint inside ours


def _full_state():
    """torch.distributed.checkpoint's state-dict functions and full-state options, imported only by
    sharded runs (the module costs a second of start-up)."""
    from torch.distributed.checkpoint import state_dict

    return state_dict, state_dict.StateDictOptions(full_state_dict=True, cpu_offload=True)


class RunCheckpoints:
    """Checkpoint methods of ``Run`` (uses its accelerator, config, model, run_dir, main, deepspeed)."""

    def _adapter_state(self, model: HybridModel) -> dict[str, torch.Tensor]:
        """Every process calls it (FSDP and ZeRO gather here). DeepSpeed's bf16/fp16 modes hold the
        whole model in half precision: what a stage trains is read from the engine's fp32 master
        weights, and entries the stage keeps frozen are saved in fp32 too (their half values
        exactly), like every regime's checkpoints."""
        state = adapter_io.adapter_state(model)
        if self.deepspeed:
            state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        return state

    def _template_files(self) -> dict[str, bytes]:
        """Files saved next to adapters: the chat template of data.template, so generate / eval /
        serve render prompts as training did ("" for plain text); none with the tokenizer's own."""
        if self.config.data.template is None:
            return {}
        return {TEMPLATE_FILE: (self.tokenizer.chat_template or "").encode()}

    def _save_adapters(self, directory: Path) -> None:
        state = self._adapter_state(self.model)
        if self.main:
            self.model.save_adapters(directory, state)
            for name, data in self._template_files().items():
                adapter_io.atomic_write(directory / name, data)

    def _publish(self, stage_dir: Path, directory: Path) -> None:
        """The run's final adapters: the last stage's files (nothing trains after it), hard-linked
        so a run stores them once (copied where the file system has no links); replaced whole."""
        if not self.main:
            return
        staging, old = directory.with_name(f"{directory.name}.partial"), directory.with_name(f"{directory.name}.old")
        shutil.rmtree(staging, ignore_errors=True)
        link_files(stage_dir, staging)
        if directory.exists():
            shutil.rmtree(old, ignore_errors=True)
            directory.rename(old)
        staging.rename(directory)
        shutil.rmtree(old, ignore_errors=True)

    def _save(self, position: Position, prepared: Any, optimizer: Any, scheduler: Any, stage_name: str,
              stage_done: bool = False) -> None:  # fmt: skip
        """``prepared``: the model as accelerate prepared it (under DeepSpeed, its engine);
        ``stage_name``: the stage that trained this step (in the checkpoint's name with several);
        ``stage_done``: the stage just saved its adapters (stages/<name>), which the checkpoint links."""
        acc = self.accelerator
        acc.wait_for_everyone()
        model = self._unwrap(self.model)
        adapters = self._adapter_state(model)
        optimizer_state, engine_dir = None, None
        if optimizer is not None and self.deepspeed:
            # each process holds a part of the ZeRO optimizer state: DeepSpeed writes the parts
            # (no frozen weights), and the checkpoint takes them in when it is renamed into place
            engine_dir = self.run_dir / CHECKPOINTS / f"{ENGINE_STAGING_PREFIX}{position.global_step}"
            prepared.save_checkpoint(str(engine_dir), tag=ENGINE_TAG, exclude_frozen_parameters=True)
            acc.wait_for_everyone()
        elif optimizer is not None:
            if self.config.fsdp is None:
                optimizer_state = optimizer.state_dict()
            else:  # the full (gathered) moments, keyed by parameter name: resumable on any process count
                dcp, full = _full_state()
                optimizer_state = dcp.get_optimizer_state_dict(model, optimizer.optimizer, options=full)
        if self.main:
            save_checkpoint(
                self.run_dir,
                model,
                adapters,
                optimizer_state,
                None if optimizer is None else scheduler.state_dict(),
                position,
                keep=self.config.training.keep_checkpoints,
                engine_dir=engine_dir,
                scaler=None if acc.scaler is None else acc.scaler.state_dict(),
                stage_name=stage_name if len(self.config.stage_list()) > 1 else None,
                saved_adapters=self.run_dir / "stages" / stage_name if stage_done else None,
                extra_files=self._template_files(),
            )
        acc.wait_for_everyone()

    def _load_optimizer(self, checkpoint: Path, prepared: Any, optimizer: Any, scheduler: Any) -> None:
        if self.deepspeed:
            engine = checkpoint / ENGINE_DIR
            if not engine.is_dir():
                raise ConfigError([f"{checkpoint} was not written by a DeepSpeed run: resume it without 'deepspeed'"])
            prepared.load_checkpoint(
                str(engine), tag=ENGINE_TAG, load_module_strict=False, load_optimizer_states=True,
                load_lr_scheduler_states=False,
            )  # fmt: skip
            scheduler.load_state_dict(load_scheduler_state(checkpoint))
            return
        optimizer_state, scheduler_state = load_optimizer_state(checkpoint)
        if self.config.fsdp is None:
            optimizer.load_state_dict(optimizer_state)
        else:
            dcp, full = _full_state()
            dcp.set_optimizer_state_dict(self.model, optimizer.optimizer, optimizer_state, options=full)
        scheduler.load_state_dict(scheduler_state)
