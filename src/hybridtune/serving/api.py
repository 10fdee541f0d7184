"""The OpenAI-compatible HTTP API: /v1/chat/completions, /v1/completions, /v1/models, /health.

``model`` names an adapter set of the adapters directory, or the base model. Errors are
OpenAI-style JSON (``{"error": {"message", "type", "param", "code"}}``) with the matching status,
and never stop the server.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..core.validation import describe_errors
from ..training.data import render_prompt, saved_template
from .adapters_dir import UnknownAdapter
from .engine import Engine, Sampling
from .engine import Request as Job


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


class _Params(BaseModel):
    """What both endpoints share. Unknown fields are ignored (clients send newer options)."""

    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=1)  # one choice per request
    stop: str | list[str] | None = None
    stream: bool = False


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


class ChatParams(_Params):
    messages: list[Message] = Field(min_length=1)


class CompletionParams(_Params):
    prompt: str | list[str]


def create_app(engine: Engine, *, base_name: str, api_key: str | None = None, limits: Limits | None = None) -> FastAPI:
    limits = limits or Limits()
    app = FastAPI(title="hybridtune", docs_url=None, redoc_url=None)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if api_key is not None:
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                error = APIError(401, "missing or wrong API key", "authentication_error", code="invalid_api_key")
                return error.response()
        length = request.headers.get("content-length", "0")
        if not length.isdigit() or int(length) > limits.max_request_bytes:
            return APIError(413, f"request body over {limits.max_request_bytes} bytes").response()
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "base": base_name, "loaded": list(engine.loaded), **engine.stats}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        names = [base_name, *engine.adapters.names()]
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "hybridtune"}
                                           for n in names]}  # fmt: skip

    async def read(request: Request, schema: type[_Params]) -> _Params:
        body = await request.body()
        if len(body) > limits.max_request_bytes:
            raise APIError(413, f"request body over {limits.max_request_bytes} bytes")
        try:
            raw = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"the request body is not valid JSON: {exc}") from None
        try:
            return schema.model_validate(raw)
        except ValidationError as exc:
            problems = describe_errors(exc)
            param = exc.errors()[0]["loc"][0] if exc.errors() and exc.errors()[0]["loc"] else None
            raise APIError(400, "; ".join(problems), param=str(param) if param is not None else None) from None

    def adapter_of(model: str) -> str | None:
        if model == base_name:
            return None
        try:
            engine.adapters.resolve(model)
        except UnknownAdapter as exc:
            raise APIError(404, f"{exc}; GET /v1/models lists the models", param="model",
                           code="model_not_found") from None  # fmt: skip
        return model

    def job_for(params: _Params, prompt_ids: list[int]) -> tuple[Job, asyncio.Queue]:
        adapter = adapter_of(params.model)
        max_tokens = params.max_completion_tokens or params.max_tokens or min(256, limits.max_tokens)
        if max_tokens > limits.max_tokens:
            raise APIError(400, f"max_tokens {max_tokens} is over this server's limit of {limits.max_tokens}",
                           param="max_tokens")  # fmt: skip
        if len(prompt_ids) > limits.max_prompt_tokens:
            raise APIError(400, f"the prompt is {len(prompt_ids)} tokens; this server's limit is "
                           f"{limits.max_prompt_tokens}", param="messages", code="context_length_exceeded")  # fmt: skip
        positions = getattr(engine.base.config, "max_position_embeddings", None)
        if positions and len(prompt_ids) + max_tokens > positions:
            raise APIError(
                400,
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) is over the "
                f"model's context of {positions}",
                param="max_tokens",
                code="context_length_exceeded",
            )
        stops = [params.stop] if isinstance(params.stop, str) else list(params.stop or [])
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def send(*event: Any) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        job = Job(
            adapter=adapter,
            prompt_ids=prompt_ids,
            max_tokens=max_tokens,
            sampling=Sampling(params.temperature, params.top_p),
            stop=[s for s in stops if s],
            emit=lambda text: send("text", text),
            finish=lambda reason, tokens: send("end", reason, tokens),
            fail=lambda exc: send("error", exc),
        )
        return job, events

    async def run(params: _Params, prompt_ids: list[int], kind: str):
        job, events = job_for(params, prompt_ids)
        engine.submit(job)
        ident = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        if params.stream:
            return StreamingResponse(stream(events, ident, created, params.model, kind), media_type="text/event-stream")
        text, reason, tokens = [], "stop", 0
        while True:
            event = await events.get()
            if event[0] == "text":
                text.append(event[1])
            elif event[0] == "end":
                reason, tokens = event[1], event[2]
                break
            else:
                raise APIError(500, f"generation failed: {event[1]}", "server_error")
        content = "".join(text)
        choice: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None}
        if kind == "chat":
            choice["message"] = {"role": "assistant", "content": content}
        else:
            choice["text"] = content
        usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": tokens,
                 "total_tokens": len(prompt_ids) + tokens}  # fmt: skip
        obj = "chat.completion" if kind == "chat" else "text_completion"
        return {"id": ident, "object": obj, "created": created, "model": params.model, "choices": [choice],
                "usage": usage}  # fmt: skip

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        params = await read(request, ChatParams)
        messages = [m.model_dump() for m in params.messages]
        adapter = adapter_of(params.model)
        try:  # a set trained with its own data.template is asked in that template
            ids = chat_prompt_ids(
                engine.tokenizer, messages, None if adapter is None else engine.adapters.resolve(adapter)
            )
        except Exception as exc:  # a model without a chat template, or a template that refuses the roles
            raise APIError(400, f"the model cannot render these messages: {exc}", param="messages") from None
        return await run(params, list(ids), "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        params = await read(request, CompletionParams)
        prompts = [params.prompt] if isinstance(params.prompt, str) else params.prompt
        if len(prompts) != 1:
            raise APIError(400, "give one prompt per request", param="prompt")
        ids = engine.tokenizer(prompts[0], add_special_tokens=False)["input_ids"]
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        return await run(params, ids, "completion")

    return app


async def stream(events: asyncio.Queue, ident: str, created: int, model: str, kind: str) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``."""
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def chunk(delta: str | None, reason: str | None, first: bool = False) -> str:
        if kind == "chat":
            body: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if delta is not None:
                body["content"] = delta
            choice = {"index": 0, "delta": body, "finish_reason": reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": reason, "logprobs": None}
        payload = {"id": ident, "object": obj, "created": created, "model": model, "choices": [choice]}
        return f"data: {json.dumps(payload)}\n\n"

    if kind == "chat":
        yield chunk(None, None, first=True)
    while True:
        event = await events.get()
        if event[0] == "text":
            yield chunk(event[1], None)
        elif event[0] == "end":
            yield chunk(None, event[1])
            break
        else:
            error = {"error": {"message": f"generation failed: {event[1]}", "type": "server_error"}}
            yield f"data: {json.dumps(error)}\n\n"
            break
    yield "data: [DONE]\n\n"


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, Any]], set_dir: Path | None) -> list[int]:
    """The prompt's token ids, rendered with the chat template the set was trained with (its
    saved data.template), else the tokenizer's own."""
    template = saved_template(set_dir) if set_dir is not None else None
    return tokenizer(render_prompt(tokenizer, messages, template=template), add_special_tokens=False)["input_ids"]
