"""Evaluation: masked loss / perplexity, and a task metric from greedy generations."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.model import HybridModel
from .data import Encoded, Example, collate, render_prompt, with_system


def eval_loss(model: nn.Module, encoded: list[Encoded], pad_id: int, batch_size: int) -> dict[str, float]:
    """Token-weighted mean loss over the assistant tokens, and its perplexity."""
    return loss_metrics(*loss_sums(model, encoded, pad_id, batch_size))


def loss_metrics(total: float, tokens: int) -> dict[str, float]:
    loss = total / max(tokens, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}


@torch.no_grad()
def loss_sums(model: nn.Module, encoded: list[Encoded], pad_id: int, batch_size: int,
              kernel: str = "auto") -> tuple[float, int]:  # fmt: skip
    """The summed loss of the assistant tokens and their count: what ``eval_loss`` averages, and
    what processes that each evaluate a share add up. ``kernel``: the chunked loss's (a run's own)."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, len(encoded), batch_size):
        batch = collate(encoded[start : start + batch_size], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        extra = {"task_ids": batch["task_ids"]} if "task_ids" in batch else {}
        if isinstance(model, HybridModel):  # the loss without logits where the model allows
            extra |= {"labels": batch["labels"], "chunked_loss": kernel}
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra)
        shift_labels = batch["labels"][:, 1:]
        count = int((shift_labels != -100).sum())
        if out.logits is None:
            total += float(out.loss) * count
        else:
            total += nn.functional.cross_entropy(
                out.logits[:, :-1].float().reshape(-1, out.logits.shape[-1]), shift_labels.reshape(-1), reduction="sum"
            ).item()
        tokens += count
    model.train(was_training)
    return total, tokens


def normalize(text: str) -> str:
    return " ".join(text.strip().split()).lower().rstrip(".")


@dataclass
class Generation:
    question: str  # the last user message, for display
    prompt: str  # the rendered prompt the model saw
    reference: str
    output: str

    @property
    def correct(self) -> bool:
        return normalize(self.output) == normalize(self.reference)


@torch.no_grad()
def generate_batch(
    model: nn.Module, tokenizer: Any, prompts: list[str], max_new_tokens: int, **route: Any
) -> list[str]:
    """Greedy completions of already-rendered prompts (left-padded in one batch). ``route`` passes
    ``adapter_sets`` / ``task_ids`` through to a HybridModel."""
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    finally:
        tokenizer.padding_side = side
    out = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **route,
    )
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


def exact_match(
    model: nn.Module,
    tokenizer: Any,
    examples: list[Example],
    *,
    system: str | None,
    max_new_tokens: int,
    batch_size: int,
    task_ids: list[int | None] | None = None,
) -> tuple[float, list[Generation]]:
    """Share of examples whose generated last assistant turn equals the reference (case, spacing
    and a final period ignored), with the generations."""
    was_training = model.training
    model.eval()
    items = []
    for ex in examples:
        messages = with_system(ex.messages, system)
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        question = next((m["content"] for m in reversed(messages[:last]) if m["role"] == "user"), "")
        items.append((question, render_prompt(tokenizer, messages[:last], ex.tools), messages[last]["content"]))
    generations = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        ids = (task_ids or [None])[start : start + batch_size]
        route = {"task_ids": ids} if ids and ids[0] is not None else {}
        outputs = generate_batch(model, tokenizer, [p for _, p, _ in chunk], max_new_tokens, **route)
        generations += [Generation(q, p, r, o) for (q, p, r), o in zip(chunk, outputs, strict=True)]
    model.train(was_training)
    accuracy = sum(g.correct for g in generations) / max(len(generations), 1)
    return accuracy, generations
