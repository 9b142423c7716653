"""OpenAI-compatible HTTP schemas and the translation to and from the pipeline's types.

Only the request fields specrag honours are modelled; unknown fields are accepted and ignored
(plain OpenAI clients send things like ``user`` or ``logprobs: false``), except where ignoring
them would silently change the answer (``n`` > 1, ``tools``), which is a 400.

Responses and stream chunks are built from the ``openai`` package's own types, so a field that
drifts from what OpenAI clients parse fails where the body is made; they allow extra fields, which
carry ours (``sources``, ``metrics``).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, is_dataclass
from typing import Any, Literal

from openai.types import CompletionUsage
from openai.types.completion_usage import PromptTokensDetails
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
from openai.types.chat.chat_completion import Choice
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import ChoiceDelta
from pydantic import BaseModel, ConfigDict, Field

from pipeline.api import AskRequest, AskResult, DrafterName, RetrievalOptions, SpeculationOptions

from .errors import ServiceError


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str = "text"
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text or "" for p in self.content if p.type == "text")


class RetrievalParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k: int | None = Field(None, ge=1, le=50)
    retriever: Literal["dense", "bm25", "hybrid"] | None = None
    iterative: bool | None = None
    stride: int | None = Field(None, ge=1, le=256)


class SpeculationParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool | None = None
    max_draft_tokens: int | None = Field(None, ge=1, le=64)
    # drafters in order of preference; None: the deployment's
    drafters: list[DrafterName] | None = Field(None, max_length=4)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    messages: list[ChatMessage]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    retrieval: RetrievalParams | None = None
    speculation: SpeculationParams | None = None


def question_of(req: ChatCompletionRequest) -> str:
    """The last user message is the question; empty or missing is a 400."""
    for msg in reversed(req.messages):
        if msg.role == "user":
            text = msg.text().strip()
            if not text:
                raise ServiceError(400, "invalid_request_error", "the last user message is empty")
            return text
    raise ServiceError(400, "invalid_request_error", "no user message: 'messages' needs at least one {'role': 'user', ...}")


def to_ask_request(req: ChatCompletionRequest, *, default_k: int, default_retriever: str,
                   default_max_tokens: int) -> AskRequest:
    """Map an OpenAI request onto the pipeline's AskRequest (validation errors are 400s)."""
    if req.n not in (None, 1):
        raise ServiceError(400, "invalid_request_error", "only n=1 is supported")
    if getattr(req, "tools", None):
        raise ServiceError(400, "invalid_request_error", "tools are not supported")
    question = question_of(req)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if any(s == "" for s in stop):
        raise ServiceError(400, "invalid_request_error", "stop strings must not be empty")
    if len(stop) > 4:
        raise ServiceError(400, "invalid_request_error", "at most 4 stop strings")
    r = req.retrieval or RetrievalParams()
    s = req.speculation or SpeculationParams()
    retrieval = RetrievalOptions(k=r.k or default_k, retriever=r.retriever or default_retriever)  # type: ignore[arg-type]
    if r.iterative is not None:
        retrieval.iterative = r.iterative
    if r.stride is not None:
        retrieval.stride = r.stride
    speculation = SpeculationOptions()
    if s.enabled is not None:
        speculation.enabled = s.enabled
    if s.max_draft_tokens is not None:
        speculation.max_draft_tokens = s.max_draft_tokens
    if s.drafters is not None:
        speculation.drafters = tuple(s.drafters)
    return AskRequest(
        question=question,
        max_tokens=req.max_completion_tokens or req.max_tokens or default_max_tokens,
        temperature=0.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        stop=stop,
        seed=req.seed,
        retrieval=retrieval,
        speculation=speculation,
    )


def _jsonable(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and obj != obj:  # NaN is not JSON
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if hasattr(obj, "item"):  # numpy scalar
        return obj.item()
    return str(obj)


def public_sources(result: AskResult) -> list[dict[str, Any]]:
    """``sources`` of a response: each source's public fields and its spans in the answer."""
    return _jsonable(result.public_sources())


def public_provenance(result: AskResult) -> dict[str, Any]:
    """The message's ``provenance`` (and ``strides``, iterative mode)."""
    return _jsonable(result.public_provenance())


def response_metrics(result: AskResult, extra_seconds: dict[str, float] | None = None,
                     extra_retrieval: dict[str, Any] | None = None) -> dict[str, Any]:
    """``metrics: {speculation, retrieval, seconds}`` from the pipeline's stats; the serving
    layer adds what it measured (``extra_seconds``) and which Retriever replica answered and
    whether the retrieval cache had the query (``extra_retrieval``)."""
    stats = dict(result.stats or {})
    retrieval = dict(stats.pop("retrievals", None) or stats.pop("retrieval", None) or {})
    retrieval.update(extra_retrieval or {})
    seconds = dict(stats.pop("seconds", None) or {})
    if extra_seconds:  # measured by the serving layer: retrieval in its own deployment, end to end
        seconds.update({k: round(v, 4) for k, v in extra_seconds.items()})
    return {"speculation": _jsonable(stats), "retrieval": _jsonable(retrieval), "seconds": _jsonable(seconds)}


def usage(result: AskResult) -> CompletionUsage:
    """Token counts; ``prompt_tokens_details.cached_tokens``: prompt positions the engine's
    prefix cache supplied instead of a prefill."""
    cached = min(int((result.stats or {}).get("cached_prompt_tokens", 0)), int(result.prompt_tokens))
    return CompletionUsage(
        prompt_tokens=int(result.prompt_tokens),
        completion_tokens=int(result.completion_tokens),
        total_tokens=int(result.prompt_tokens + result.completion_tokens),
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )


def new_completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def completion_body(result: AskResult, *, model: str, completion_id: str, created: int | None = None,
                    extra_seconds: dict[str, float] | None = None,
                    extra_retrieval: dict[str, Any] | None = None) -> dict[str, Any]:
    """The non-streaming body; ``to_dict`` leaves out the optional fields not set here."""
    return ChatCompletion(
        id=completion_id,
        object="chat.completion",
        created=created or int(time.time()),
        model=model,
        choices=[Choice(index=0, message=ChatCompletionMessage(role="assistant", content=result.answer,
                                                               **public_provenance(result)),
                        finish_reason=result.finish_reason, logprobs=None)],
        usage=usage(result),
        sources=public_sources(result),
        metrics=response_metrics(result, extra_seconds, extra_retrieval),
    ).to_dict()


def chunk(*, model: str, completion_id: str, created: int, delta: dict[str, Any] | None = None,
          finish_reason: str | None = None, empty_choices: bool = False, **extra: Any) -> dict[str, Any]:
    """One SSE chunk; ``extra``: ``usage`` (a field of the type) and our own fields."""
    choices = [] if empty_choices else [ChunkChoice(index=0, delta=ChoiceDelta(**(delta or {})),
                                                    finish_reason=finish_reason, logprobs=None)]
    return ChatCompletionChunk(id=completion_id, object="chat.completion.chunk", created=created, model=model,
                               choices=choices, **extra).to_dict()
