"""The gateway's contract: what each route accepts and how it answers errors.

Every request body has a strict model (an unknown field or a wrongly typed value is a 422, not a silent
pass-through to vLLM; a body that is not UTF-8 JSON is a 422 too). The bounds here are hard ceilings that shape
the OpenAPI document; the configured caps (:class:`serving.gateway.GatewayConfig`: prompt characters,
list-prompt size, ``n``, ``max_tokens``) are checked per request on top of them, with the same 422.

Errors: tuneship's own routes answer ``{"detail": ...}`` (FastAPI's shape); the OpenAI routes answer OpenAI's
``{"error": {"message", "type", "param", "code"}}``, so OpenAI clients raise their usual exceptions.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Hard ceilings; the configured caps sit below them.
NAME = Annotated[str, Field(min_length=1, max_length=256)]
TEXT = Annotated[str, Field(max_length=1_000_000)]
PROMPT = Annotated[str, Field(min_length=1, max_length=1_000_000)]
STOP = str | Annotated[list[Annotated[str, Field(max_length=256)]], Field(max_length=4)] | None


class _Strict(BaseModel):
    """No unknown fields, no coercion (``"5"`` is not an integer, ``true`` not a temperature)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class _Sampling(_Strict):
    """Sampling fields shared by every generating route."""

    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000, description="absent: the configured default")
    temperature: float = Field(default=0.7, ge=0, le=2)
    top_p: float = Field(default=0.9, gt=0, le=1)


class GenerateRequest(_Sampling):
    prompt: PROMPT
    model: NAME = "champion"
    stream: bool = True


class BatchRequest(_Sampling):
    prompts: list[TEXT] = Field(min_length=1, max_length=1024)
    model: NAME = "champion"


class StreamOptions(_Strict):
    include_usage: bool = False


class _OpenAISampling(_Strict):
    """The OpenAI sampling fields tuneship relays (``best_of`` is absent: vLLM's completions API has none)."""

    model: NAME
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000, description="absent: the configured default")
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=128, description="completions per prompt (capped by the gateway)")
    stop: STOP = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Annotated[str, Field(max_length=256)] | None = None
    ignore_eos: bool = Field(default=False, description="vLLM extension: always generate max_tokens tokens")
    stream_interval: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="vLLM extension: tokens per streamed chunk after the first (the engine's --stream-interval, "
        "TUNESHIP_VLLM_STREAM_INTERVAL, is the least); the first and the last chunk come at once",
    )


class CompletionRequest(_OpenAISampling):
    prompt: PROMPT | Annotated[list[PROMPT], Field(min_length=1, max_length=1024)] = Field(
        description="one prompt or a list (capped by the gateway's batch limit)"
    )


class TextPart(_Strict):
    type: Literal["text"]
    text: TEXT


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: TEXT | Annotated[list[TextPart], Field(min_length=1, max_length=64)]
    name: NAME | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_OpenAISampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=1_000_000, description="newer name of max_tokens")


class FeedbackRequest(_Strict):
    request_id: Annotated[str, Field(min_length=1, max_length=64)] = Field(
        description="from X-Request-Id, the final SSE event, or the OpenAI answer's id (cmpl-… / chatcmpl-…)"
    )
    rating: Literal["up", "down"]
    correction: Annotated[str, Field(min_length=1, max_length=20_000)] | None = Field(
        default=None, description="the answer that should have been given"
    )
    comment: Annotated[str, Field(max_length=2000)] | None = None


# (FeedbackRequest's answer)
class FeedbackAccepted(BaseModel):
    request_id: str
    joined: bool = Field(description="false: the request's record is not written yet; curation joins them")


# Answers ------------------------------------------------------------------------------------------------------


class Problem(BaseModel):
    """An error on tuneship's own routes: a message, or FastAPI's list of validation errors."""

    detail: str | list[dict[str, Any]]


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class OpenAIError(BaseModel):
    error: OpenAIErrorBody


class GenerateResult(BaseModel):
    text: str
    finish_reason: str | None = None
    usage: dict[str, Any] = Field(default_factory=dict)
    request_id: str = Field(description="for POST /feedback (also in the X-Request-Id header)")


class BatchItem(BaseModel):
    text: str | None = None
    finish_reason: str | None = None
    error: str | None = None
    request_id: str | None = Field(default=None, description="this answer's id, for POST /feedback")


class BatchResult(BaseModel):
    results: list[BatchItem]


class OpenAIObject(BaseModel):
    """An OpenAI completion, chat completion or model list (relayed as vLLM sends it)."""

    model_config = ConfigDict(extra="allow")

    object: str


# One server-sent event, as OpenAPI describes a stream's items: its data (JSON, or the final "[DONE]").
SSE_EVENT = {
    "type": "object",
    "properties": {"event": {"type": "string"}, "data": {"type": "string"}},
    "required": ["data"],
}

OPENAI_TYPES = {
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", "model_not_permitted"),
    413: ("invalid_request_error", "request_too_large"),
    422: ("invalid_request_error", None),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    503: ("server_error", "upstream_unavailable"),
}


def openai_error(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    kind, code = OPENAI_TYPES.get(status, ("invalid_request_error" if status < 500 else "server_error", None))
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


_STATUS_TEXT = {
    401: "missing or invalid API key",
    403: "this API key may not call the model (tenants), or the admin routes are closed",
    413: "request body over the size limit",
    422: "invalid request, or refused by a configured cap or by the engine",
    429: "too many requests: overloaded or over the key's rate; see Retry-After",
    503: "the engine is unreachable or failed, or the model's adapter could not be loaded",
}


def error_responses(model: type[BaseModel], *statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` entries for the error statuses a route can answer, in ``model``'s shape."""
    return {status: {"model": model, "description": _STATUS_TEXT[status]} for status in statuses}
