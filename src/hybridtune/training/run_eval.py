"""Evaluation inside a run: eval loss and the task metric, split across processes or run whole
on sharded weights: a mixin of the recipe's Run."""

from __future__ import annotations

from typing import Any

import torch
from accelerate.utils import gather_object

from ..core import adapter_io as adapter_io
from ..core.partitioned import is_partitioned
from .evaluation import Generation, exact_match, loss_metrics, loss_sums
from .launch import (
    reshard,
)


class RunEvaluation:
    """Evaluation methods of ``Run`` (uses its accelerator, config, model, data, tokenizer, tracker, log)."""

    def evaluate(
        self, step: int, when: str, with_metric: bool = True, keep: list[Generation] | None = None
    ) -> dict[str, Any]:
        """Eval loss (and exact match) in the precision the run trains in."""
        try:
            with self.accelerator.autocast():
                return self._evaluate(step, when, with_metric, keep)
        finally:
            if self.config.fsdp is not None:
                reshard(self.model)

    def _evaluate(self, step: int, when: str, with_metric: bool, keep: list[Generation] | None) -> dict[str, Any]:
        """With whole weights in every process (DDP, DeepSpeed ZeRO 0-2) each process evaluates
        every N-th example and the sums are added up; sharded weights (FSDP, ZeRO-3) are gathered
        inside each forward, so there every process runs every example."""
        acc, ev = self.accelerator, self.config.eval
        model = self._unwrap(self.model)
        sharded = any(is_partitioned(p) for p in model.parameters())
        split = acc.num_processes > 1 and not sharded
        share = slice(acc.process_index, None, acc.num_processes) if split else slice(None)
        kernel = self.chunked_loss or "torch"  # the run's own loss kernel (its chunked loss is off: torch's)
        sums = loss_sums(model, self.data.eval[share], self.tokenizer.pad_token_id, ev.batch_size, kernel)
        if split:
            sums = acc.reduce(torch.tensor(sums, dtype=torch.float64, device=acc.device), "sum").tolist()
        result: dict[str, Any] = loss_metrics(*sums)
        if with_metric and ev.metric == "exact_match":
            indices = list(range(len(self.data.eval_examples[: ev.max_samples])))[share]
            accuracy, generations = exact_match(
                model,
                self.tokenizer,
                [self.data.eval_examples[i] for i in indices],
                task_ids=[self.data.eval[i].task_id for i in indices],
                system=self.config.data.system,
                max_new_tokens=ev.max_new_tokens,
                batch_size=ev.batch_size,
            )
            if split:  # every process's generations, back in the examples' order
                pairs = sorted(gather_object(list(zip(indices, generations, strict=True))), key=lambda p: p[0])
                generations = [g for _, g in pairs]
                accuracy = sum(g.correct for g in generations) / max(len(generations), 1)
            result["exact_match"] = accuracy
            if keep is not None:
                keep += generations
        self.tracker.log({"kind": "eval", "when": when, "step": step, **result})
        shown = ", ".join(f"{k}={v:.4f}" for k, v in result.items())
        self.log(f"eval ({when}, step {step}): {shown}")
        return result
