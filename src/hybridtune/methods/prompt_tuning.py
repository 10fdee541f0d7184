"""Prompt tuning: ``num_virtual_tokens`` learned embeddings prepended to every input sequence.

It works through the base model's own call, so ``generate`` and the KV cache work unchanged: a
pre-hook on the model turns ``input_ids`` into ``inputs_embeds`` with the prompt in front and
extends ``attention_mask``, ``labels`` (with -100) and ``position_ids``/``cache_position`` by the
prompt length on the first call of a sequence; later cached steps only shift positions and the
mask. A post-hook drops the prompt positions from the returned logits, so outputs keep the
caller's sequence length. Not the identity at init (the prompt is there from the start), not
mergeable, and one prompt for the whole batch (no per-row adapter sets).
"""

from __future__ import annotations

import contextvars
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from ..core.partitioned import full_shape, gathered
from .base import Branch, MethodConfig
from .virtual_tokens import call_batch, is_first_call, prefix_positions, shift_for_leading_tokens

# Between the pre-hook and the post-hook of one call: the sequence length whose logits lose the
# prompt positions. Per context (thread / asyncio task), so concurrent calls never mix it up.
_STRIP: contextvars.ContextVar[dict[int, int | None]] = contextvars.ContextVar("hybridtune_prompt_strip")


def _set_strip(branch: nn.Module, value: int | None) -> int | None:
    """Store ``value`` for this branch in the current context; return the previous one."""
    state = _STRIP.get(None)
    if state is None:
        state = {}
        _STRIP.set(state)
    previous = state.pop(id(branch), None)
    if value is not None:
        state[id(branch)] = value
    return previous


class PromptTuningConfig(MethodConfig):
    type: Literal["prompt_tuning"] = "prompt_tuning"
    identity_at_init: ClassVar[bool] = False
    supports_routing: ClassVar[bool] = False
    supports_packing: ClassVar[bool] = False  # one set of virtual tokens per row, not per packed example

    num_virtual_tokens: int = Field(20, ge=1)
    init: Literal["vocab", "random"] = "vocab"  # vocab: copies of random existing token embeddings

    @classmethod
    def example(cls) -> PromptTuningConfig:
        return cls(num_virtual_tokens=4)

    def select_targets(self, model: nn.Module, entry: str) -> list[tuple[str, nn.Module]]:
        if not callable(getattr(model, "get_input_embeddings", None)) or model.get_input_embeddings() is None:
            raise ValueError(f"entry '{entry}': prompt tuning needs a model with get_input_embeddings()")
        return [("", model)]

    def build_branch(self, entry: str, name: str, module: nn.Module, model: nn.Module) -> PromptTuningBranch:
        embeddings = model.get_input_embeddings().weight
        vocab, width = full_shape(embeddings)
        if self.init == "vocab":
            picks = torch.randint(0, vocab, (self.num_virtual_tokens,))
            with gathered([embeddings]):  # ZeRO-3: partitioned outside a forward
                initial = embeddings.detach()[picks].clone()
        else:
            initial = torch.randn(self.num_virtual_tokens, width, dtype=embeddings.dtype) * 0.02
        return PromptTuningBranch(model, initial.to(embeddings.device))


class PromptTuningBranch(Branch):
    modifies_input: ClassVar[bool] = True

    def __init__(self, model: nn.Module, initial: torch.Tensor) -> None:
        super().__init__()
        self.__dict__["model"] = model  # a reference: the branch lives inside this model
        self.prompt = nn.Parameter(initial)

    @property
    def n(self) -> int:
        return self.prompt.shape[0]

    def pre(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs = dict(kwargs)
        if args:  # a causal LM's first positional argument is input_ids
            kwargs["input_ids"], args = args[0], args[1:]
        first = is_first_call(kwargs)
        batch, n = call_batch(kwargs), self.n
        shift_for_leading_tokens(kwargs, n, batch, new_positions=first, start=prefix_positions(kwargs))
        if not first:
            _set_strip(self, None)
            return args, kwargs
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = self.model.get_input_embeddings()(kwargs.pop("input_ids"))
        else:
            kwargs.pop("input_ids", None)
        prompt = self.prompt.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        kwargs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)
        labels = kwargs.get("labels")
        if labels is not None:
            kwargs["labels"] = torch.cat([labels.new_full((batch, n), -100), labels], dim=1)
        _set_strip(self, embeds.shape[1] + n)
        return args, kwargs

    def forward(self, args: tuple, kwargs: dict, output: Any) -> Any:
        strip = _set_strip(self, None)
        if strip is None:
            return output
        logits = getattr(output, "logits", None)
        if logits is not None and logits.shape[1] == strip:
            output.logits = logits[:, self.n :]
        hidden = getattr(output, "hidden_states", None)
        if hidden is not None:
            output.hidden_states = tuple(h[:, self.n :] if h.shape[1] == strip else h for h in hidden)
        return output

    def routed_pre(self, args: tuple, kwargs: dict, rows: torch.Tensor) -> tuple[tuple, dict]:
        raise NotImplementedError("prompt tuning prepends one prompt to the whole batch; it cannot serve per-row sets")

    def routed(self, args: tuple, kwargs: dict, output: Any, rows: torch.Tensor) -> Any:
        raise NotImplementedError("prompt tuning prepends one prompt to the whole batch; it cannot serve per-row sets")
