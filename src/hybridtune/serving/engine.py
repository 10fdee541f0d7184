"""One base model serving many adapter sets: a worker thread that schedules per decoding step.

Continuous batching: requests join and leave the running batch between steps. Each step the
worker (the only thread that touches the model) admits waiting requests up to ``max_batch`` and
prefills them together, at most ``prefill_chunk`` prompt tokens per step so a long prompt never
stalls the rows being decoded; then it runs one batched decoding step for every live row. Each row
has its own adapter set (``adapter_sets=``, hybrid sets with Adapters included), sampling settings,
stop strings and token budget; its KV cache is a row of one left-padded ``DynamicCache``
(ragged_cache.py). A row finished, stopped or cancelled (the client hung up) leaves at the next step.

Why not transformers' own continuous batching (``generate_batch`` / ``ContinuousBatchingManager``):
it schedules one model for every request, with no way to route a different adapter set per row.

Sets load on first use, between steps, and the least recently used set no live row needs is
unloaded when more than ``max_loaded`` are in memory. A set that fails to load is marked broken
(adapters_dir.py) and its requests fail at once, before any byte of a reply.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.adapter_io import saved_config
from ..core.kv_cache import cache_keyword, returned_cache
from ..core.model import HybridModel, add_saved_set
from . import decode_linear
from .adapters_dir import AdaptersDir, BrokenAdapter, UnknownAdapter
from .admission import choose_prefill
from .job import Job, deliver
from .prefix_cache import PrefixCache, seed_prefill, store_prefixes
from .ragged_cache import RaggedCache, splicable
from .sampling import Sampling, TokenLogprob, next_tokens, prompt_logprobs

log = logging.getLogger("hybridtune.serve")

__all__ = ["Engine", "Job", "Sampling"]


@dataclass
class _Prefill:
    jobs: list[Job]
    ids: torch.Tensor  # [rows, width], left-padded
    mask: torch.Tensor
    positions: torch.Tensor
    cache: Any
    done: int = 0  # columns already run
    reported: list[TokenLogprob] = field(default_factory=list)


class Engine:
    def __init__(
        self,
        base: torch.nn.Module,
        tokenizer: Any,
        adapters: AdaptersDir,
        *,
        max_loaded: int = 4,
        max_batch: int = 8,
        prefill_chunk: int = 512,
        prefix_cache_mb: float = 256,
        decode_product: str = "measured",
    ) -> None:
        """``decode_product``: how decoding steps' linear layers multiply (serving/decode_linear.py):
        ``measured`` (the product measured fastest here, per weight shape), ``weight_first`` or
        ``packed`` everywhere, or ``linear`` (F.linear, unchanged)."""
        self.base, self.tokenizer, self.adapters = base, tokenizer, adapters
        self.model: torch.nn.Module = base  # becomes a HybridModel when the first set loads
        self.max_loaded, self.max_batch, self.prefill_chunk = max(1, max_loaded), max(1, max_batch), prefill_chunk
        self.loaded: OrderedDict[str, str] = OrderedDict()  # adapter name -> internal set name, LRU order
        self.stats = {"steps": 0, "row_steps": 0, "prefills": 0, "requests": 0, "largest_batch": 0,
                      "cancelled": 0, "decode_product_layers": 0}  # fmt: skip
        self._ids = itertools.count()
        self._waiting: deque[Job] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self._live: list[Job] = []
        self._cache: RaggedCache | None = None
        self._prefill: _Prefill | None = None
        self._splicable: bool | None = None  # known after the first prefill
        self.prefixes = PrefixCache(int(prefix_cache_mb * 2**20))
        eos = getattr(base.generation_config, "eos_token_id", None) or tokenizer.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos])
        self.device = next(base.parameters()).device
        self._cache_keyword = cache_keyword(base)
        self._keeps_logits = "logits_to_keep" in inspect.signature(base.forward).parameters
        if decode_product not in ("measured", "linear", *decode_linear.PRODUCTS):
            raise ValueError(f"decode_product {decode_product!r}: expected measured, linear, weight_first or packed")
        self._thread = threading.Thread(target=self._run, args=(decode_product,), name="hybridtune-engine", daemon=True)
        self._started, self._start_error = threading.Event(), None
        self._thread.start()
        self._started.wait()  # the decoding products are chosen (and measured) in the worker itself
        if self._start_error is not None:
            raise RuntimeError("the engine's worker failed to start") from self._start_error

    def alive(self) -> bool:
        return self._thread.is_alive()

    def counters(self) -> dict[str, int]:
        """What /health reports: counters, and the rows running and waiting now."""
        return {**self.stats, **self.prefixes.stats, "live": len(self._live), "waiting": len(self._waiting)}

    def submit(self, job: Job) -> None:
        with self._wake:
            self._waiting.append(job)
            self._wake.notify()

    def cancel(self, job: Job) -> None:
        """Stop working on ``job`` at the next step (its client went away)."""
        job.cancelled = True

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            decode_linear.uninstall(self.base)

    # ---- the step loop ------------------------------------------------------------------------
    def _run(self, decode_product: str) -> None:
        """The worker: it chooses (and measures) the decoding products first, in this thread. A
        thread that runs torch's parallel CPU kernels gets OpenMP workers of its own: measuring in
        the constructor's thread (the HTTP server's) gave the process a second team on the same
        cores, and under load SmolLM2 served 66 tokens/s here instead of 100."""
        try:
            if decode_product != "linear":
                most_rows = min(self.max_batch, 32)
                layers = decode_linear.install(self.base, most_rows, decode_product == "measured", decode_product)
                self.stats["decode_product_layers"] = layers
        except Exception as exc:
            decode_linear.uninstall(self.base)
            self._start_error = exc
            return
        finally:
            self._started.set()
        while True:
            with self._wake:
                while not (self._waiting or self._live or self._prefill or self._closed):
                    self._wake.wait()
                if self._closed:
                    return
                candidates = self._take()
            touched = candidates + self._live + (self._prefill.jobs if self._prefill else [])
            try:
                with torch.inference_mode():
                    if candidates:
                        self._start_prefill(candidates)
                    if self._prefill is not None:
                        self._prefill_step()
                    if self._live:
                        self._decode_step()
            except Exception as exc:  # a failed step fails the rows it touched, never the server
                log.exception("generation failed")
                for job in touched:
                    if not job.done:
                        job.done = True
                        deliver(job, "error", exc)
                self._live, self._cache, self._prefill = [], None, None

    def _take(self) -> list[Job]:
        """Waiting jobs to prefill now (serving/admission.py): none while a prefill runs or the
        batch is full (or, for a model whose cache cannot be spliced, while any row is live)."""
        if self._prefill is not None or (self._live and not self._splicable):
            return []
        taken = choose_prefill(self._waiting, self.max_batch - len(self._live), self.prefill_chunk, self._to_compute)
        gone = sum(job.cancelled for job in self._waiting)
        if taken or gone:
            self.stats["cancelled"] += gone
            self._waiting = deque(j for j in self._waiting if not j.cancelled and all(j is not t for t in taken))
        return taken

    def _start_prefill(self, candidates: list[Job]) -> None:
        jobs = []
        for job in candidates:
            try:
                self._ensure_loaded(job.adapter, keep={j.adapter for j in self._live + jobs + [job]})
            except Exception as exc:  # a broken set fails its own requests, never the server
                log.warning("adapter set %r cannot be served: %s", job.adapter, exc)
                job.done = True
                job.send("error", exc)
                continue
            job.generator = job.sampling.generator(self.device)
            job.send("ready")
            jobs.append(job)
        if not jobs:
            return
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else next(iter(self.eos))
        width = max(len(j.prompt_ids) for j in jobs)
        ids = torch.full((len(jobs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for row, job in enumerate(jobs):
            ids[row, width - len(job.prompt_ids) :] = torch.tensor(job.prompt_ids)
            mask[row, width - len(job.prompt_ids) :] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        ids, mask, positions = ids.to(self.device), mask.to(self.device), positions.to(self.device)
        start, cache = 0, None
        if self._splicable and not jobs[0].echo_logprobs:  # echo needs every prompt position's logits
            start, cache = seed_prefill(self.prefixes, self._sets_of(jobs), [j.prompt_ids for j in jobs], width)
        self._prefill = _Prefill(jobs, ids, mask, positions, cache=cache, done=start)
        self.stats["prefills"] += 1
        self.stats["requests"] += len(jobs)

    def _prefill_step(self) -> None:
        prefill = self._prefill
        assert prefill is not None
        if all(j.cancelled for j in prefill.jobs):
            self.stats["cancelled"] += len(prefill.jobs)
            self._prefill = None
            return
        rows, width = prefill.ids.shape
        end = min(width, prefill.done + max(1, self.prefill_chunk // rows))
        echo = prefill.jobs[0].echo_logprobs
        logits, prefill.cache = self._forward(
            prefill.jobs,
            prefill.ids[:, prefill.done : end],
            prefill.mask[:, :end],
            prefill.positions[:, prefill.done : end],
            prefill.cache,
            every_position=echo,
        )
        if echo:  # one row, no padding: position i predicts token i + 1
            job = prefill.jobs[0]
            predicted = logits[0, : min(end, width - 1) - prefill.done]
            top = job.sampling.logprobs or 0
            prefill.reported += prompt_logprobs(predicted, job.prompt_ids[prefill.done :], top, prefill.done == 0)
        prefill.done = end
        if end < width:
            return
        self._prefill = None
        if echo:
            prefill.jobs[0].send("prompt", prefill.reported)
        open_rows = []
        for row, job in enumerate(prefill.jobs):
            if job.max_tokens == 0:
                self._close(job, "length")
            else:
                open_rows.append(row)
        if not open_rows:
            return
        jobs = [prefill.jobs[row] for row in open_rows]
        self._advance(jobs, logits[open_rows, -1])
        if self._splicable is None:
            self._splicable = splicable(prefill.cache)
        if self._splicable:
            store_prefixes(self.prefixes, self._sets_of(prefill.jobs), [j.prompt_ids for j in prefill.jobs], width,
                           prefill.cache)  # fmt: skip
        joined = RaggedCache(prefill.cache, prefill.mask)
        if self._splicable:
            joined.keep(open_rows)
            if self._cache is None:
                self._cache = joined
            else:
                self._cache.join(joined)
            self._live += jobs
            self._drop_finished()
        else:  # rows stay in place until the whole batch is done (the cache cannot be spliced)
            self._cache, self._live = joined, list(prefill.jobs)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(self._live))

    def _decode_step(self) -> None:
        self._drop_finished()
        if not self._live:
            return
        assert self._cache is not None
        pad = next(iter(self.eos))
        tokens = [[j.next_token if j.next_token is not None else pad] for j in self._live]
        positions = self._cache.positions()
        mask = self._cache.grow()
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)
        logits, _ = self._forward(self._live, ids, mask, positions, self._cache.cache)
        self.stats["steps"] += 1
        self.stats["row_steps"] += len(self._live)
        open_jobs = [j for j in self._live if not j.done and not j.cancelled]
        rows = [i for i, j in enumerate(self._live) if not j.done and not j.cancelled]
        self._advance(open_jobs, logits[rows, -1])
        self._drop_finished()

    def _drop_finished(self) -> None:
        if not self._live:
            return
        keep = [i for i, j in enumerate(self._live) if not (j.done or j.cancelled)]
        if len(keep) == len(self._live) or (keep and not self._splicable):
            return  # (rows of a cache that cannot be spliced stay in place until the whole batch is done)
        kept = set(keep)
        self.stats["cancelled"] += sum(j.cancelled and not j.done for i, j in enumerate(self._live) if i not in kept)
        if not keep:
            self._live, self._cache = [], None
        else:
            assert self._cache is not None
            self._cache.keep(keep)
            self._live = [self._live[i] for i in keep]

    def _to_compute(self, job: Job) -> int:
        """The prompt tokens a job leaves to prefill: less the prefix held for its set (if loaded)."""
        internal = self._set_of(job)
        if job.echo_logprobs or (job.adapter and internal is None) or not self._splicable:
            return len(job.prompt_ids)
        return len(job.prompt_ids) - self.prefixes.longest(internal, job.prompt_ids, use=False)[0]

    def _set_of(self, job: Job) -> str | None:
        """The job's internal set name (None: the base model, or its set is not loaded)."""
        return self.loaded.get(job.adapter) if job.adapter else None

    def _sets_of(self, jobs: list[Job]) -> list[str | None]:
        return [self._set_of(j) for j in jobs]

    def _forward(self, jobs: list[Job], ids, mask, positions, cache, every_position: bool = False):
        """One model call over ``jobs``'s rows; returns (logits, the cache it filled)."""
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
                                  "use_cache": True, self._cache_keyword: cache}  # fmt: skip
        if self._keeps_logits:
            kwargs["logits_to_keep"] = 0 if every_position else 1
        if isinstance(self.model, HybridModel):
            kwargs["adapter_sets"] = self._sets_of(jobs)
        output = self.model(**kwargs)
        return output.logits, returned_cache(output)

    # ---- adapter sets -------------------------------------------------------------------------
    def _ensure_loaded(self, adapter: str | None, keep: set[str | None]) -> None:
        if adapter is None:
            return
        if adapter in self.loaded:
            self.loaded.move_to_end(adapter)
            return
        directory = self.adapters.resolve(adapter)  # UnknownAdapter / BrokenAdapter
        internal = f"set{next(self._ids)}"
        try:
            entries = saved_config(directory).methods
            unroutable = [f"'{e}' ({c.type})" for e, c in entries.items() if not c.supports_routing]
            if unroutable:
                raise ValueError(f"entry {', '.join(unroutable)} cannot serve a different set per row in one batch; "
                                 "merge it into a base model and serve that instead")  # fmt: skip
            self.model = add_saved_set(self.model, internal, directory)
        except UnknownAdapter:
            raise
        except Exception as exc:
            reason = self.adapters.mark_broken(adapter, str(exc))
            raise BrokenAdapter(f"adapter set '{adapter}' cannot be served: {reason}") from None
        self.loaded[adapter] = internal
        log.info("loaded adapter set %r", adapter)
        for name in list(self.loaded):
            if len(self.loaded) <= self.max_loaded:
                break
            if name not in keep:
                internal = self.loaded.pop(name)
                self.model.delete_set(internal)
                self.prefixes.drop_set(internal)
                log.info("unloaded adapter set %r (least recently used)", name)

    # ---- per-row progress ---------------------------------------------------------------------
    def _advance(self, jobs: list[Job], logits: torch.Tensor) -> None:
        """Choose each job's next token from its row of ``logits`` and record it."""
        tokens, reports = next_tokens(
            logits, [j.sampling for j in jobs], [j.generated for j in jobs], [j.generator for j in jobs]
        )
        for job, token, report in zip(jobs, tokens, reports, strict=True):
            job.next_token = token
            if token in self.eos:
                self._close(job, "stop")
                continue
            job.generated.append(token)
            start = len(job.text)
            job.text = job.decoded(self.tokenizer)
            if len(job.text) < start:  # a character completed: its bytes' U+FFFDs became one character
                start = len(job.text)
                job.unsent_logprobs = [(r, min(s, start), min(e, start)) for r, s, e in job.unsent_logprobs]
            if report is not None:
                job.unsent_logprobs.append((report, start, len(job.text)))
            cut = min((job.text.find(s) for s in job.stop if s in job.text), default=-1)
            if cut >= 0:
                job.cut(cut)
                self._close(job, "stop")
            elif len(job.generated) >= job.max_tokens:
                self._close(job, "length")
            else:
                job.flush(final=False)

    def _close(self, job: Job, reason: str) -> None:
        job.flush(final=True)
        job.done = True
        job.send("end", reason, len(job.generated))
