"""transformers' Trainer, and TRL's trainers built on it, as training loops for a HybridModel.

A plain ``Trainer`` trains a HybridModel as it is (its forward has the base model's signature),
but it checkpoints a model that is not a PreTrainedModel as one state dict of everything, the
frozen base included. ``HybridTrainer`` (or ``hybrid_trainer(AnyTrainerSubclass)``, e.g. TRL's
``SFTTrainer``) checkpoints the adapters only, in hybridtune's own format — what peft models get
from Trainer — so ``hybridtune.load(base, checkpoint_dir)`` reads any checkpoint, and
``trainer.train(resume_from_checkpoint=...)`` puts exactly those weights back, with the optimizer,
scheduler and RNG states Trainer saves next to them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer

from ..core import adapter_io
from ..core.model import HybridModel

TRAINING_ARGS_NAME = "training_args.bin"  # the name Trainer gives its arguments in a checkpoint


class HybridCheckpointing:
    """Mix into a ``transformers.Trainer`` subclass (first in the bases): adapter-only checkpoints.

    TRL's SFTTrainer patches a fused LM head onto the model it is given, reading the backbone from
    ``model.base_model`` as transformers models name it; a HybridModel's ``base_model`` is the
    whole causal LM, so the head goes onto that causal LM instead (the branches run inside it).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        modules = {sys.modules[c.__module__] for c in type(self).__mro__ if c.__module__ in sys.modules}
        patched = [(m, m.add_fused_lm_head) for m in modules if callable(getattr(m, "add_fused_lm_head", None))]

        def onto_the_causal_lm(real):
            def add(model, *a, **k):
                return real(model.base_model if isinstance(model, HybridModel) else model, *a, **k)

            return add

        for module, real in patched:
            module.add_fused_lm_head = onto_the_causal_lm(real)
        try:
            super().__init__(*args, **kwargs)
        finally:
            for module, real in patched:
                module.add_fused_lm_head = real

    def _hybrid(self, model: Any = None) -> HybridModel | None:
        unwrapped = self.accelerator.unwrap_model(model if model is not None else self.model)
        return unwrapped if isinstance(unwrapped, HybridModel) else None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        hybrid = self._hybrid()
        if hybrid is None:
            return super()._save(output_dir, state_dict)
        state = adapter_io.adapter_state(hybrid)  # every process: sharded weights are gathered here
        if not self.args.should_save:
            return None
        directory = Path(output_dir if output_dir is not None else self.args.output_dir)
        hybrid.save_adapters(directory, state)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(directory)
        torch.save(self.args, directory / TRAINING_ARGS_NAME)
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        hybrid = self._hybrid(model)
        if hybrid is None or not (Path(resume_from_checkpoint) / adapter_io.CONFIG_NAME).is_file():
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        restore_adapters(hybrid, resume_from_checkpoint)
        return None

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        hybrid = self._hybrid()
        if hybrid is None or best is None or not (Path(best) / adapter_io.CONFIG_NAME).is_file():
            return super()._load_best_model()
        restore_adapters(hybrid, best)
        return None


def restore_adapters(hybrid: HybridModel, directory: str | Path) -> None:
    """Copy the adapter weights saved in ``directory`` into ``hybrid``'s entries (checked: keys,
    shapes, the base model's identity), keeping trainability as it is."""
    meta = adapter_io.read_meta(directory)
    adapter_io.check_base(hybrid.base_model, meta, allow_base_mismatch=False)
    state = adapter_io.read_weights(directory, meta)
    adapter_io.load_state(hybrid, state, entries=list(hybrid.entries), source=str(directory))


def hybrid_trainer(trainer_class: type[Trainer]) -> type[Trainer]:
    """``trainer_class`` (Trainer or a subclass such as TRL's SFTTrainer) with adapter-only
    checkpoints for HybridModels: ``hybrid_trainer(SFTTrainer)(model=hybrid, ...)``."""
    return type(f"Hybrid{trainer_class.__name__}", (HybridCheckpointing, trainer_class), {})


HybridTrainer = hybrid_trainer(Trainer)
