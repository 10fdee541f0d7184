"""The OpenAI-compatible HTTP API: /v1/chat/completions, /v1/completions, /v1/models, /health.

``model`` names an adapter set of the adapters directory, or the base model. Errors are
OpenAI-style JSON (``{"error": {"message", "type", "param", "code"}}``) with the matching status,
for every client input, and never stop the server. A request waits until each of its choices is
admitted (its adapter set loaded) before the first byte of a reply, so a set that cannot be
served is a JSON error even for a streamed request. A client that hangs up has its rows dropped
from the running batch at the next decoding step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from ..training.data import render_prompt
from .adapters_dir import BrokenAdapter, UnknownAdapter
from .engine import Engine, Job, Sampling
from .openai_params import ChatParams, CompletionParams, _Params
from .openai_replies import Choice, Replies

log = logging.getLogger("hybridtune.serve")


@dataclass
class Limits:
    max_tokens: int = 512  # per request
    max_prompt_tokens: int = 4096
    max_request_bytes: int = 1_000_000


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


def create_app(engine: Engine, *, base_name: str, api_key: str | None = None, limits: Limits | None = None) -> FastAPI:
    limits = limits or Limits()
    app = FastAPI(title="hybridtune", docs_url=None, redoc_url=None)
    vocab = engine.base.get_input_embeddings().num_embeddings

    app.add_middleware(_Guard, api_key=api_key, max_bytes=limits.max_request_bytes)

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return APIError(500, f"internal error ({type(exc).__name__})", "server_error").response()

    @app.get("/health")
    async def health() -> JSONResponse:
        alive = engine.alive()
        body = {"status": "ok" if alive else "engine stopped", "base": base_name, "loaded": list(engine.loaded),
                **engine.counters()}  # fmt: skip
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        names = [base_name, *engine.adapters.names()]
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "hybridtune"}
                                           for n in names]}  # fmt: skip

    async def read(request: Request, schema: type[_Params]) -> Any:
        body = bytearray()
        async for piece in request.stream():  # a chunked upload stops being read at the limit
            body += piece
            if len(body) > limits.max_request_bytes:
                raise APIError(413, f"request body over {limits.max_request_bytes} bytes")
        try:
            raw = json.loads(body)
        except (ValueError, RecursionError) as exc:
            reason = "it is nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            raise APIError(400, f"the request body is not valid JSON: {reason}") from None
        if not isinstance(raw, dict):
            raise APIError(400, "the request body must be a JSON object")
        try:
            return schema.model_validate(raw)
        except ValidationError as exc:
            raise _invalid(exc) from None

    def adapter_of(model: str) -> str | None:
        if model == base_name:
            return None
        try:
            engine.adapters.resolve(model)
        except UnknownAdapter as exc:
            raise _not_found(exc) from None
        except BrokenAdapter as exc:
            raise _unavailable(exc) from None
        return model

    def budget(params: _Params, prompts: list[list[int]], default: int) -> int:
        by_new_name = getattr(params, "max_completion_tokens", None) is not None
        asked = params.max_completion_tokens if by_new_name else params.max_tokens
        name = "max_completion_tokens" if by_new_name else "max_tokens"
        longest = max(len(p) for p in prompts)
        context = getattr(engine.base.config, "max_position_embeddings", None) or longest + limits.max_tokens + 1
        room = min(limits.max_prompt_tokens, context - 1)  # the prompt leaves room for one token at least
        if longest > room:
            raise APIError(400, f"the prompt is {longest} tokens; this server takes at most {room} "
                           f"(limit {limits.max_prompt_tokens}, model context {context})",
                           param="messages" if isinstance(params, ChatParams) else "prompt",
                           code="context_length_exceeded")  # fmt: skip
        if asked is None:
            return min(default, limits.max_tokens, context - longest)
        if asked > limits.max_tokens:
            raise APIError(400, f"{name} {asked} is over this server's limit of {limits.max_tokens}", param=name)
        if longest + asked > context:
            raise APIError(400, f"prompt ({longest} tokens) + {name} ({asked}) is over the model's context of "
                           f"{context}", param=name, code="context_length_exceeded")  # fmt: skip
        return asked

    async def run(request: Request, params: _Params, adapter: str | None, prompts: list[list[int]], kind: str,
                  default_tokens: int, echo: list[str] | None = None):  # fmt: skip
        outside = next((t for t in params.biases() if t >= vocab), None)
        if outside is not None:
            raise APIError(400, f"logit_bias: token {outside} is outside the vocabulary (0..{vocab - 1})",
                           param="logit_bias")  # fmt: skip
        max_tokens = budget(params, prompts, default_tokens)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        jobs = []
        for p, prompt in enumerate(prompts):
            for c in range(params.n):
                index = p * params.n + c
                sampling = Sampling(
                    temperature=params.temperature, top_p=params.top_p,
                    seed=None if params.seed is None else params.seed + c,
                    presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
                    logit_bias=params.biases(), logprobs=params.top(),
                )  # fmt: skip

                def send(*event: Any, index: int = index) -> None:
                    loop.call_soon_threadsafe(events.put_nowait, (index, *event))

                jobs.append(Job(adapter, prompt, max_tokens, sampling, params.stops(), send,
                                echo_logprobs=echo is not None and params.top() is not None))  # fmt: skip
        for job in jobs:
            engine.submit(job)
        replies = Replies(engine.tokenizer, kind, f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}",
                          int(time.time()), params.model, params.top())  # fmt: skip
        replies.echoed = echo is not None and params.top() is not None
        prompt_tokens = sum(len(p) for p in prompts)
        choices = [Choice(i, text=echo[i // params.n] if echo else "") for i in range(len(jobs))]
        watcher = asyncio.create_task(_watch(request, engine, jobs, events))
        try:
            early = await _admitted(events, len(jobs))
            if params.stream:  # from here on the streaming response notices a client that leaves
                watcher.cancel()
                usage = params.stream_options is not None and params.stream_options.include_usage
                body = _stream(engine, jobs, events, early, replies, choices, prompt_tokens, usage)
                return StreamingResponse(body, media_type="text/event-stream")
            ended = 0
            while ended < len(jobs):
                event = early.pop(0) if early else _checked(await events.get())
                ended += event[1] == "end"
                _apply(choices, event)
        finally:
            watcher.cancel()
            if not params.stream:
                _cancel(engine, jobs)
        return replies.response(choices, prompt_tokens)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        params: ChatParams = await read(request, ChatParams)
        adapter = adapter_of(params.model)
        messages = [m.for_template() for m in params.messages]
        try:  # a set trained with its own data.template is asked in that template
            template = None if adapter is None else engine.adapters.template(adapter)
            ids = chat_prompt_ids(engine.tokenizer, messages, template)
        except Exception as exc:  # a model without a chat template, or a template that refuses the roles
            raise APIError(400, f"the model cannot render these messages: {type(exc).__name__}: {exc}",
                           param="messages") from None  # fmt: skip
        return await run(request, params, adapter, [list(ids)], "chat", limits.max_tokens)

    @app.post("/v1/completions")
    async def completions(request: Request):
        params: CompletionParams = await read(request, CompletionParams)
        adapter = adapter_of(params.model)
        raw = params.prompt
        if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
            raw = [raw]
        prompts = []
        for number, prompt in enumerate(raw):
            ids = engine.tokenizer(prompt, add_special_tokens=False)["input_ids"] if isinstance(prompt, str) else prompt
            if not ids:
                raise APIError(400, f"prompt {number} is empty", param="prompt")
            if any(not 0 <= t < vocab for t in ids):
                raise APIError(400, f"prompt {number} holds token ids outside the vocabulary (0..{vocab - 1})",
                               param="prompt")  # fmt: skip
            prompts.append(list(ids))
        echo = None
        if params.echo:
            echo = [p if isinstance(p, str) else engine.tokenizer.decode(p) for p in raw]
        return await run(request, params, adapter, prompts, "completion", 16, echo)  # OpenAI's default: 16 tokens

    return app


# ---- the events of a request's jobs ------------------------------------------------------------
async def _admitted(events: asyncio.Queue, count: int) -> list[tuple]:
    """Wait until every one of the request's ``count`` jobs is admitted; the events that came
    meanwhile. A job that failed to start (its set cannot be served) is the request's error,
    before any byte of a reply."""
    waiting, early = set(range(count)), []
    while waiting:
        event = _checked(await events.get())
        if event[1] == "ready":
            waiting.discard(event[0])
        else:
            early.append(event)
    return early


def _checked(event: tuple) -> tuple:
    """``event``, or the request's error when it is one (a job failed, the client went away)."""
    if event[1] == "error":
        raise _failure(event[2])
    if event[1] == "gone":
        raise APIError(499, "the client closed the request")
    return event


async def _watch(request: Request, engine: Engine, jobs: list[Job], events: asyncio.Queue) -> None:
    """Every 0.1 s, whether events flow or not: a client that hung up cancels the jobs, and the
    request stops waiting for them."""
    while True:
        await asyncio.sleep(0.1)
        if await request.is_disconnected():
            _cancel(engine, jobs)
            events.put_nowait((-1, "gone"))
            return


def _apply(choices: list[Choice], event: tuple) -> None:
    index, kind, *data = event
    choice = choices[index]
    if kind == "prompt":
        choice.logprobs = list(data[0]) + choice.logprobs
    elif kind == "text":
        choice.text += data[0]
        choice.logprobs += data[1]
    elif kind == "end":
        choice.finish_reason, choice.completion_tokens = data


async def _stream(engine: Engine, jobs: list[Job], events: asyncio.Queue, early: list[tuple], replies: Replies,
                  choices: list[Choice], prompt_tokens: int, usage: bool) -> AsyncIterator[str]:  # fmt: skip
    """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``; the jobs are
    cancelled when the client goes away (the generator is closed)."""
    sent = [0] * len(choices)  # characters of each choice's text streamed so far
    try:
        echo_scored = any(job.echo_logprobs for job in jobs)  # the prompt comes with its logprobs (a "prompt" event)
        for choice in choices:
            if replies.kind == "chat":
                yield replies.chunk(choice.index, None, None, first=True, usage=usage)
            elif choice.text:  # echo: the prompt first
                if not echo_scored:
                    yield replies.chunk(choice.index, choice.text, None, usage=usage)
                sent[choice.index] = len(choice.text)
        pending, ended = list(early), 0
        while ended < len(jobs):
            event = pending.pop(0) if pending else await events.get()
            index, kind, *data = event
            if kind == "error":
                message = f"generation failed: {type(data[0]).__name__}"
                yield f"data: {json.dumps({'error': {'message': message, 'type': 'server_error'}})}\n\n"
                usage = False  # the counts of a failed request mean nothing
                break
            if kind == "prompt":
                text = choices[index].text
                yield replies.chunk(index, text, None, list(data[0]), usage=usage, starts_text=True)
            elif kind == "text":
                yield replies.chunk(index, data[0], None, data[1], offset=sent[index], usage=usage)
                sent[index] += len(data[0])
            elif kind == "end":
                ended += 1
                _apply(choices, event)
                yield replies.chunk(index, None if replies.kind == "chat" else "", data[0], usage=usage)
        if usage:
            yield replies.usage_chunk(choices, prompt_tokens)
        yield "data: [DONE]\n\n"
    finally:
        _cancel(engine, jobs)


def _cancel(engine: Engine, jobs: list[Job]) -> None:
    for job in jobs:
        if not job.done:
            engine.cancel(job)


# ---- errors ------------------------------------------------------------------------------------
def _invalid(exc: ValidationError) -> APIError:
    """pydantic's complaint as one OpenAI error: the first problem of each parameter, unknown
    parameters named as OpenAI names them. A rule over several parameters says which one it is
    about first ("top_logprobs: needs logprobs ..."): that is the error's ``param``."""
    seen, problems, first = set(), [], None
    for err in exc.errors():
        loc = [str(x) for x in err["loc"]]
        message = err["msg"].removeprefix("Value error, ")
        if not loc and (named := _NAMED.match(message)):
            loc = [named.group(1)]
            message = message[named.end() :]
        top = loc[0] if loc else ""
        if top in seen:
            continue
        seen.add(top)
        if err["type"] == "extra_forbidden" and len(loc) == 1:
            problems.append(f"unrecognized request argument supplied: {top}")
        else:
            where = ".".join(x for x in loc if not x.startswith(("str", "list[", "function-", "int", "dict[")))
            problems.append(f"{where}: {message}" if where else message)
        first = first or top or None
    return APIError(400, "; ".join(problems), param=first)


_NAMED = re.compile(r"([a-z_]+): ")


def _unavailable(exc: BrokenAdapter) -> APIError:
    return APIError(503, str(exc), "server_error", param="model", code="adapter_set_unavailable")


def _not_found(exc: UnknownAdapter) -> APIError:
    return APIError(404, f"{exc}; GET /v1/models lists the models", param="model", code="model_not_found")


def _failure(exc: Exception) -> APIError:
    if isinstance(exc, BrokenAdapter):
        return _unavailable(exc)
    if isinstance(exc, UnknownAdapter):
        return _not_found(exc)
    return APIError(500, f"generation failed: {type(exc).__name__}", "server_error")


class _Guard:
    """The API key and the declared body size, checked before any route runs (a plain ASGI
    middleware: it leaves the route's view of the connection, and its disconnects, untouched)."""

    def __init__(self, app: Any, api_key: str | None, max_bytes: int) -> None:
        self.app, self.api_key, self.max_bytes = app, api_key, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            error = None
            if self.api_key is not None:
                given = headers.get("authorization", "")
                if not secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                    error = APIError(401, "missing or wrong API key", "authentication_error", code="invalid_api_key")
            length = headers.get("content-length")
            if error is None and length is not None and not (length.isascii() and length.isdigit()):
                error = APIError(400, f"Content-Length '{length[:20]}' is not a number of bytes")
            elif error is None and length is not None and int(length) > self.max_bytes:
                error = APIError(413, f"request body over {self.max_bytes} bytes")
            if error is not None:
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, Any]], template: str | None) -> list[int]:
    """The prompt's token ids, rendered with ``template`` (a set's saved data.template, from
    AdaptersDir.template), else the tokenizer's own chat template."""
    return tokenizer(render_prompt(tokenizer, messages, template=template), add_special_tokens=False)["input_ids"]
