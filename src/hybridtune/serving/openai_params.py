"""The request bodies of /v1/chat/completions and /v1/completions, as OpenAI defines them.

Every parameter OpenAI documents is either implemented or refused with a 400 naming it — never
accepted and ignored. Unknown parameters are refused as OpenAI refuses them ("Unrecognized request
argument"); the few that only steer OpenAI's own bookkeeping (``user``, ``metadata``, ``store``,
``service_tier``) are accepted and have no effect on the reply, as they have none on OpenAI's.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_CHOICES = 8
MAX_TOP_LOGPROBS = 20
MAX_ROWS = 64  # prompts x n in one request
MAX_LOGIT_BIAS = 300


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str

    @field_validator("type")
    @classmethod
    def _text_only(cls, value: str) -> str:
        if value != "text":
            raise ValueError(
                f"'{value}' is not supported: this server has no constrained decoding, so it cannot guarantee "
                "JSON; ask for JSON in the prompt and validate the reply, or leave response_format out"
            )
        return value


class _Params(_Strict):
    """What both endpoints share."""

    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, ge=0, le=1)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    # OpenAI's bookkeeping only; they change nothing in a reply
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None

    @field_validator("stop")
    @classmethod
    def _four_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError(f"at most 4 stop sequences, got {len(value)}")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value and len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} entries, got {len(value)}")
        for token, bias in (value or {}).items():
            if not (token.isascii() and token.isdigit()):
                raise ValueError(f"keys are token ids, got '{token}'")
            if not -100 <= bias <= 100:
                raise ValueError(f"token {token}: bias {bias} is outside -100..100")
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _Params:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self

    def stops(self) -> list[str]:
        found = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in found if s]

    def biases(self) -> dict[int, float]:
        return {int(token): bias for token, bias in (self.logit_bias or {}).items()}


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None

    @field_validator("content")
    @classmethod
    def _text_parts(cls, value: str | list[ContentPart] | None) -> str | list[ContentPart] | None:
        for part in value if isinstance(value, list) else []:
            if part.type not in {"text", "refusal"}:
                raise ValueError(f"part type '{part.type}' is not supported: this model reads text parts only")
            if part.type == "text" and part.text is None:
                raise ValueError("a text part needs 'text'")
        return value

    @model_validator(mode="after")
    def _content_present(self) -> Message:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id")
        return self

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates read it: text parts joined by newlines; ``developer``
        (OpenAI's newer name for the system role) as ``system``, which templates know."""
        content = self.content
        if isinstance(content, list):
            content = "\n".join(p.text or "" for p in content if p.type == "text")
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": content or ""}
        for key in ("name", "tool_calls", "tool_call_id"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


class ChatParams(_Params):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _chat_rules(self) -> ChatParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs set to true")
        if self.tools:
            raise ValueError(
                "tools: this server does not parse tool calls out of replies; leave tools out (or describe them "
                "in a system message and parse the reply yourself)"
            )
        if self.tool_choice not in (None, "none", "auto"):
            raise ValueError("tool_choice: no tools can be called on this server; use 'none' or leave it out")
        if self.max_tokens == 0:
            raise ValueError("max_tokens: must be at least 1")
        return self

    def top(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionParams(_Params):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=1)

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> None:
        if value:
            raise ValueError("is not supported (no fill-in-the-middle); put everything in prompt")
        return None

    @model_validator(mode="after")
    def _completion_rules(self) -> CompletionParams:
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 is only useful with echo (to score a prompt)")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt: is empty")
        prompts = 1 if isinstance(self.prompt, str) or isinstance(self.prompt[0], int) else len(self.prompt)
        if prompts * self.n > MAX_ROWS:
            raise ValueError(f"prompt: {prompts} prompts x n={self.n} is over this server's {MAX_ROWS} per request")
        return self

    def top(self) -> int | None:
        return self.logprobs
