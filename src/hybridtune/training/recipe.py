"""The fine-tuning recipe behind ``hybridtune train``: stages, evaluation, checkpoints and resume.

The loop is plain PyTorch on top of accelerate, which supplies mixed precision, clipping and
multi-process DDP (torchrun / accelerate launch); FSDP2 and the engine settings are in launch.py.
Gradient accumulation is the loop's own, so that a step's loss is the token mean of its whole
global batch (see ``Run._step``). Each stage trains its own entries with a fresh optimizer; the
other entries stay active, frozen.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate.utils import DistributedType, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..core import adapter_io as adapter_io
from ..core.base_models import load_base, load_skeleton, resolve_model
from ..core.chunked_loss import last_loss_kernel
from ..core.model import HybridModel, inject
from ..core.partitioned import is_partitioned
from .base_setup import prepare_base
from .checkpoints import (
    Position,
    list_checkpoints,
    load_adapter_weights,
    load_scaler_state,
    read_position,
    remove_leftovers,
    restore_rng,
)
from .data import collate
from .data_prep import prepare_data
from .evaluation import Generation
from .launch import (
    base_dtype,
    contiguous_parameters,
    environment_problems,
    full_weights_at_load,
    make_accelerator,
    peak_memory_mb,
    shard,
    with_launcher_fsdp,
    zero3_input_branches,
)
from .run_checkpoints import RunCheckpoints
from .run_config import ConfigError, RunConfig, StageConfig
from .run_dir import (
    CONFIG_COPY,
    STOP_FILE,
    SUMMARY,
    RunResult,
    TrainingInterrupted,
    TrainingStopped,
    check_run_dir,
    saved_before,
    truncate_metrics,
)
from .run_eval import RunEvaluation
from .schedules import get_scheduler
from .steps import EpochSampler, apply_step, label_tokens, memory_notes, model_inputs, progress_fields, windows
from .tracking import METRICS_FILE, Tracker, read_metrics


class Run(RunCheckpoints, RunEvaluation):
    """One execution of the recipe; holds what the stage loop needs."""

    def __init__(self, config: RunConfig, log=tqdm.write, stop_after_step: int | None = None) -> None:
        config = with_launcher_fsdp(config)
        self.config, self.stop_after_step = config, stop_after_step
        problems = environment_problems(config)
        if problems:
            raise ConfigError(problems)
        self.accelerator = make_accelerator(config)
        self.deepspeed = self.accelerator.distributed_type == DistributedType.DEEPSPEED
        self.main = self.accelerator.is_main_process
        self.log = log if self.main else (lambda *_: None)  # one process speaks for the run
        self.run_dir = Path(config.output)
        self.generations_before: list[Generation] = []

    def execute(self, overwrite: bool = False, from_checkpoint: Path | None = None) -> RunResult:
        config, t = self.config, self.config.training
        resuming = check_run_dir(self.run_dir, config, overwrite, from_checkpoint) if self.main else False
        resuming = self._broadcast(resuming)
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            remove_leftovers(self.run_dir)  # of a save that was killed half-way
            adapter_io.atomic_write(self.run_dir / CONFIG_COPY, yaml.safe_dump(config.dump(), sort_keys=False).encode())
        set_seed(t.seed)
        last_loss_kernel(forget=True)
        self.model = self._build_model()
        self.data = prepare_data(config, self.tokenizer)
        self.tracker = Tracker(self.run_dir, enabled=self.main)
        for note in self.data.notes if self.main else []:
            self.log(f"note: {note}")
        if self.data.truncated:
            self.log(
                f"note: {self.data.truncated} example(s) were longer than data.max_length={config.data.max_length} "
                "and were truncated"
            )
        if self.main:
            self.model.print_trainable_parameters()

        position, checkpoint = Position(), None
        summary: dict[str, Any] = {"model": config.model, "run_dir": str(self.run_dir)}
        if resuming:
            checkpoint = list_checkpoints(self.run_dir)[-1]
            position = read_position(checkpoint)
            adapter_io.load_state(
                self.model, load_adapter_weights(checkpoint), list(self.model.entries), str(checkpoint)
            )
            if self.main:
                truncate_metrics(self.run_dir, position.global_step)
            self.log(f"resuming from {checkpoint} (stage {position.stage_index}, step {position.global_step})")
            before = saved_before(self.run_dir)
            if before:
                summary["before"] = before
        if config.fsdp is not None:  # after a resumed run's weights are in, before anything runs the model
            shard(self.model, config, self.accelerator.device)
        evaluate_before = not resuming and self.data.eval and config.eval.before_training
        # a base that ZeRO-3 partitioned as it loaded runs only once an engine gathers its weights
        deferred = evaluate_before and any(hasattr(p, "ds_id") for p in self.model.parameters())
        if evaluate_before and not deferred:
            summary["before"] = self.evaluate(position.global_step, "before", keep=self.generations_before)

        started = time.time()
        for index, stage in enumerate(config.stage_list()):
            if index < position.stage_index:
                continue
            resume_from = checkpoint if (checkpoint is not None and index == position.stage_index) else None
            position = self.run_stage(index, stage, position, resume_from, summary if deferred else None)
            deferred = False
        summary["train_seconds"] = round(time.time() - started, 1)
        summary["steps"] = position.global_step
        summary["peak_memory_mb"] = round(peak_memory_mb(self.accelerator.device), 1)
        summary["loss_kernel"] = last_loss_kernel()  # liger's, the torch one, or transformers' plain loss
        for note in memory_notes(summary["peak_memory_mb"], self.accelerator.device, config.training):
            self.log(note)

        adapters_dir = self.run_dir / "adapters"
        generations: list[Generation] = []
        self._publish(self.run_dir / "stages" / config.stage_list()[-1].name, adapters_dir)
        if self.data.eval:
            summary["after"] = self.evaluate(position.global_step, "after", keep=generations)
        records = read_metrics(self.run_dir / METRICS_FILE)
        train_losses = [r["loss"] for r in records if r.get("kind") == "train"]
        summary["final_train_loss"] = train_losses[-1] if train_losses else None
        skipped = sum(r.get("kind") == "skipped" for r in records)
        if skipped:  # fp16 overflows: steps that updated nothing
            summary["skipped_steps"] = skipped
        summary["adapters"] = str(adapters_dir)
        if self.main:
            curve = self.tracker.plot()
            summary["loss_curve"] = str(curve) if curve else None
            adapter_io.atomic_write(self.run_dir / SUMMARY, (json.dumps(summary, indent=2) + "\n").encode())
        self.tracker.close()
        self.accelerator.end_training()
        return RunResult(self.run_dir, adapters_dir, summary, generations, self.generations_before, self.main)

    # ---- one stage --------------------------------------------------------------------------
    def run_stage(
        self,
        index: int,
        stage: StageConfig,
        position: Position,
        checkpoint: Path | None,
        summary_before: dict[str, Any] | None = None,
    ) -> Position:
        """Train one stage. ``summary_before`` gets the eval before training, deferred until the
        engine is made (a base partitioned at load, see ``execute``)."""
        t, acc = self.config.training, self.accelerator
        self.model.set_trainable(stage.train)
        params = self.model.parameters_to_train()
        lr = stage.lr or t.lr
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=t.weight_decay)
        batches_per_epoch = math.ceil(len(self.data.train) / (t.batch_size * acc.num_processes))
        steps_per_epoch = max(1, math.ceil(batches_per_epoch / t.grad_accum))
        total = stage.max_steps or math.ceil(steps_per_epoch * stage.epochs)
        warmup = stage.warmup_ratio if stage.warmup_ratio is not None else t.warmup_ratio
        scheduler = get_scheduler(stage.scheduler or t.scheduler, optimizer, round(warmup * total), total)
        if self.config.fsdp is None:
            if self.deepspeed:
                contiguous_parameters(self.model)
            model, optimizer, scheduler = acc.prepare(self.model, optimizer, scheduler)
            if self.deepspeed and model.zero_optimization_stage() == 3:
                zero3_input_branches(self.model)
        else:  # sharded in place already (see execute); accelerate keeps the optimizer
            model, (optimizer, scheduler) = self.model, acc.prepare(optimizer, scheduler)
        if summary_before is not None:
            summary_before["before"] = self.evaluate(position.global_step, "before", keep=self.generations_before)
        if t.compile:
            model = torch.compile(model)
        if checkpoint is not None and position.stage_step > 0:
            self._load_optimizer(checkpoint, model, optimizer, scheduler)
        else:
            position = Position(index, 0, 0, 0, position.global_step)
            self.tracker.log({"kind": "stage_start", "stage": stage.name, "step": position.global_step})
        if checkpoint is not None:
            restore_rng(checkpoint)
            scaler_state = load_scaler_state(checkpoint)
            if acc.scaler is not None and scaler_state is not None:  # also at a stage boundary: one scaler per run
                acc.scaler.load_state_dict(scaler_state)

        self._grow(stage, position.stage_step, steps_per_epoch)
        bar = tqdm(total=total, initial=position.stage_step, desc=f"stage {stage.name}", disable=not self.main)
        model.train()
        window_tokens, window_start = 0, time.time()
        while position.stage_step < total:
            loader = self._loader(index, position.epoch)
            if position.batches_in_epoch:
                loader = acc.skip_first_batches(loader, position.batches_in_epoch)
            for window in windows(loader, t.grad_accum):
                loss, tokens, applied = self._step(model, window, params, optimizer, scheduler)
                position.batches_in_epoch += len(window)
                window_tokens += tokens
                position.stage_step += 1
                position.global_step += 1
                step = position.global_step
                if not applied:
                    self.tracker.log({"kind": "skipped", "stage": stage.name, "step": step, "reason": "fp16 overflow"})
                self._grow(stage, position.stage_step, steps_per_epoch, step)
                if step % t.log_every == 0:
                    elapsed = max(time.time() - window_start, 1e-9)
                    record = {
                        "kind": "train",
                        "stage": stage.name,
                        "step": step,
                        "loss": loss,
                        "lr": scheduler.get_last_lr()[0],
                        "tokens_per_s": window_tokens / elapsed,
                        "remaining_steps": total - position.stage_step,  # of this stage: the ETA's basis
                    }
                    scale = self._loss_scale(model)
                    if scale is not None:
                        record["loss_scale"] = scale
                    self.tracker.log(record)
                    bar.set_postfix(progress_fields(record))
                    window_tokens, window_start = 0, time.time()
                bar.update(1)
                last_step = position.stage_step >= total and index == len(self.config.stage_list()) - 1
                if t.eval_every and step % t.eval_every == 0 and self.data.eval and not last_step:
                    # (the run's last step is evaluated once, "after", with the task metric too)
                    self.evaluate(step, "during", with_metric=False)
                    self.tracker.plot()
                done = position.stage_step >= total
                final = done and index == len(self.config.stage_list()) - 1
                if done:  # the stage is complete: its adapters, then a checkpoint that resumes at the next stage
                    self._save_adapters(self.run_dir / "stages" / stage.name)
                    # (the last stage's stays where it is, with its optimizer: a longer run extends it)
                    position = position if final else Position(index + 1, 0, 0, 0, step)
                stop = self._broadcast((self.run_dir / STOP_FILE).exists()) and not done
                if (t.save_every and step % t.save_every == 0) or done or stop:
                    self._save(position, model, None if done and not final else optimizer, scheduler, stage.name, done)
                if stop:
                    self.tracker.log({"kind": "stopped", "stage": stage.name, "step": step})
                    if self.main:  # the request is served: running again resumes
                        (self.run_dir / STOP_FILE).unlink(missing_ok=True)
                    bar.close()
                    raise TrainingStopped(step, self.run_dir)
                if self.stop_after_step is not None and step >= self.stop_after_step:
                    bar.close()
                    raise TrainingInterrupted(f"stopped after step {step} as asked")
                if done:
                    break
            else:
                position.epoch, position.batches_in_epoch = position.epoch + 1, 0
                continue
            break
        bar.close()
        self.model = self._unwrap(model)
        return position

    def _step(
        self, model: Any, window: list[dict], params: list, optimizer: Any, scheduler: Any
    ) -> tuple[float, int, bool]:
        """One optimizer step over the micro-batches of ``window`` on every process.

        The loss is the mean over every label token of the step's global batch, so N processes
        x B rows x k accumulation steps train the same as one process with N*B*k rows: each
        micro-batch's token-mean loss is weighted by its share of the step's tokens (and by N,
        which DDP's gradient averaging divides out again). Returns that loss, the step's input
        tokens over all processes, and whether the optimizer stepped (see ``apply_step``).
        """
        acc, t = self.accelerator, self.config.training
        counts = [label_tokens(b) for b in window]
        total = acc.reduce(torch.tensor(float(sum(counts)), device=acc.device), reduction="sum").item()
        summed = torch.zeros((), device=acc.device)
        inputs = sum(int(b["attention_mask"].sum()) for b in window)
        for i, (batch, count) in enumerate(zip(window, counts, strict=True)):
            last = i == len(window) - 1
            with contextlib.nullcontext() if last or self.deepspeed else acc.no_sync(model):
                loss = model(**model_inputs(batch), use_cache=False, chunked_loss=self.chunked_loss).loss  # no cache
                if count == 0:  # no label tokens here: nothing to learn, and HF's mean is NaN
                    loss = loss.nan_to_num() * 0.0
                weighted = loss * (count * acc.num_processes / max(total, 1.0))
                if self.deepspeed:  # the engine's own accumulation boundary; the weights already average
                    model.set_gradient_accumulation_boundary(last)
                    model.backward(weighted, scale_wrt_gas=False)
                else:
                    acc.backward(weighted)
            summed += loss.detach().float() * count
        if t.max_grad_norm and not self.deepspeed:  # the engine clips in its own step
            acc.clip_grad_norm_(params, t.max_grad_norm)
        applied = apply_step(model if self.deepspeed else optimizer, scheduler)
        loss_sum, inputs = acc.reduce(torch.stack([summed, torch.tensor(inputs, device=acc.device)]), "sum").tolist()
        return loss_sum / max(total, 1.0), int(inputs), applied

    # ---- helpers ----------------------------------------------------------------------------
    def _unwrap(self, model: Any) -> Any:
        """The HybridModel inside what accelerate prepared. accelerate's own unwrap_model imports
        DeepSpeed whenever it is installed (and DeepSpeed announces itself at import), so runs
        that do not use DeepSpeed take off DDP's and torch.compile's wrappers themselves."""
        if self.deepspeed:
            return self.accelerator.unwrap_model(model)
        model = getattr(model, "_orig_mod", model)
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        return getattr(model, "_orig_mod", model)

    def _loss_scale(self, prepared: Any) -> float | None:
        """fp16's current loss scale (accelerate's GradScaler, or DeepSpeed's dynamic scaler in
        ``prepared``, its engine); None when the run does not scale. Logged with the loss: a scale
        that keeps falling is the first sign of a run going to NaN."""
        if self.accelerator.scaler is not None:
            return float(self.accelerator.scaler.get_scale())
        if self.deepspeed and prepared.fp16_enabled():
            return float(prepared.optimizer.loss_scale)
        return None

    def _build_model(self) -> HybridModel:
        """Base (in its storage dtype, or quantized) + branches, whose trainable weights stay fp32:
        AdamW updates of a few thousand parameters are cheap, and half-precision master weights
        would round small updates away. (Under DeepSpeed in half precision its optimizer keeps
        the fp32 masters of branches it casts.)"""
        config, t, acc = self.config, self.config.training, self.accelerator
        quant = config.model_quantization
        sharded = config.fsdp is not None  # weights reach the device as shards, from the first process
        with acc.main_process_first(), full_weights_at_load(acc):
            resolve_model(config.model)  # the first process converts the embedded model once
        if sharded and not self.main:
            base, self.tokenizer = load_skeleton(config.model, base_dtype(config))
        else:  # under DeepSpeed ZeRO-3 (not quantized): partitioned as it loads, by all processes together
            base, self.tokenizer = load_base(config.model, base_dtype(config), quant, acc.device)
        partitioned = [p.dtype for p in base.parameters() if is_partitioned(p)]
        prepare_base(base, config)  # k-bit training preparation, liger's kernels
        model = inject(base, config.hybrid_config())
        # DeepSpeed casts a model to its half dtype when it partitions it (its optimizer keeps fp32 masters),
        # but takes a base partitioned at load (and cast then) as it is: the same for the branches
        model.cast_branches(partitioned[0] if partitioned else torch.float32)
        self.chunked_loss = t.chunked_loss and not sharded and not self.deepspeed and t.loss_kernel  # one whole head
        if t.gradient_checkpointing:
            model.activation_checkpointing_enable(offload_to_cpu=t.offload_activations)
            base.config.use_cache = False
        # partitions sit on their devices already; new branches were made next to them
        return model if quant is not None or sharded or partitioned else model.to(acc.device)

    def _grow(self, stage: StageConfig, stage_step: int, steps_per_epoch: int, step: int | None = None) -> None:
        """Growing-rank schedules of the stage's entries follow the stage's own step count."""
        changed = self.model.update_rank_schedules(stage_step, stage_step / steps_per_epoch, stage.train)
        if changed and step is not None:
            self.tracker.log({"kind": "rank", "stage": stage.name, "step": step, **changed})

    def _loader(self, stage_index: int, epoch: int) -> DataLoader:
        t = self.config.training
        seed = EpochSampler.seed_for(t.seed, stage_index, epoch)
        loader = DataLoader(
            self.data.train,
            batch_size=t.batch_size,
            sampler=EpochSampler(len(self.data.train), seed),
            collate_fn=lambda items: collate(items, self.tokenizer.pad_token_id),
            # its own generator: starting an epoch must not draw from the global RNG (dropout's),
            # or a resumed run would see different dropout masks than an uninterrupted one
            generator=torch.Generator().manual_seed(seed),
        )
        return self.accelerator.prepare_data_loader(loader)

    def _broadcast(self, value: bool) -> bool:
        from accelerate.utils import broadcast_object_list

        box = [value]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(box)
        return box[0]


def train(config: RunConfig, *, overwrite: bool = False, log=tqdm.write, **options: Any) -> RunResult:
    """Run (or resume) the recipe for ``config``; see the module docstring. ``log`` prints a line
    (tqdm's write by default: lines printed while a bar runs get their own). ``options``:
    ``from_checkpoint`` (a checkpoint of the run to resume from), ``stop_after_step`` (tests)."""
    run = Run(config, log=log, stop_after_step=options.pop("stop_after_step", None))
    return run.execute(overwrite=overwrite, **options)
