"""Replies in OpenAI's shapes: whole responses, streamed chunks, and the two logprobs layouts
(chat's ``content`` list of token objects; completions' parallel ``tokens`` / ``token_logprobs`` /
``top_logprobs`` / ``text_offset`` lists)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .sampling import TokenLogprob
from .token_text import token_text


@dataclass
class Choice:
    """What the engine produced for one choice so far."""

    index: int
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0


class Replies:
    """Formats one request's choices for ``kind`` "chat" or "completion"."""

    def __init__(self, tokenizer: Any, kind: str, ident: str, created: int, model: str, top: int | None) -> None:
        self.tokenizer, self.kind, self.ident, self.created, self.model, self.top = (
            tokenizer, kind, ident, created, model, top)  # fmt: skip
        self.text = token_text(tokenizer)
        self.echoed = False  # completions with echo and logprobs: the logprobs begin with the prompt's

    def piece(self, token: int) -> str:
        return self.text.text_of(token)

    # ---- logprobs -----------------------------------------------------------------------------
    def logprobs(self, items: list[TokenLogprob], offset: int = 0, starts_text: bool = False) -> dict[str, Any] | None:
        """The logprobs object for ``items`` (None when the request asked for none); completions'
        ``text_offset`` counts from ``offset``, the characters of the choice's text before them
        (``starts_text``: the items are the echoed prompt's, from the start of the text)."""
        if self.top is None:
            return None
        if self.kind == "chat":
            return {"content": [self._chat_item(i) for i in items], "refusal": None}
        return {
            "tokens": [self.piece(i.token) for i in items],
            "token_logprobs": [i.logprob for i in items],
            "top_logprobs": [None if i.logprob is None else {self.piece(t): lp for t, lp in i.top} for i in items],
            "text_offset": self.text.offsets([i.token for i in items], offset, starts_text),
        }

    def _chat_item(self, item: TokenLogprob) -> dict[str, Any]:
        def one(token: int, logprob: float) -> dict[str, Any]:
            return {"token": self.piece(token), "logprob": logprob, "bytes": list(self.text.bytes_of(token))}

        return {**one(item.token, item.logprob), "top_logprobs": [one(t, lp) for t, lp in item.top]}

    # ---- whole responses ----------------------------------------------------------------------
    def response(self, choices: list[Choice], prompt_tokens: int) -> dict[str, Any]:
        out = []
        for choice in sorted(choices, key=lambda c: c.index):
            body: dict[str, Any] = {"index": choice.index, "finish_reason": choice.finish_reason,
                                    "logprobs": self.logprobs(choice.logprobs, starts_text=self.echoed)}  # fmt: skip
            if self.kind == "chat":
                body["message"] = {"role": "assistant", "content": choice.text, "refusal": None}
            else:
                body["text"] = choice.text
            out.append(body)
        return {"id": self.ident, "object": "chat.completion" if self.kind == "chat" else "text_completion",
                "created": self.created, "model": self.model, "choices": out,
                "usage": self.usage(choices, prompt_tokens)}  # fmt: skip

    @staticmethod
    def usage(choices: list[Choice], prompt_tokens: int) -> dict[str, int]:
        completion = sum(c.completion_tokens for c in choices)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}  # fmt: skip

    # ---- streamed chunks ----------------------------------------------------------------------
    def chunk(self, index: int, delta: str | None, reason: str | None, items: list[TokenLogprob] | None = None, *,
              first: bool = False, offset: int = 0, usage: bool = False, starts_text: bool = False) -> str:  # fmt: skip
        if self.kind == "chat":
            body: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if delta is not None:
                body["content"] = delta
            choice: dict[str, Any] = {"index": index, "delta": body}
        else:
            choice = {"index": index, "text": delta or ""}
        choice["logprobs"] = self.logprobs(items, offset, starts_text) if items else None
        choice["finish_reason"] = reason
        payload: dict[str, Any] = {"id": self.ident, "object": self._chunk_object(), "created": self.created,
                                   "model": self.model, "choices": [choice]}  # fmt: skip
        if usage:
            payload["usage"] = None
        return f"data: {json.dumps(payload)}\n\n"

    def usage_chunk(self, choices: list[Choice], prompt_tokens: int) -> str:
        payload = {"id": self.ident, "object": self._chunk_object(), "created": self.created, "model": self.model,
                   "choices": [], "usage": self.usage(choices, prompt_tokens)}  # fmt: skip
        return f"data: {json.dumps(payload)}\n\n"

    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.kind == "chat" else "text_completion"
