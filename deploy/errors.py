"""Turning exceptions into HTTP errors.

The layers below give their user-facing errors their status where they are defined: the base
classes ``SpeculationError``, ``RetrievalError`` and ``PipelineError`` (and any subclass that
differs) carry ``http_status`` and ``error_type``, and may define ``public_message()``. Here
they are matched by ``isinstance``, as are the Redis and Ray errors that mean "retry later".

Exceptions raised inside a Ray replica travel to the caller pickled; the deployments convert
every error a user can act on into a :class:`ServiceError` (plain positional args) *before* it
leaves the replica, and the ingress maps those to a status.
"""

from __future__ import annotations

import logging

from pipeline.errors import PipelineError
from retrieval.errors import RetrievalError
from speculation.errors import SpeculationError

log = logging.getLogger(__name__)

USER_ERRORS: tuple[type[Exception], ...] = (PipelineError, RetrievalError, SpeculationError)
RETRY_LATER = "the service is overloaded or restarting a replica; retry later"


def _transient_types() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(Redis connection errors, Ray's replica-died / overloaded errors), imported when first
    needed: classifying our own errors loads neither."""
    import redis.exceptions
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    return ((redis.exceptions.ConnectionError, redis.exceptions.TimeoutError),
            (RayActorError, BackPressureError, DeploymentUnavailableError))


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


def classify(exc: BaseException) -> ServiceError | None:
    """The ServiceError for an exception a user can act on; None for an unexpected bug."""
    exc = _unwrap(exc)
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, USER_ERRORS):
        public = getattr(exc, "public_message", None)
        message = public() if callable(public) else str(exc).strip()
        return ServiceError(exc.http_status, exc.error_type, message or type(exc).__name__)
    redis_types, ray_types = _transient_types()
    if isinstance(exc, redis_types):
        # should a connection error escape the retrieval layer unwrapped: it is one of its errors
        return classify(RetrievalError(str(exc).strip() or type(exc).__name__))
    if isinstance(exc, ray_types):
        return ServiceError(503, "service_unavailable", RETRY_LATER)
    return None


def to_service_error(exc: BaseException) -> ServiceError:
    """Like :func:`classify`, but unexpected exceptions become a generic 500 (logged with their
    traceback here, on the server side; the client sees no internals)."""
    err = classify(exc)
    if err is not None:
        return err
    log.error("unexpected error", exc_info=(type(exc), exc, exc.__traceback__))
    return ServiceError(500, "internal_error", "internal server error (details are in the server log)")
