"""Plain-Python wrappers that put the pipeline's stages behind an asyncio interface.

The Ray deployments in ``deploy.app`` are thin shells over these (so are the in-process backend
the unit tests use and the ``batch`` workers): the stage calls run on a dedicated thread, so a
replica's event loop stays free for health checks and other requests while torch works, and
every error leaves as a picklable :class:`~deploy.errors.ServiceError`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable

from pipeline.api import AskRequest, AskResult, Source
from pipeline.errors import RequestStopped

from .errors import ServiceError, to_service_error

log = logging.getLogger(__name__)


class _Cancelled(Exception):
    """Raised from ``on_text`` to stop a generation whose client went away."""


class LazyStage:
    """Builds the stage at once if it can. When the index or Redis is not there yet (an error
    that maps to 503), the replica stays up, answers 503, and retries the build on later calls
    (at most every ``retry_s``), so the service heals itself when they appear. Any other
    construction error (bad config, missing model) is raised: that replica must fail loudly."""

    def __init__(self, factory: Callable[[], Any], retry_s: float = 5.0):
        self._factory = factory
        self._retry_s = retry_s
        self._stage: Any = None
        self._error: ServiceError | None = None
        self._last_try = 0.0
        self._lock = threading.Lock()
        self._build()

    def _build(self) -> None:
        from .errors import classify

        self._last_try = time.monotonic()
        try:
            self._stage = self._factory()
            self._error = None
        except Exception as exc:  # noqa: BLE001 - sorted below
            err = classify(exc)
            if err is None or err.status != 503:
                raise
            log.warning("stage not available yet (%s); retrying on later requests", err.message)
            self._error = err

    def get(self) -> Any:
        with self._lock:
            if self._stage is None and time.monotonic() - self._last_try >= self._retry_s:
                self._build()
            if self._stage is None:
                assert self._error is not None
                raise self._error
            return self._stage

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.get(), name)


class RetrievalRunner:
    """A RetrievalStage behind one worker thread (its index and store are not shared between
    threads) with a batched entry point for ``@serve.batch``."""

    def __init__(self, stage: Any, health_retriever: str = "dense"):
        self.stage = stage
        self._health_retriever = health_retriever
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="specrag-retrieval")

    async def _run(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call ``stage.<method>`` on the worker thread (a LazyStage may build itself there)."""
        return await self._call(lambda: getattr(self.stage, method)(*args, **kwargs))

    async def _call(self, fn: Callable[[], Any]) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, fn)
        except ServiceError:
            raise
        except Exception as exc:  # noqa: BLE001 - converted so it pickles across Ray
            raise to_service_error(exc) from None

    async def retrieve_batch(self, queries: list[tuple[str, int, str]]) -> list[tuple[list[Source], dict] | ServiceError]:
        """One stage call per distinct (k, retriever) in the batch; per query (sources, info) or
        the error. ``info``: the ``seconds`` of that stage call (the ingress reports retrieval
        compute apart from the time spent between deployments) and, with a retrieval cache, the
        call's ``cache_hits`` / ``cache_misses``."""
        results: list[tuple[list[Source], dict] | ServiceError | None] = [None] * len(queries)
        groups: dict[tuple[int, str], list[int]] = defaultdict(list)
        for i, (_, k, retriever) in enumerate(queries):
            groups[(int(k), str(retriever))].append(i)
        for (k, retriever), idxs in groups.items():
            try:
                qs = [queries[i][0] for i in idxs]

                def call() -> tuple[Any, float, Any, Any]:
                    counts = getattr(self.stage, "cache_counts", None)
                    before = counts() if counts else None
                    t0 = time.perf_counter()
                    found = self.stage.retrieve(qs, k, retriever)
                    return found, time.perf_counter() - t0, before, counts() if counts else None

                found, seconds, before, after = await self._call(call)
                info: dict[str, Any] = {"seconds": seconds}
                if before is not None and after is not None:
                    info.update(cache_hits=after[0] - before[0], cache_misses=after[1] - before[1])
                for i, sources in zip(idxs, found):
                    results[i] = (list(sources), info)
            except ServiceError as err:
                for i in idxs:
                    results[i] = err
        return results  # type: ignore[return-value]

    async def retrieve(self, question: str, k: int, retriever: str) -> tuple[list[Source], dict]:
        (out,) = await self.retrieve_batch([(question, k, retriever)])
        if isinstance(out, ServiceError):
            raise out
        return out

    async def retrieve_many(self, questions: list[str], k: int, retriever: str = "dense") -> list[list[Source]]:
        return await self._run("retrieve", list(questions), k, retriever)

    async def call(self, name: str, args: tuple = (), kwargs: dict | None = None) -> Any:
        """Any other stage method (iterative mode in a Generator replica needs more than retrieve)."""
        if name.startswith("_"):
            raise ServiceError(400, "invalid_request_error", f"no such retrieval method {name!r}")
        return await self._run(name, *args, **(kwargs or {}))

    async def ready(self) -> dict[str, Any]:
        """Proves index, embedding model and store answer: a real one-result retrieval."""
        def probe() -> dict[str, Any]:
            stage = self.stage.get() if isinstance(self.stage, LazyStage) else self.stage
            if callable(getattr(stage, "health", None)):
                info = stage.health()
                return dict(info) if isinstance(info, dict) else {"retrieval": "ok"}
            stage.retrieve(["health check"], 1, self._health_retriever)  # index, embedder and store answer
            info = stage.info() if callable(getattr(stage, "info", None)) else {}
            return {"retrieval": "ok", **(dict(info) if isinstance(info, dict) else {})}

        return await self._call(probe)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class GenerationRunner:
    """A GenerationStage behind ``concurrency`` worker threads. The pipeline's stage batches
    whatever its threads hand it in one engine loop (continuous batching), so a thread per
    request it can hold -- ``stage.concurrency`` by default -- is what lets requests share its
    forwards; a stage without that attribute gets one thread (requests queue)."""

    def __init__(self, stage: Any, concurrency: int | None = None):
        self.stage = stage
        if concurrency is None:
            concurrency = int(getattr(stage, "concurrency", 1) or 1)
        self._pool = ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="specrag-generate")

    def _call(self, request: AskRequest, sources: list[Source] | None,
              on_text: Callable[[str], None] | None, cancelled: Callable[[], bool] | None = None) -> AskResult:
        if sources is None:
            return self.stage.answer(request, on_text=on_text, cancelled=cancelled)
        return self.stage.generate(request, sources, on_text=on_text)

    async def generate(self, request: AskRequest, sources: list[Source] | None) -> AskResult:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, self._call, request, sources, None)
        except ServiceError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise to_service_error(exc) from None

    async def stream(self, request: AskRequest, sources: list[Source] | None) -> AsyncIterator[str | AskResult]:
        """Text deltas as the engine commits them, then the AskResult. Closing the iterator early
        (client disconnected) stops the generation at its next commit."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        cancelled = threading.Event()
        started: list[float] = []
        first_text: list[float] = []

        def on_text(delta: str) -> None:
            if cancelled.is_set():
                raise _Cancelled()
            if not first_text:
                first_text.append(time.perf_counter())
            loop.call_soon_threadsafe(queue.put_nowait, ("text", delta))

        def work() -> None:
            started.append(time.perf_counter())
            try:
                result = self._call(request, sources, on_text, cancelled.is_set)
                if first_text and isinstance(getattr(result, "stats", None), dict):
                    # the stage's own time to its first text, so the serving layer's share of
                    # the client's time to first token can be told apart per request
                    seconds = result.stats.setdefault("seconds", {})
                    if isinstance(seconds, dict):
                        seconds["first_text"] = round(first_text[0] - started[0], 4)
            except (_Cancelled, RequestStopped):
                loop.call_soon_threadsafe(queue.put_nowait, ("cancelled", None))
            except ServiceError as err:
                loop.call_soon_threadsafe(queue.put_nowait, ("error", err))
            except Exception as exc:  # noqa: BLE001
                loop.call_soon_threadsafe(queue.put_nowait, ("error", to_service_error(exc)))
            else:
                loop.call_soon_threadsafe(queue.put_nowait, ("done", result))

        future = loop.run_in_executor(self._pool, work)
        try:
            while True:
                kind, value = await queue.get()
                if kind == "text":
                    yield value
                elif kind == "done":
                    yield value
                    return
                elif kind == "error":
                    raise value
                else:
                    return
        finally:
            if not future.done():
                cancelled.set()

    async def ready(self) -> dict[str, Any]:
        check = getattr(self.stage, "health", None)
        if callable(check):
            loop = asyncio.get_running_loop()
            info = await loop.run_in_executor(None, check)
            return dict(info) if isinstance(info, dict) else {"generation": "ok"}
        return {"generation": "ok"}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class LocalBackend:
    """Both stages in this process, for the HTTP layer's unit tests and ``--local`` use."""

    def __init__(self, retrieval_stage: Any, generation_stage: Any, concurrency: int | None = None):
        self.retrieval = RetrievalRunner(retrieval_stage)
        self.generation = GenerationRunner(generation_stage, concurrency)

    async def retrieve(self, question: str, k: int, retriever: str) -> tuple[list[Source], dict]:
        sources, info = await self.retrieval.retrieve(question, k, retriever)
        return sources, {**info, "replica": "local"}

    async def generate(self, request: AskRequest, sources: list[Source] | None) -> AskResult:
        return await self.generation.generate(request, sources)

    def stream(self, request: AskRequest, sources: list[Source] | None) -> AsyncIterator[str | AskResult]:
        return self.generation.stream(request, sources)

    async def ready(self) -> dict[str, Any]:
        info = await self.retrieval.ready()
        info.update(await self.generation.ready())
        return info
