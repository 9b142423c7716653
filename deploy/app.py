"""The Ray Serve application: Ingress (FastAPI, OpenAI-compatible) -> Retriever -> Generator.

``build_app(args)`` is the importable builder used by Ray's CLI (``serve run deploy/serve.yaml``)
and by ``specrag serve``. The deployments are thin: the pipeline stages are imported and built
inside the replica constructors (this module stays light to import), wrapped in the runners of
``deploy.runners`` which the tests also drive without Ray.

Request flow, one-shot mode: Ingress asks the Retriever (queries batched with ``@serve.batch``),
then the Generator with the sources. Iterative mode: the Generator retrieves inside its decoding
loop, through a proxy that calls the Retriever deployment, so one index serves all generators.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator

from ray import serve
from ray.serve.handle import DeploymentHandle

from pipeline.api import AskRequest, AskResult, Source

from .config import ServeConfig
from .cpus import usable_cpus

log = logging.getLogger(__name__)


class RemoteRetrieval:
    """What GenerationStage sees as its ``retrieval``: every call forwarded to the Retriever
    deployment. Called from the Generator's worker thread, which blocks until the answer is
    there. The handle call itself is made on the replica's event loop (``attach``): with Serve's
    router on that loop (deploy/local.py's latency settings) a handle cannot be used from a
    thread without a running loop."""

    def __init__(self, handle: DeploymentHandle):
        self._handle = handle
        self._loop: asyncio.AbstractEventLoop | None = None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def _wait(self, method: str, *args: Any) -> Any:
        loop = self._loop
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if loop is None or on_loop or not loop.is_running():
            return getattr(self._handle, method).remote(*args).result()

        async def call() -> Any:
            return await getattr(self._handle, method).remote(*args)

        return asyncio.run_coroutine_threadsafe(call(), loop).result()

    def retrieve(self, questions: list[str], k: int, retriever: str = "dense") -> list[list[Source]]:
        return self._wait("retrieve_many", list(questions), k, retriever)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)

        def forward(*args: Any, **kwargs: Any) -> Any:
            return self._wait("call", name, args, kwargs)

        return forward


@serve.deployment(name="Retriever")
class Retriever:
    """Query embedding, FAISS / BM25, the document store and the retrieval cache."""

    def __init__(self, config: dict[str, Any]):
        from .config import load_stages
        from .runners import LazyStage, RetrievalRunner

        self._config = ServeConfig.model_validate(config)
        stages = load_stages(self._config.stages_module)
        # Lazy: a replica started while Redis or the index is missing answers 503 and heals
        # itself when they appear, instead of failing the whole deployment.
        stage = LazyStage(lambda: stages.RetrievalStage(self._config.pipeline))
        self._runner = RetrievalRunner(stage, health_retriever=self._config.pipeline.retriever)
        self._batched.set_max_batch_size(self._config.retrieval_batch_size)
        self._batched.set_batch_wait_timeout_s(self._config.retrieval_batch_wait_s)
        self._in_flight = 0
        try:
            self._replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - constructed outside Serve (unit tests)
            self._replica = "local"

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def _batched(self, queries: list[tuple[str, int, str]]) -> list[Any]:
        return await self._runner.retrieve_batch(queries)

    async def retrieve(self, question: str, k: int, retriever: str) -> tuple[list[Source], dict[str, Any]]:
        """(sources, info) for one query, batched with concurrent ones; ``info``: the seconds the
        stage took, this replica's id, the call's retrieval-cache hits / misses. A query that
        finds no other in flight goes straight to the stage: the batch queue would only add its
        own hop (~0.5 ms); queries arriving while it runs are batched as usual."""
        self._in_flight += 1
        try:
            if self._in_flight == 1 and self._config.retrieval_batch_wait_s == 0:
                (out,) = await self._runner.retrieve_batch([(question, k, retriever)])
            else:
                out = await self._batched((question, k, retriever))
        finally:
            self._in_flight -= 1
        if isinstance(out, Exception):
            raise out
        sources, info = out
        return sources, {**info, "replica": self._replica}

    async def retrieve_many(self, questions: list[str], k: int, retriever: str = "dense") -> list[list[Source]]:
        return await self._runner.retrieve_many(questions, k, retriever)

    async def call(self, name: str, args: tuple = (), kwargs: dict | None = None) -> Any:
        return await self._runner.call(name, args, kwargs)

    async def ready(self) -> dict[str, Any]:
        return await self._runner.ready()

    def check_health(self) -> None:
        # Loaded in __init__, so a live replica has its index. A store outage is *not* a replica
        # failure (restarting would not bring Redis back): requests answer 503 meanwhile and
        # /health reports it.
        if self._runner is None:
            raise RuntimeError("retrieval stage not loaded")


def set_generator_threads(configured: int | None) -> int:
    """Set the threads torch (and our kernels) use in this Generator replica: ``configured``
    (``torch_threads``), else every CPU this process may use (:func:`usable_cpus`). Ray sets
    OMP_NUM_THREADS to the replica's whole CPUs -- 1 for the default ``num_cpus`` of 0.5 --
    which would halve a 2-core node's decoding. Replicas that share a node should be given
    ``torch_threads`` (their threads together no more than the node's cores). Returns the count."""
    import torch

    torch.set_num_threads(max(1, configured or usable_cpus()))
    return torch.get_num_threads()


@serve.deployment(name="Generator")
class Generator:
    """Target (+ draft) model and the speculative engine; GPU when ``num_gpus`` > 0."""

    def __init__(self, config: dict[str, Any], retriever: DeploymentHandle):
        from .config import load_stages
        from .runners import GenerationRunner

        self._config = ServeConfig.model_validate(config)
        set_generator_threads(self._config.torch_threads)
        stages = load_stages(self._config.stages_module)
        self._retrieval = RemoteRetrieval(retriever)
        stage = stages.GenerationStage(self._config.pipeline, retrieval=self._retrieval)
        self._runner = GenerationRunner(stage)

    async def generate(self, request: AskRequest, sources: list[Source] | None) -> AskResult:
        self._retrieval.attach(asyncio.get_running_loop())
        return await self._runner.generate(request, sources)

    async def stream(self, request: AskRequest, sources: list[Source] | None) -> AsyncIterator[Any]:
        self._retrieval.attach(asyncio.get_running_loop())
        async for item in self._runner.stream(request, sources):
            yield item

    async def ready(self) -> dict[str, Any]:
        info = await self._runner.ready()
        info.setdefault("model", self._config.pipeline.model)
        return info

    def check_health(self) -> None:
        if self._runner is None:
            raise RuntimeError("generation stage not loaded")


class HandleBackend:
    """The HTTP layer's backend inside the Ingress replica: calls over DeploymentHandles."""

    def __init__(self, retriever: DeploymentHandle, generator: DeploymentHandle):
        self._retriever = retriever
        self._generator = generator
        self._stream_handle = generator.options(stream=True)

    async def retrieve(self, question: str, k: int, retriever: str) -> tuple[list[Source], dict[str, Any]]:
        return await self._retriever.retrieve.remote(question, k, retriever)

    async def generate(self, request: AskRequest, sources: list[Source] | None) -> AskResult:
        return await self._generator.generate.remote(request, sources)

    async def stream(self, request: AskRequest, sources: list[Source] | None) -> AsyncIterator[Any]:
        gen = self._stream_handle.stream.remote(request, sources)
        try:
            async for item in gen:
                yield item
        finally:
            gen.cancel()  # client went away: stop the generator replica's work too

    async def ready(self) -> dict[str, Any]:
        r, g = await asyncio.gather(self._retriever.ready.remote(), self._generator.ready.remote())
        return {**r, **g}


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    """FastAPI front door; the app is built per replica by ``__serve_build_asgi_app__``."""

    def __init__(self, config: dict[str, Any], retriever: DeploymentHandle, generator: DeploymentHandle):
        from .metrics import ServiceMetrics

        self._config = ServeConfig.model_validate(config)
        self._backend = HandleBackend(retriever, generator)
        self._metrics = ServiceMetrics()

    def __serve_build_asgi_app__(self):
        from .http import HttpSettings, create_api

        cfg = self._config
        settings = HttpSettings(
            model_name=cfg.model_name,
            accepted_models=cfg.accepted_model_names(),
            api_key=cfg.resolved_api_key(),
            default_k=cfg.pipeline.k,
            default_retriever=cfg.pipeline.retriever,
            default_max_tokens=cfg.pipeline.max_tokens,
        )
        return create_api(self._backend, settings, self._metrics)


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """Application builder for ``serve run deploy.app:build_app`` / ``deploy/serve.yaml``.

    ``args`` are :class:`~deploy.config.ServeConfig` fields; validated here, on the driver, so a
    bad config fails before any replica starts.
    """
    config = ServeConfig.model_validate(args or {})
    cfg = config.model_dump(mode="json")
    retriever = Retriever.options(**config.retriever.serve_options()).bind(cfg)
    generator = Generator.options(**config.generator.serve_options()).bind(cfg, retriever)
    return Ingress.options(**config.ingress.serve_options()).bind(cfg, retriever, generator)
