"""One base model serving many adapter sets: a worker thread that batches concurrent requests.

Only the worker touches the model. It takes whatever requests are waiting (up to a batch size),
groups them by sampling settings, and runs one ``generate`` per group with a per-row adapter set
(``adapter_sets=``: rows of different sets share every forward pass). Sets load on first use,
between batches, and the least recently used one is unloaded when more than ``max_loaded`` are
in memory; a running batch is never changed under it.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ..core.model import HybridModel, add_saved_set
from .adapters_dir import AdaptersDir

log = logging.getLogger("hybridtune.serve")


@dataclass
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Request:
    """One completion. ``emit(text_delta)`` and ``finish(reason)`` are called from the worker."""

    adapter: str | None  # set name in the adapters directory; None: the base model
    prompt_ids: list[int]
    max_tokens: int
    sampling: Sampling
    stop: list[str]
    emit: Callable[[str], None]
    finish: Callable[[str, int], None]  # (finish_reason, completion_tokens)
    fail: Callable[[Exception], None]
    generated: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of ``text`` already emitted
    done: bool = False


class Engine:
    def __init__(
        self,
        base: torch.nn.Module,
        tokenizer: Any,
        adapters: AdaptersDir,
        *,
        max_loaded: int = 4,
        max_batch: int = 8,
        batch_wait_s: float = 0.005,
    ) -> None:
        self.base, self.tokenizer, self.adapters = base, tokenizer, adapters
        self.model: torch.nn.Module = base  # becomes a HybridModel when the first set loads
        self.max_loaded, self.max_batch, self.batch_wait_s = max(1, max_loaded), max_batch, batch_wait_s
        self.loaded: OrderedDict[str, str] = OrderedDict()  # adapter name -> internal set name, LRU order
        self.stats = {"batches": 0, "requests": 0, "largest_batch": 0}
        self._ids = itertools.count()
        self._queue: queue.Queue[Request | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="hybridtune-engine", daemon=True)
        eos = getattr(base.generation_config, "eos_token_id", None) or tokenizer.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos])
        self.device = next(base.parameters()).device
        self._thread.start()

    def submit(self, request: Request) -> None:
        self._queue.put(request)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    # ---- worker -------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + self.batch_wait_s
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)
                    break
                batch.append(item)
            groups: dict[tuple, list[Request]] = {}
            for request in batch:
                key = (request.sampling.temperature, request.sampling.top_p)
                groups.setdefault(key, []).append(request)
            for group in groups.values():
                self._serve(group)

    def _serve(self, group: list[Request]) -> None:
        ready = []
        for request in group:
            try:
                self._ensure_loaded(request.adapter, keep={r.adapter for r in group})
                ready.append(request)
            except Exception as exc:  # a broken set fails its own requests, never the server
                log.warning("loading adapter set %r failed: %s", request.adapter, exc)
                request.fail(exc)
        if not ready:
            return
        self.stats["batches"] += 1
        self.stats["requests"] += len(ready)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(ready))
        try:
            with torch.inference_mode():
                self._generate(ready)
        except Exception as exc:
            log.exception("generation failed")
            for request in ready:
                if not request.done:
                    request.fail(exc)

    def _ensure_loaded(self, adapter: str | None, keep: set[str | None]) -> None:
        if adapter is None:
            return
        if adapter in self.loaded:
            self.loaded.move_to_end(adapter)
            return
        directory = self.adapters.resolve(adapter)
        internal = f"set{next(self._ids)}"
        self.model = add_saved_set(self.model, internal, directory)
        self.loaded[adapter] = internal
        log.info("loaded adapter set %r", adapter)
        for name in list(self.loaded):
            if len(self.loaded) <= self.max_loaded:
                break
            if name not in keep:
                self.model.delete_set(self.loaded.pop(name))
                log.info("unloaded adapter set %r (least recently used)", name)

    def _generate(self, requests: list[Request]) -> None:
        pad = self.tokenizer.pad_token_id
        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.full((len(requests), width), pad, dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for i, r in enumerate(requests):  # left padding: every row's next token is at the end
            ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids) :] = 1
        sampling = requests[0].sampling
        route = {}
        if isinstance(self.model, HybridModel):
            route["adapter_sets"] = [self.loaded.get(r.adapter) if r.adapter else None for r in requests]
        self.model.generate(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            max_new_tokens=max(r.max_tokens for r in requests),
            do_sample=not sampling.greedy,
            **({} if sampling.greedy else {"temperature": sampling.temperature, "top_p": sampling.top_p}),
            pad_token_id=pad,
            stopping_criteria=StoppingCriteriaList([_Rows(self, requests)]),
            **route,
        )
        for request in requests:  # rows still open when generate returned ran out of tokens
            if not request.done:
                self._close(request, "length")

    # ---- per-row progress (called by generate at every step) ----------------------------------
    def _step(self, requests: list[Request], new_tokens: torch.Tensor) -> torch.Tensor:
        for request, token in zip(requests, new_tokens.tolist(), strict=True):
            if request.done:
                continue
            if token in self.eos:
                self._close(request, "stop")
                continue
            request.generated.append(token)
            request.text = self.tokenizer.decode(request.generated, skip_special_tokens=True)
            cut = min((request.text.find(s) for s in request.stop if s in request.text), default=-1)
            if cut >= 0:
                request.text = request.text[:cut]
                self._close(request, "stop")
            elif len(request.generated) >= request.max_tokens:
                self._close(request, "length")
            else:
                self._flush(request, final=False)
        return torch.tensor([r.done for r in requests], device=new_tokens.device)

    def _flush(self, request: Request, final: bool) -> None:
        """Send the text not sent yet; mid-stream, hold back what may still become a stop string
        or is an incomplete multi-byte character."""
        end = len(request.text)
        if not final:
            hold = max((len(s) - 1 for s in request.stop), default=0)
            end = max(request.sent, end - hold)
            while end > request.sent and request.text[end - 1] == "\ufffd":
                end -= 1
        if end > request.sent:
            request.emit(request.text[request.sent : end])
            request.sent = end

    def _close(self, request: Request, reason: str) -> None:
        self._flush(request, final=True)
        request.done = True
        request.finish(reason, len(request.generated))


class _Rows(StoppingCriteria):
    """Feeds each step's new tokens to the engine and stops rows that are finished."""

    def __init__(self, engine: Engine, requests: list[Request]) -> None:
        self.engine, self.requests = engine, requests

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return self.engine._step(self.requests, input_ids[:, -1])
