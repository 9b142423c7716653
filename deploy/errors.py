"""Turning exceptions into HTTP errors.

Exceptions raised inside a Ray replica travel to the caller pickled; exception classes with
keyword-only constructor arguments (``PromptTooLongError``) do not survive that round trip
(Ray hands back an ``UnserializableException``). So the deployments convert every error a user
can act on into a :class:`ServiceError` *before* it leaves the replica, and the ingress maps
those to a status. Classification is by class name along the MRO, which keeps this module free
of imports from the layers below (``retrieval`` may not even be installed).
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

# class name -> (HTTP status, OpenAI-style error type)
_STATUS_BY_CLASS: dict[str, tuple[int, str]] = {
    # pipeline
    "QuestionError": (400, "invalid_request_error"),
    "PromptTooLongError": (400, "invalid_request_error"),
    # speculation
    "GenerationInputError": (400, "invalid_request_error"),
    "ModelNotFoundError": (404, "model_not_found"),
    "TokenizerMismatchError": (503, "service_unavailable"),
    # retrieval: the server's store or index is not usable right now
    "StoreUnavailableError": (503, "service_unavailable"),
    "IndexNotFoundError": (503, "service_unavailable"),
    "IndexMismatchError": (503, "service_unavailable"),
    "EmptyCorpusError": (503, "service_unavailable"),
    "RetrievalError": (503, "service_unavailable"),
    # redis-py, should a connection error escape the retrieval layer unwrapped
    "ConnectionError": (503, "service_unavailable"),
    "TimeoutError": (503, "service_unavailable"),
    # the remaining user-facing bases
    "PipelineError": (400, "invalid_request_error"),
    "SpeculationError": (400, "invalid_request_error"),
    # Ray: a replica died or is overloaded; retrying later helps
    "BackPressureError": (503, "service_unavailable"),
    "RayActorError": (503, "service_unavailable"),
    "ActorDiedError": (503, "service_unavailable"),
    "ActorUnavailableError": (503, "service_unavailable"),
    "DeploymentUnavailableError": (503, "service_unavailable"),
}


class ServiceError(Exception):
    """An error with its HTTP status, safe to pickle across Ray (plain positional args)."""

    def __init__(self, status: int, type: str, message: str):
        super().__init__(status, type, message)
        self.status = status
        self.type = type
        self.message = message

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "code": self.status}}


def _unwrap(exc: BaseException) -> BaseException:
    """Ray wraps remote exceptions in ``RayTaskError(Original)``; the original is ``cause``."""
    seen = 0
    while seen < 5:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BaseException) and cause is not exc:
            exc = cause
            seen += 1
            continue
        break
    return exc


def _message(exc: BaseException) -> str:
    msg = str(exc).strip()
    name = type(exc).__name__
    if name == "PromptTooLongError":
        limits = []
        for attr in ("prompt_tokens", "context_tokens", "max_tokens"):
            value = getattr(exc, attr, None)
            if value is not None and attr not in msg and str(value) not in msg:
                limits.append(f"{attr}={value}")
        if limits:
            msg = f"{msg} ({', '.join(limits)})"
    if name in {"StoreUnavailableError", "IndexNotFoundError", "IndexMismatchError",
                "EmptyCorpusError", "RetrievalError", "ConnectionError", "TimeoutError"}:
        msg = f"retrieval unavailable: {msg or name}; retry later"
    if name in {"BackPressureError", "RayActorError", "ActorDiedError", "ActorUnavailableError",
                "DeploymentUnavailableError"}:
        msg = "the service is overloaded or restarting a replica; retry later"
    return msg or name


def classify(exc: BaseException) -> ServiceError | None:
    """The ServiceError for an exception a user can act on; None for an unexpected bug."""
    exc = _unwrap(exc)
    if isinstance(exc, ServiceError):
        return exc
    for cls in type(exc).__mro__:
        hit = _STATUS_BY_CLASS.get(cls.__name__)
        if hit is None:
            continue
        # builtins.ConnectionError / TimeoutError are too broad to trust from anywhere but redis
        # or ray; everything else in the table is ours.
        if cls.__name__ in {"ConnectionError", "TimeoutError"} and not (
            type(exc).__module__.startswith(("redis", "ray")) or cls.__module__.startswith("redis")
        ):
            continue
        status, kind = hit
        return ServiceError(status, kind, _message(exc))
    return None


def to_service_error(exc: BaseException) -> ServiceError:
    """Like :func:`classify`, but unexpected exceptions become a generic 500 (logged with their
    traceback here, on the server side; the client sees no internals)."""
    err = classify(exc)
    if err is not None:
        return err
    log.error("unexpected error", exc_info=(type(exc), exc, exc.__traceback__))
    return ServiceError(500, "internal_error", "internal server error (details are in the server log)")
