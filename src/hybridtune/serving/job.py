"""One completion being served: what was asked, what was generated, and how its text reaches the
client — decoded incrementally, cut at stop strings, and streamed with each token's logprob only
once the text it completes is sent."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .sampling import Sampling, TokenLogprob

log = logging.getLogger("hybridtune.serve")


@dataclass(eq=False)
class Job:
    """``send(kind, *data)`` is called from the engine's worker with: ``ready`` (admitted, its set
    loaded), ``prompt`` (echoed prompt logprobs), ``text`` (a delta and its tokens' logprobs),
    ``end`` (finish reason, completion tokens) or ``error`` (an exception)."""

    adapter: str | None  # set name in the adapters directory; None: the base model
    prompt_ids: list[int]
    max_tokens: int
    sampling: Sampling
    stop: list[str]
    send: Callable[..., None]
    echo_logprobs: bool = False  # also report the prompt tokens' logprobs
    cancelled: bool = False  # set by the server when the client went away
    generated: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of ``text`` already sent
    unsent_logprobs: list[tuple[TokenLogprob, int, int]] = field(default_factory=list)  # (report, text start, end)
    done: bool = False
    skipped: int = 0  # prefills that went ahead of it (serving/admission.py)
    next_token: int | None = None  # sampled, not yet in the cache
    generator: torch.Generator | None = None

    def decoded(self, tokenizer: Any) -> str:
        """The text of the tokens generated so far, decoded after the prompt's last token: a
        SentencePiece tokenizer strips the space of a text's first word (``▁world`` alone is
        "world"), which a reply that continues its prompt keeps (as vLLM's does)."""
        context = self.prompt_ids[-1:]
        before = tokenizer.decode(context, skip_special_tokens=True)
        full = tokenizer.decode(context + self.generated, skip_special_tokens=True)
        if full.startswith(before):
            return full[len(before) :]
        return tokenizer.decode(self.generated, skip_special_tokens=True)

    def cut(self, cut: int) -> None:
        """End the text before a stop string; logprobs of tokens that start inside it are not sent."""
        self.text = self.text[:cut]
        self.unsent_logprobs = [item for item in self.unsent_logprobs if item[1] < cut]

    def flush(self, final: bool) -> None:
        """Send the text not sent yet, with the logprobs of the tokens it completes; mid-stream,
        hold back what may still become a stop string or is an incomplete multi-byte character."""
        end = len(self.text)
        if not final:
            hold = max((len(s) - 1 for s in self.stop), default=0)
            end = max(self.sent, end - hold)
            while end > self.sent and self.text[end - 1] == "\ufffd":
                end -= 1
        ready = list(itertools.takewhile(lambda item: final or item[2] <= end, self.unsent_logprobs))
        if end > self.sent or ready:
            self.send("text", self.text[self.sent : end], [item[0] for item in ready])
            self.sent = end
            self.unsent_logprobs = self.unsent_logprobs[len(ready) :]


def deliver(job: Job, *event: Any) -> None:
    """An event for a job whose request may be gone (its event loop closed): never fatal to the worker."""
    try:
        job.send(*event)
    except Exception:
        log.exception("could not deliver a job's %s event", event[0])
