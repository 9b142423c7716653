"""The OpenAI-compatible HTTP API, as a FastAPI app over an abstract backend.

The app knows nothing about Ray: the Ingress deployment passes itself as the backend (its
methods call the Retriever and Generator through DeploymentHandles), and the unit tests pass an
in-process backend. That keeps every status code and SSE detail testable without a cluster.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.api import AskRequest, AskResult, Source, TextDelta

from . import openai_api as oa
from .errors import ServiceError, to_service_error
from .metrics import ServiceMetrics

log = logging.getLogger(__name__)
STATIC = Path(__file__).with_name("static")      # the playground page and its script


class Backend(Protocol):
    """What the HTTP layer needs from the deployments below it."""

    async def retrieve(self, question: str, k: int, retriever: str) -> tuple[list[Source], dict[str, Any]]:
        """The sources and what the retrieval call reports: ``seconds`` the stage spent on
        them, the ``replica`` that answered, ``cache_hits`` / ``cache_misses``."""
        ...

    async def generate(self, request: AskRequest, sources: list[Source] | None) -> AskResult:
        """``sources`` None: the generator retrieves itself (iterative mode)."""
        ...

    def stream(self, request: AskRequest, sources: list[Source] | None) -> AsyncIterator[str | AskResult]:
        """Text deltas, then the final AskResult."""
        ...

    async def ready(self) -> dict[str, Any]:
        """Raises when models or index are not loaded or the store is unreachable."""
        ...


@dataclass
class HttpSettings:
    model_name: str
    accepted_models: set[str] = field(default_factory=set)
    api_key: str | None = None
    default_k: int = 4
    default_retriever: str = "dense"
    default_max_tokens: int = 256
    # Ingress-side deadline for /health's calls to the deployments.
    health_timeout_s: float = 10.0


def _error(err: ServiceError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class RequireKey:
    """ASGI middleware: with an API key configured, every ``/v1/*`` request without
    ``Authorization: Bearer <key>`` is a 401, before routing and body validation (so a request
    without the key learns nothing about the API, not even that its body is malformed)."""

    def __init__(self, app: Any, api_key: str, metrics: ServiceMetrics) -> None:
        self.app, self._key, self._metrics = app, api_key.encode(), metrics

    def _authorised(self, scope: dict) -> bool:
        for name, value in scope.get("headers") or ():
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key)
        return False

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/") and not self._authorised(scope):
            self._metrics.error("authentication_error")
            self._metrics.request(scope["path"], 401, 0.0)
            err = ServiceError(401, "authentication_error", "missing or invalid API key (Authorization: Bearer <key>)")
            await _error(err, {"WWW-Authenticate": "Bearer"})(scope, receive, send)
            return
        await self.app(scope, receive, send)


def create_api(backend: Backend, settings: HttpSettings, metrics: ServiceMetrics | None = None) -> FastAPI:
    metrics = metrics or ServiceMetrics()
    app = FastAPI(title="specrag", version="0.1.0", docs_url="/docs", redoc_url=None)
    accepted = settings.accepted_models | {settings.model_name}
    if settings.api_key:
        app.add_middleware(RequireKey, api_key=settings.api_key, metrics=metrics)

    # -- error shapes: {"error": {"message", "type"}} everywhere --------------------------------
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for e in exc.errors()[:5]:
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{loc or 'body'}: {e.get('msg')}")
        metrics.error("invalid_request_error")
        metrics.request(request.url.path, 422, 0.0)
        return _error(ServiceError(422, "invalid_request_error", "malformed request: " + "; ".join(parts)))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request_error")
        return _error(ServiceError(exc.status_code, kind, str(exc.detail)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:  # last resort only
        err = to_service_error(exc)
        metrics.error(err.type)
        return _error(err)

    # -- endpoints ------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> JSONResponse:
        try:
            info = await asyncio.wait_for(backend.ready(), timeout=settings.health_timeout_s)
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
            err = to_service_error(exc)
            if isinstance(exc, asyncio.TimeoutError):
                err = ServiceError(503, "service_unavailable", "deployments did not answer the health check in time")
            elif err.status != 503:
                err = ServiceError(503, "service_unavailable", f"not ready: {err.message}")
            return JSONResponse({"status": "unavailable", **err.body()}, status_code=503)
        return JSONResponse({"status": "ok", "model": settings.model_name, **info})

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        """The playground page: ask, watch the answer stream in coloured by origin."""
        return FileResponse(STATIC / "playground.html", media_type="text/html")

    @app.get("/playground.js", include_in_schema=False)
    async def playground_script() -> FileResponse:
        return FileResponse(STATIC / "playground.js", media_type="text/javascript")

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        names = [settings.model_name] + sorted(accepted - {settings.model_name})
        return JSONResponse({"object": "list", "data": [
            {"id": n, "object": "model", "created": 0, "owned_by": "specrag"} for n in names]})

    @app.post("/v1/chat/completions")
    async def chat_completions(body: oa.ChatCompletionRequest, request: Request):
        t0 = time.perf_counter()
        endpoint = "/v1/chat/completions"
        try:
            if body.model and body.model not in accepted:
                raise ServiceError(404, "model_not_found",
                                   f"model {body.model!r} is not served here; available: {sorted(accepted)}")
            ask = oa.to_ask_request(body, default_k=settings.default_k,
                                    default_retriever=settings.default_retriever,
                                    default_max_tokens=settings.default_max_tokens)
            sources: list[Source] | None = None
            seconds: dict[str, float] = {}
            served_by: dict[str, Any] = {}
            if not ask.retrieval.iterative:
                sources, served_by = await backend.retrieve(ask.question, ask.retrieval.k, ask.retrieval.retriever)
                served_by = dict(served_by)
                seconds["retrieval"] = served_by.pop("seconds", 0.0)
                seconds["retrieve_endpoint"] = time.perf_counter() - t0
            model = body.model or settings.model_name
            if body.stream:
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                it = backend.stream(ask, sources).__aiter__()
                # Wait for the first item so that errors raised before any token (prompt too long,
                # store down) still get a proper status instead of a broken stream.
                first = await it.__anext__()
                metrics.first_token(time.perf_counter() - t0)
                return StreamingResponse(
                    _stream_body(first, it, model=model, include_usage=include_usage, t0=t0,
                                 seconds=seconds, served_by=served_by, endpoint=endpoint),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                )
            result = await backend.generate(ask, sources)
            seconds["total_endpoint"] = time.perf_counter() - t0
            metrics.result(result)
            metrics.request(endpoint, 200, time.perf_counter() - t0)
            return JSONResponse(oa.completion_body(result, model=model, completion_id=oa.new_completion_id(),
                                                   extra_seconds=seconds, extra_retrieval=served_by))
        except StopAsyncIteration:
            err = ServiceError(500, "internal_error", "the generator ended without a result")
            log.error("stream ended without a result")
        except ServiceError as exc:
            err = exc
        except Exception as exc:  # noqa: BLE001 - mapped to a status; unexpected ones logged
            err = to_service_error(exc)
        metrics.error(err.type)
        metrics.request(endpoint, err.status, time.perf_counter() - t0)
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        return _error(err, headers)

    async def _stream_body(first: str | AskResult, it: AsyncIterator[str | AskResult], *, model: str,
                           include_usage: bool, t0: float, seconds: dict[str, float],
                           served_by: dict[str, Any], endpoint: str) -> AsyncIterator[bytes]:
        cid, created = oa.new_completion_id(), int(time.time())
        yield _sse(oa.chunk(model=model, completion_id=cid, created=created,
                            delta={"role": "assistant", "content": ""}))
        item: str | AskResult = first
        result: AskResult | None = None
        status = 200
        try:
            while True:
                if isinstance(item, AskResult):
                    result = item
                    break
                if item:
                    delta: dict[str, Any] = {"content": str(item)}
                    if isinstance(item, TextDelta):
                        delta["provenance"] = item.provenance
                    yield _sse(oa.chunk(model=model, completion_id=cid, created=created, delta=delta))
                item = await it.__anext__()
        except StopAsyncIteration:
            log.error("stream ended without a result")
            status = 500
            yield _sse(ServiceError(500, "internal_error", "the generator ended without a result").body())
        except asyncio.CancelledError:  # client went away
            status = 499
            raise
        except Exception as exc:  # noqa: BLE001 - the status line is gone; report in-band
            err = to_service_error(exc)
            status = err.status
            metrics.error(err.type)
            yield _sse(err.body())
        finally:
            if status != 200:
                metrics.request(endpoint, status, time.perf_counter() - t0)
            if result is None:  # stopped early (error or client gone): stop the generation too
                aclose = getattr(it, "aclose", None)
                if aclose is not None:
                    try:
                        await aclose()
                    except Exception:  # noqa: BLE001 - best effort
                        log.debug("closing the generator stream failed", exc_info=True)
        if result is not None:
            seconds["total_endpoint"] = time.perf_counter() - t0
            extra = {"sources": oa.public_sources(result), **oa.public_provenance(result),
                     "metrics": oa.response_metrics(result, seconds, served_by)}
            yield _sse(oa.chunk(model=model, completion_id=cid, created=created, delta={},
                                finish_reason=result.finish_reason, **({} if include_usage else extra)))
            if include_usage:
                yield _sse(oa.chunk(model=model, completion_id=cid, created=created, empty_choices=True,
                                    usage=oa.usage(result), **extra))
            metrics.result(result)
            metrics.request(endpoint, 200, time.perf_counter() - t0)
        yield b"data: [DONE]\n\n"

    return app
